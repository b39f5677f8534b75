"""`--include-bodies` end to end: bodies read at send time from wherever they live (inline in the
row, the file body store, S3), capped, redacted; a body-store outage delays a delivery and never
drops it or holds back another endpoint. Real stores, real body stores, a receiver verifying
every delivery with `standardwebhooks` and keeping every byte it was sent."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from llmtap.bodies.base import BodyStore
from llmtap.bodies.file import FileBodyStore
from llmtap.handlers.base import Item
from llmtap.handlers.bodies import BodyHandler
from llmtap.record import Body, LogRecord, compress
from llmtap.store.base import Store
from llmtap.webhooks.bodies import PayloadBodies
from llmtap.webhooks.db import WebhookDB
from llmtap.webhooks.outbox import new_secret
from store_helpers import open_store, store_params
from test_body_stores import _s3_env, _s3_store
from test_webhooks import Receiver, add, deliverer, wait_for
from worker_helpers import make_record

pytestmark = pytest.mark.timeout(300)

CAP = 4096
#: The test credential: it must never appear in any byte a receiver gets.
CRED = "Zq7CredTest9f3a1c5e"


class RawReceiver(Receiver):
    """Keeps every byte of every request (headers and body), accepted or not."""

    def __init__(self, secret: str) -> None:
        super().__init__(secret)
        self.raw: list[bytes] = []

    async def handle(self, request: web.Request) -> web.Response:
        head = "".join(f"{k}: {v}\n" for k, v in request.headers.items()).encode()
        self.raw.append(request.method.encode() + b" " + request.path_qs.encode() + b"\n" + head)
        self.raw.append(await request.read())
        return await super().handle(request)


@pytest.fixture(params=store_params())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(request.param, tmp_path) as s:
        yield s


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
async def bodies(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BodyStore]:
    if request.param == "file":
        b: BodyStore = FileBodyStore(str(tmp_path / "bodies"))
    else:
        if _s3_env() is None:
            pytest.skip("LLMTAP_TEST_S3_* not set: run scripts/services.sh up s3")
        b = _s3_store(f"hooks-{uuid.uuid4().hex[:8]}")
    await b.connect()
    yield b
    await b.close()


def with_bodies(db: WebhookDB, store: Store, bodies: BodyStore, **kw: Any) -> Any:
    async def connect() -> BodyStore:
        return bodies

    return deliverer(db, bodies=PayloadBodies(store, connect, CAP), **kw)


def record_with(request: bytes, response: bytes, **kw: Any) -> LogRecord:
    """A record carrying these bodies inline, compressed as the gateway does above 1 KiB."""

    def body(data: bytes) -> Body:
        if len(data) < 1024:
            return Body(content_type="application/json", size=len(data), data=data)
        return Body(content_type="application/json", size=len(data), encoding="zstd", data=compress(data))

    return make_record(0, request_body=body(request), response_body=body(response), **kw)


async def stored(store: Store, bodies: BodyStore, records: list[LogRecord]) -> None:
    """Through the real body handler (bodies to the body store, as the worker does), then stored."""
    await BodyHandler(bodies).handle([Item(r) for r in records])
    assert all(r.request_body is None or r.request_body.ref for r in records)
    assert await store.write_batch(records) == len(records)


async def test_bodies_arrive_exactly_and_capped(store: Store, bodies: BodyStore) -> None:
    db = store.webhooks()
    secret = new_secret()
    rx = RawReceiver(secret)
    await rx.start()
    d = with_bodies(db, store, bodies)
    await d.start()
    try:
        await add(db, rx.url, secret, include_bodies=True)
        small_req = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi \\u00e9 \xc3\xa9"}]}'
        small_resp = b'{"choices":[{"message":{"content":"hello"}}]}'
        # Multi-byte characters across the cap: the cut must not split one.
        big = ('{"content":"' + "日本語" * 3000 + '"}').encode()
        small = record_with(small_req, small_resp)
        large = record_with(big, small_resp)
        inline = record_with(small_req, b"not json \x00 \xe2\x82\xac")  # stays inline in the row
        await stored(store, bodies, [small, large])
        assert await store.write_batch([inline]) == 1
        await wait_for(lambda: len(rx.got) == 3, what="three deliveries")
        assert rx.bad == []
        by_id = {p["data"]["id"]: p["data"] for _, p in rx.got}

        got = by_id[small.id]
        assert got["request_body"] == {
            "content_type": "application/json", "size": len(small_req), "truncated": False,
            "text": small_req.decode(),
        }  # fmt: skip
        assert got["response_body"]["text"] == small_resp.decode()

        got = by_id[large.id]["request_body"]
        assert got["size"] == len(big) and got["truncated"] is True
        cut = got["text"].encode()
        assert len(cut) <= CAP and len(cut) > CAP - 4  # at most one character short of the cap
        assert big.startswith(cut)
        assert by_id[large.id]["response_body"]["text"] == small_resp.decode()

        got = by_id[inline.id]
        assert got["request_body"]["text"] == small_req.decode()
        assert got["response_body"]["text"] == "not json \x00 €"
    finally:
        await d.stop()
        await rx.stop()


async def test_credentials_never_reach_a_receiver(store: Store, bodies: BodyStore) -> None:
    """Every place a credential can sit in a record (as an ingested record could carry it):
    headers, the query string, the error text, JSON members named like one, bearer text in a body."""
    db = store.webhooks()
    secret = new_secret()
    plain, full = RawReceiver(secret), RawReceiver(secret)
    await plain.start()
    await full.start()
    d = with_bodies(db, store, bodies)
    await d.start()
    try:
        await add(db, plain.url, secret)
        await add(db, full.url, secret, include_bodies=True)
        req = (
            '{"model":"gpt-4o","api_key":"@","nested":{"client_secret":"@","x-api-key":"@"},'
            '"messages":[{"role":"user","content":"Authorization: Bearer @ and sk-@"}]}'
        ).replace("@", CRED)
        resp = '{"echo":"Bearer @","token":"@","note":"keep me"}'.replace("@", CRED)
        records = [
            record_with(
                req.encode(),
                resp.encode(),
                target_url=f"https://api.openai.com/v1/chat/completions?key={CRED}&api-key={CRED}",
                request_headers={"authorization": f"Bearer {CRED}", "x-api-key": CRED, "cookie": CRED},
                response_headers={"set-cookie": CRED},
                error=f"Incorrect API key provided: sk-{CRED}; url ?token={CRED} (Bearer {CRED})",
                status=401,
            ),
        ]
        records.append(record_with(req.encode(), resp.encode()))  # this one stays inline in the row
        await stored(store, bodies, records[:1])
        assert await store.write_batch(records[1:]) == 1
        await wait_for(lambda: len(plain.got) == 2 and len(full.got) == 2, what="both endpoints' deliveries")
        assert plain.bad == full.bad == []
        for rx in (plain, full):
            everything = b"".join(rx.raw)
            assert CRED.encode() not in everything
            assert CRED[4:12].encode() not in everything  # nor a recognisable piece of it
        # The redaction only masked: the rest of each body arrived as it was.
        for _, p in full.got:
            text = p["data"]["response_body"]["text"]
            assert '"note":"keep me"' in text and '"token":"***"' in text
            assert '"model":"gpt-4o"' in p["data"]["request_body"]["text"]
    finally:
        await d.stop()
        await plain.stop()
        await full.stop()


class FileOutage:
    """The file body store's directory replaced by a plain file: every read fails with
    NotADirectoryError (as with a lost mount), until it is put back."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.away = self.root.with_name(self.root.name + ".away")

    async def __aenter__(self) -> None:
        self.root.rename(self.away)
        self.root.write_bytes(b"")

    async def __aexit__(self, *exc: object) -> None:
        self.root.unlink()
        self.away.rename(self.root)


