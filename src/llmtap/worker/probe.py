"""`/healthz` and `/metrics` of a worker running alone (`LLMTAP_WORKER_PORT`).

Scaled out, the gateway and the server have a port and the worker had none: its records
stored, dead letters and batch times lived in a process nothing could scrape. This is the
smallest server that exposes them: the worker's own counters (prometheus_client's default
registry) and whether it consumes or waits for a backend, for a liveness or readiness check.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from llmtap.errors import ConfigError
from llmtap.handlers.store import StoreHandler
from llmtap.headertimeout import app_runner
from llmtap.runtime import livez

if TYPE_CHECKING:
    from llmtap.config import Settings
    from llmtap.worker.worker import WorkerService


class WorkerProbe:
    """A `runtime.Service` started after its worker (stopped before it)."""

    name = "worker-probe"

    def __init__(self, settings: Settings, worker: WorkerService) -> None:
        assert settings.worker_port is not None
        self.settings = settings
        self.worker = worker
        self._runner: web.AppRunner | None = None

    async def start(self) -> list[str]:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/livez", livez)
        app.router.add_get("/metrics", self._metrics)
        self._runner = app_runner(app, self.settings.header_timeout, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.host, self.settings.worker_port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:  # a port in use, a host that does not resolve: one sentence
            await self._runner.cleanup()
            why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise ConfigError(
                f"cannot listen on {self.settings.host}:{self.settings.worker_port}"
                f" (LLMTAP_HOST/LLMTAP_WORKER_PORT): {why}"
            ) from None
        port = self._runner.addresses[0][1]
        return [f"worker    /healthz, /livez and /metrics on http://{self.settings.host}:{port}"]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        waiting = self.worker.waiting
        if waiting is not None:  # up, but not consuming: a readiness check should say so
            return web.json_response({"status": "waiting", "reason": waiting}, status=503)
        return web.json_response(
            {
                "status": "ok",
                "processed": self.worker.stats.processed,
                "rows_written": StoreHandler.rows_written,
            }
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(REGISTRY))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp
