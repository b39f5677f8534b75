"""Requests aiohttp read but never handed to the gateway's handler: recorded all the same.

A request pipelined behind another, or sent on a kept-alive connection before the last answer's
handler had returned, waits in aiohttp's queue for its turn. With `handler_cancellation` (a
client that leaves stops its upstream stream at once), a client that hangs up meanwhile took
it away unseen: received in full, never handled, never logged (an outside check lost requests
this way to a 30 ms client timeout on a saturated machine). The same held for a request whose
handler task was made but had not run yet (Python 3.11 starts a task a loop turn later).

`OrphanServer`'s connections hand such requests to a callback when they are lost; the gateway
runs them through `Proxy.handle`, which records them and sends nothing upstream: their
connection is gone (`client_disconnected`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import StreamWriter

from llmtap.headertimeout import GuardedHandler, GuardedServer

#: Takes the requests a lost connection never handled.
OnOrphans = Callable[[list[web.BaseRequest]], None]


class _OrphanHandler(GuardedHandler):
    """A connection that knows which of its requests were never handled when it is lost."""

    __slots__ = ("_factory", "_unstarted")

    def __init__(self, manager: OrphanServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._unstarted: web.BaseRequest | None = None  # made for a handler that has not run yet
        factory = self._request_factory
        assert factory is not None
        self._factory: Callable[..., web.BaseRequest] = factory
        self._request_factory = self._make

    def _make(self, *args: Any) -> web.BaseRequest:
        self._unstarted = request = self._factory(*args)
        return request

    async def _handle_request(self, request: web.BaseRequest, *args: Any) -> Any:
        self._unstarted = None
        return await super()._handle_request(request, *args)

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        try:
            await super().shutdown(timeout)
        finally:
            # aiohttp closed the transport, but with answers the client has not read still in
            # its buffer `connection_lost` waits for them (forever, for a client that reads no
            # more): what the connection held is recorded now, before the publisher stops.
            manager = self._manager
            if isinstance(manager, OrphanServer):
                orphans = self._orphans()
                if orphans:
                    manager.on_orphans(orphans)

    def connection_lost(self, exc: BaseException | None) -> None:
        manager = self._manager
        orphans = self._orphans() if isinstance(manager, OrphanServer) else []
        super().connection_lost(exc)
        if orphans:
            manager.on_orphans(orphans)  # type: ignore[union-attr]

    def _orphans(self) -> list[web.BaseRequest]:
        found: list[web.BaseRequest] = []
        unstarted, self._unstarted = self._unstarted, None
        assert self._manager is not None
        if unstarted is not None and self._manager.handler_cancellation:  # else it still runs
            found.append(unstarted)
        self._drain_parser()
        messages, self._messages = list(self._messages), type(self._messages)()
        for message, payload in messages:
            if isinstance(message, RawRequestMessage):  # not a parse error: aiohttp answers those
                writer = StreamWriter(self, self._loop)
                found.append(self._factory(message, payload, self, writer, self._task_handler))
        for request in found:
            if not request.content.is_eof():  # its body was still coming: it never will now
                request.content.set_exception(ConnectionResetError("Connection lost"))
        return found

    def _drain_parser(self) -> None:
        """The complete requests aiohttp's parser read but holds back: it stops emitting them
        while 32 are queued (`MAX_MSG_QUEUE_SIZE`), keeping the rest of the read in its buffer.
        Garbage after them makes it raise and drop those it parsed in that call: the held read
        is parsed again for them (rev26: 40 pipelined and a bad one, 34 recorded)."""
        parser = self._parser
        if parser is None:
            return
        drained = 0
        while True:
            for _ in range(len(self._messages) + 64):  # frees every slot it counts
                parser.message_consumed()
            try:
                messages, _, _ = parser.feed_data(b"")
            except HttpProcessingError:
                # Garbage after them: the parser lost those it read in this call before it.
                self._messages.extend(self._held_requests(drained))
                return
            if not messages:
                return
            self._messages.extend(messages)
            drained += len(messages)


class OrphanServer(GuardedServer):
    """A `GuardedServer` whose lost connections hand their never-handled requests to `on_orphans`."""

    def __init__(self, handler: Any, *, on_orphans: OnOrphans, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.on_orphans = on_orphans
        self.handler_class = _OrphanHandler


class Orphanage:
    """Runs orphans through the handler as tasks, and lets the stop wait for their records."""

    def __init__(self, handler: Callable[[web.BaseRequest], Any], log: Any) -> None:
        self._handler = handler
        self._log = log
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, requests: list[web.BaseRequest]) -> None:
        for request in requests:
            name = request.headers.get("Llmtap-Request-Id", "")[:64]  # named if it is given up
            task = asyncio.get_running_loop().create_task(self._run(request), name=name)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, request: web.BaseRequest) -> None:
        try:
            await self._handler(request)
        except Exception as e:  # the type only: a message could quote the request
            self._log.warning("recording a request its client left unhandled failed: %s", type(e).__name__)

    async def settle(self, timeout: float) -> None:
        """Wait (up to `timeout`) for the orphans' records: the stop's, and their tenant lookups,
        may still run. Past it the rest are given up, counted and named in one line: a record
        submitted once the publisher has stopped would be lost unseen (rev23a: 30,000 orphans
        at a stop under load overran the stop's own deadline)."""
        if not self._tasks:
            return
        _, late = await asyncio.wait(set(self._tasks), timeout=timeout)
        if late:
            ids = [t.get_name() for t in late][:20]
            for task in late:
                task.cancel()
            await asyncio.wait(late)
            self._log.error(
                "stopping: %d requests whose connection ended before they were handled were not"
                " recorded in time (request ids, where the client gave them: %s)",
                len(late), ", ".join(i for i in ids if i) or "none given",
            )  # fmt: skip