class S3Outage:
    """The real S3 server stopped (and started again) with scripts/services.sh."""

    script = Path(__file__).resolve().parents[1] / "scripts" / "services.sh"

    async def __aenter__(self) -> None:
        await asyncio.to_thread(self.run, "stop")

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.run, "start")

    def run(self, verb: str) -> None:
        subprocess.run([str(self.script), verb, "s3"], check=True, capture_output=True)


async def test_body_store_outage_delays_then_delivers(store: Store, bodies: BodyStore) -> None:
    db = store.webhooks()
    secret = new_secret()
    full, plain = Receiver(secret), Receiver(secret)
    await full.start()
    await plain.start()
    d = with_bodies(db, store, bodies, max_backoff=1.0)
    await d.start()
    try:
        ep = await add(db, full.url, secret, include_bodies=True)
        await add(db, plain.url, secret)
        req = b'{"messages":[{"role":"user","content":"during the outage"}]}'
        before = [record_with(req, b'{"n":%d}' % i) for i in range(3)]
        await stored(store, bodies, before)
        await wait_for(lambda: len(full.got) == 3, what="deliveries before the outage")
        outage = FileOutage(bodies.root) if isinstance(bodies, FileBodyStore) else S3Outage()
        during = [record_with(req, b'{"n":%d}' % (10 + i)) for i in range(5)]
        await BodyHandler(bodies).handle([Item(r) for r in during])  # the worker's first step
        async with outage:
            assert await store.write_batch(during) == 5  # its last step: rows with body refs
            # The endpoint without bodies gets its events at once: nothing waits on the body store.
            await wait_for(lambda: len(plain.got) == 8, what="metadata-only deliveries during the outage")

            async def postponed() -> bool:
                log = await db.list_deliveries("acme", endpoint_id=ep.id, status="pending", limit=100)
                return len(log) == 5 and all("bodies unavailable" in (x["last_error"] or "") for x in log)

            await wait_for(postponed, what="the deliveries with bodies postponed, with the reason")
            assert len(full.got) == 3
            log = await db.list_deliveries("acme", endpoint_id=ep.id, status="pending", limit=100)
            assert all(x["attempts"] == 0 for x in log)  # nothing was sent, nothing counted
            got = await db.get_endpoint("acme", ep.id)
            assert got is not None and got.failing_since is None and got.disabled_at is None
        await wait_for(lambda: len(full.got) == 8, deadline=180, what="the postponed deliveries, after it")
        texts = {p["data"]["id"]: p["data"]["response_body"]["text"] for _, p in full.got}
        assert {texts[r.id] for r in during} == {f'{{"n":{10 + i}}}' for i in range(5)}
        assert len({m for m, _ in full.got}) == 8 and full.bad == []
    finally:
        await d.stop()
        await full.stop()
        await plain.stop()


