"""The fake upstream on a background thread, for synchronous tests (`with FakeUpstream() as fake:`).

Test-only: the package's fake runs as `llmtap fake-upstream` or on the caller's loop (`serve`).
"""

from __future__ import annotations

import asyncio
import threading

from llmtap.testing.fake_upstream import DEFAULT_RECORD_LIMIT, STATE, JSONDict, make_app, serve


class FakeUpstream:
    """The fake on a background thread, for synchronous tests (``with FakeUpstream() as fake: ...``)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, record_limit: int = DEFAULT_RECORD_LIMIT
    ) -> None:
        self.host = host
        self.port = port
        self.app = make_app(record_limit=record_limit)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """Base URL without a path (Anthropic SDK style); add ``/v1`` for the OpenAI SDK."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeUpstream:
        self._thread = threading.Thread(target=self._main, name="fake-upstream", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError("fake upstream failed to start") from self._error
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced to start() instead of dying silently on the thread
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        runner, self.port = await serve(self.app, self.host, self.port)
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def requests(self) -> list[JSONDict]:
        """Recorded requests (same shape as ``GET /_fake/requests``), oldest first."""
        return [r.to_json() for r in list(self.app[STATE].requests)]

    @property
    def client_aborts(self) -> int:
        """How many streams lost their client before the last event (cancellation tests)."""
        return self.app[STATE].client_aborts

    def clear(self) -> None:
        self.app[STATE].requests.clear()
        self.app[STATE].client_aborts = 0

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
