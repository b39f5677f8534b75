"""Screenshots of every dashboard view with realistic data, for the README's tour.

Starts `llmtap server` in-process over a fresh SQLite store, feeds it a week of records through
`POST /api/v1/ingest` (the real handler chain), adds a dead letter, and saves one PNG per view
under docs/screenshots/ using Debian's chromium.

    .venv/bin/python scripts/dashboard_screenshots.py [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from playwright.async_api import async_playwright

from llmtap.config import Settings
from llmtap.ingest_token import ingest_token
from llmtap.queue import open_queue
from llmtap.queue.base import Message
from llmtap.record import encode_many
from llmtap.server.app import ServerService
from llmtap.testing import dashboard_data as dd

JSON = {"Content-Type": "application/json"}


async def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        settings = Settings(
            data_dir=tmp, server_port=0, store=f"sqlite:{tmp / 'store.db'}",
            bodies=f"file:{tmp / 'bodies'}", queue=f"sqlite:{tmp / 'queue.db'}",
        )  # fmt: skip
        svc = ServerService(settings)
        await svc.start()
        base = f"http://127.0.0.1:{svc.port}"
        headers = {**JSON, "Authorization": f"Bearer {ingest_token(settings)}"}  # ingest needs its token
        try:
            # Every wire format the dashboard renders: Gemini and embeddings calls too.
            records = dd.dataset(3000, seed=5, span=timedelta(days=7), kinds=len(dd.MODELS))
            async with aiohttp.ClientSession() as http:
                for i in range(0, len(records), 250):
                    batch = encode_many(records[i : i + 250])
                    async with http.post(base + "/api/v1/ingest", data=batch, headers=headers) as r:
                        assert r.status == 200, await r.text()
                await svc.ingest.drained(timeout=300)
            q = open_queue(settings)
            await q.connect("both")
            await q.publish(
                [Message(key="req-7f3a", value=b'{"v": 9, "id": "01938f2e-5b7c-7a41-9c3e-4d2f8b6a1e07"}')]
            )
            got = []
            while not got:
                got = await q.consume(10, 1.0)
            await q.dead_letter(got[0], "unknown record version 9 (this worker reads version 1)")
            await q.close()
            async with async_playwright() as p:
                b = await p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
                page = await b.new_page(viewport={"width": 1440, "height": 900}, device_scale_factor=1)

                async def shot(name: str, url: str, ready: str, full: bool = False) -> None:
                    await page.goto(base + url)
                    await page.wait_for_selector(ready, timeout=30_000)
                    await page.wait_for_load_state("networkidle")
                    await page.screenshot(path=str(out / f"{name}.png"), full_page=full)
                    print("wrote", out / f"{name}.png")

                await shot("requests", "/#/requests?range=7d&cols=feature", "#requests-table")
                first = await page.eval_on_selector("#requests-table tbody tr[data-id]", "r => r.dataset.id")
                chat = next(r for r in records if r.path == "/v1/messages" and r.status == 200)
                await shot("detail", f"/#/requests/{chat.id}?range=7d", "#drawer .conversation")
                gemini = next(r for r in records if r.model == "gemini-2.5-flash" and r.status == 200)
                await shot("detail-gemini", f"/#/requests/{gemini.id}?range=7d", "#drawer .conversation")
                emb = next(r for r in records if r.path.endswith(":batchEmbedContents") and r.status == 200)
                await shot("detail-embeddings", f"/#/requests/{emb.id}?range=7d", "#drawer .embeddings")
                assert first
                await shot("overview", "/#/overview?range=7d&group=feature", ".chart canvas", full=True)
                await shot("sessions", "/#/sessions?range=7d", "#sessions-table")
                await shot("session", "/#/sessions/sess-004", ".timeline li .msg")
                await shot("users", "/#/users", "#users-table")
                await page.goto(base + "/#/live")
                await page.wait_for_selector("#live-status >> text=live")
                rng = random.Random(3)
                async with aiohttp.ClientSession() as http:
                    for n in range(6):
                        rec = dd.record(
                            n,
                            at=datetime.now(UTC),
                            rng=rng,
                            session="sess-live",
                            user="carol@example.com",
                            kinds=len(dd.MODELS),
                        )
                        async with http.post(
                            base + "/api/v1/ingest", data=encode_many([rec]), headers=headers
                        ) as r:
                            assert r.status == 200
                        await page.wait_for_selector(f'tr[data-id="{rec.id}"]')
                await page.screenshot(path=str(out / "live.png"))
                print("wrote", out / "live.png")
                await shot("pipeline", "/#/pipeline", "#dead-letters")
                await b.close()
        finally:
            await svc.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
    ap.add_argument("--out", type=Path, default=default)
    target = ap.parse_args().out
    target.mkdir(parents=True, exist_ok=True)
    asyncio.run(main(target))