async def test_through_the_worker_and_the_server_deliverer(tmp_path: Path) -> None:
    """The shipped wiring: queue → worker (body handler moves bodies to the file body store, the
    store writes the outbox) → the server's deliverer service (reads them back at send time),
    with an endpoint added as `llmtap webhooks add --include-bodies` adds it."""
    from llmtap.config import Settings
    from llmtap.queue.base import Message
    from llmtap.queue.sqlite import SQLiteQueue
    from llmtap.record import encode
    from llmtap.webhooks.deliverer import DelivererService
    from llmtap.webhooks.manage import create_endpoint
    from llmtap.worker import WorkerService

    settings = Settings(
        data_dir=tmp_path, webhook_allow_private=True, webhook_body_bytes=CAP, default_tenant="acme",
        worker_batch_size=20, shutdown_timeout=10,
    )  # fmt: skip
    secret = new_secret()
    rx = RawReceiver(secret)
    await rx.start()
    producer = SQLiteQueue(str(tmp_path / "queue.db"), partitions=settings.partitions)
    await producer.connect("producer")
    worker, service = WorkerService(settings), DelivererService(settings)
    await worker.start()
    try:
        assert worker.store is not None
        await worker.backends.connect_store()
        await create_endpoint(
            worker.store.webhooks(), "acme", rx.url, include_bodies=True, secret=secret, allow_private=True
        )
        await service.start()
        req = b'{"messages":[{"role":"user","content":"hello"}],"api_key":"%s"}' % CRED.encode()
        big = b'{"text":"' + b"x" * (3 * CAP) + b'"}'
        records = [record_with(req, big) for _ in range(3)]
        await producer.publish([Message(r.id, encode(r)) for r in records])
        await wait_for(lambda: len(rx.got) == 3, what="three deliveries through the whole pipeline")
        assert rx.bad == [] and CRED.encode() not in b"".join(rx.raw)
        for _, p in rx.got:
            assert p["data"]["request_body"]["text"] == req.decode().replace(CRED, "***")
            resp = p["data"]["response_body"]
            assert resp["size"] == len(big) and resp["truncated"] is True
            assert resp["text"].encode() == big[:CAP]
    finally:
        await service.stop()
        await worker.stop()
        await producer.close()
        await rx.stop()
