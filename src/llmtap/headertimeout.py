"""A deadline for a request's headers: the slow-client guard (nginx's `client_header_timeout`).

aiohttp closes a connection idle *between* requests after its keep-alive timeout (an hour), but
a client that sends a request's headers a few bytes at a time holds its connection, and one of
the process's file descriptors, for as long as it keeps sending: a few hundred such clients
stop a gateway from accepting anyone else. Here a connection whose request line and headers
are not all in `LLMTAP_HEADER_TIMEOUT` seconds after its first byte (or after it was opened) is
closed. Request bodies and responses are not limited: an upload or a stream may take as long as
it takes.

The same guard bounds a request's head in bytes (`HEAD_MAX`): the gateway takes 1,024 header
lines of up to 64 KiB (what some clients and upstreams send), and one client that sent 58 MB
of them, unfinished, held 115 MB of the gateway's memory per connection, before any key was
checked. Past `HEAD_MAX` the connection is answered 431 and closed. A head pipelined behind
another request is counted from the read after that request's headers: the part of it in the
same read as they were is not, so up to one read more (256 KiB) may reach aiohttp's parser.

llhttp, failing in a read, keeps the complete requests it parsed in that read before the fault
(aiohttp then queues only the 400). The bytes from where a request began (the connection's
first, the end of a request proven by where its head's empty line is and its body's length, the
end of a body of plain bytes; the start of a head that came in earlier reads is kept) are parsed
again by a fresh parser fed up to each head's end in turn, and those come before the 400. When
in doubt, nothing is parsed again: bytes read out of their framing would be requests the client
never sent as such.

Every HTTP port of llmtap's (the gateway, the server, a worker's probe port) is a
`GuardedServer`: the gateway's directly, the others through `app_runner`.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from llmtap.redact import redact_text

#: The most bytes a request line and its headers may take (nginx allows 32 KiB by default; an
#: upstream behind Cloudflare, about as much): far above any real client, far below harm.
HEAD_MAX = 1024 * 1024

_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\nContent-Length: 45\r\n\r\nrequest headers larger than 1 MiB: not read\r\n"
)


#: Where aiohttp's parse errors begin to quote the request (`b'POST ...'`, `b"..."`).
_QUOTE = re.compile(r"""\bb['"]""")


def _messages_end(buf: bytes, messages: list[Any], auto_decompress: bool) -> int | None:
    """Where the requests that begin `buf` end, one after the other: each after its head's
    empty line, which llhttp takes as `\r\n\r\n` only and which no head holds before its end,
    and its body's bytes as they came. None when that is not known: a body chunked,
    compressed or still coming, or a request after the line breaks llhttp skips."""
    pos = 0
    for message, body in messages:
        if buf[pos : pos + 1] in (b"\r", b"\n"):
            return None
        head = buf.find(b"\r\n\r\n", pos)
        if head < 0:
            return None
        pos = head + 4
        if body is not EMPTY_PAYLOAD:
            if message.chunked or (auto_decompress and message.compression) or not body.is_eof():
                return None
            pos += body.total_bytes
    return pos if pos <= len(buf) else None


def _known_upgrade(message: Any) -> bool:
    """An upgrade aiohttp's parser switches for (and so keeps what follows), as its own rule."""
    return bool(message.method == "CONNECT" or message.headers.get("Upgrade", "").lower() == "websocket")


def _fail(found: list[Any], exc: Exception) -> None:
    """The bodies of `found` requests the parse again stopped in fail their reads with `exc`."""
    for _, body in found:
        if not body.is_eof():
            body.set_exception(exc)


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler, timing each request's headers and counting their bytes."""

    __slots__ = (
        "_armed_count", "_auto_decompress", "_body", "_body_bytes", "_discarding", "_head_bytes",
        "_header_timeout", "_header_timer", "_held", "_held_base", "_plain", "_since", "_upgrading",
    )  # fmt: skip

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._armed_count = 0
        self._head_bytes = 0  # received since the request's head began
        self._body_bytes = 0  # received since, while its body came (framing and trailers too)
        self._discarding = False  # refused: what still comes is dropped until the close
        self._body: StreamReader | None = None  # the last request's body, as it arrives
        self._auto_decompress: bool = kwargs.get("auto_decompress", True)
        # Where the parser stands, in bytes it holds of a head that began where a request
        # does (`[]`: it holds none), or None when not known (see `_settle`).
        self._since: list[bytes] | None = []
        self._plain = False  # the last request's body is Content-Length bytes as they came
        self._upgrading = False  # the last request is an upgrade whose body is still coming
        # A read that began clean and filled the queue: the parser keeps the rest of it back.
        self._held: bytes | None = None
        self._held_base = 0  # `_request_count` before it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # a connection that never sends a request is closed too

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        count = self._request_count
        read = data
        between = self._body is None or self._body.is_eof()  # the last request's body all came
        since = self._since if between else None
        if between:  # so this is a request's head: the first, or one pipelined behind another
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_MAX:  # refused before aiohttp's parser holds any of it
                self._refuse()
                return
        else:
            self._body_bytes += len(data)
            body_before = self._body.total_bytes if self._body is not None else 0
        super().data_received(data)
        if not between and self._body is not None and self._body.is_eof():
            # This read ended the body, and what came after it is the next request's head: it
            # counts toward HEAD_MAX (uncounted, a 1.2 MB head pipelined behind an upload was
            # held until the header timeout closed the connection, with no 431; a busy machine's
            # larger reads showed it). Chunk framing in this read is counted too: a bound, not a
            # measure.
            rest = len(data) - (self._body.total_bytes - body_before)
            if self._plain:  # the body is its bytes as they came: the next request follows them
                since, data = [], data[len(data) - rest :]
            if self._request_count == count:
                self._head_bytes = rest
                self._since, self._held = ([data] if data else []) if since is not None else None, None
                if self._head_bytes > HEAD_MAX:
                    self._refuse()
                    return
                if self._upgrading:
                    self._upgrade_body_ended(data if since is not None else None)
                    return
        if self._request_count != count:  # a request's headers are complete
            if not between and self._body is not None and not self._body.is_eof():
                fault = self._messages[-1][0] if self._messages else None
                if type(fault) is _ErrInfo:
                    # The body turned malformed (a chunk size that is no number): aiohttp queues
                    # its 400 behind the request being handled, whose read waited for the rest
                    # of the body until the client gave up (rev26). Its read fails now instead.
                    self._body.set_exception(fault.exc)
            self._head_bytes = self._body_bytes = 0
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            message, self._body = self._messages[-1] if self._messages else (None, None)
            # This read's bytes from where a request began (those of its head that came in
            # earlier reads first), or None when that place is not known.
            buf = None if since is None else (b"".join(since) + data if since else data)
            if type(message) is _ErrInfo:
                self._recover(buf, read, count)
            else:
                self._settle(buf, read, message, count)
                if self._upgraded:
                    self._decline_upgrade()
                elif message is not None and message.upgrade:  # type: ignore[union-attr]
                    self._after_upgrade(message)
        elif between:
            if data:  # part of a head: the parser holds it
                self._held = None
                if since is not None:
                    since.append(data)
            if self._header_timer is None and not self._request_in_progress:
                # The first bytes of the next request on a kept-alive connection: not more of the
                # last one's body (which may arrive before its handler starts, or after it answered).
                self._arm()
        elif self._body is not None:
            self._held = None  # more of a body the parser returned: bytes no longer held back
            # A chunked body's trailers are headers too (aiohttp holds them like a head's):
            # 57 MB of unfinished ones held 111 MB. What came beyond the body's own bytes past
            # the cap, and past the body itself (chunk framing is a few bytes a chunk), is no
            # upload: the request is cut off.
            extra = self._body_bytes - self._body.total_bytes
            if extra > HEAD_MAX and extra > self._body.total_bytes:
                self._discarding = True
                self.force_close()

    def _settle(self, buf: bytes | None, read: bytes, message: Any, count: int) -> None:
        """Where the parser stands after this read, which completed a request's head: at a
        request's start (`_since` is `[]`), holding the start of a head that began at one
        (`[those bytes]`), or unknown (None). Known, a read that follows can be parsed again
        should the parser fail in it. Proven from where the head's empty line is, never from
        how a read ends (rev28: a body's copy of a head's start after `\r\n\r\n` passed for
        the end of a request, and the next read, parsed alone, gave a request never sent)."""
        body = self._body
        if message is None or self._upgraded or message.should_close:  # no more requests parsed
            self._since, self._held, self._plain = None, None, False
            return
        self._plain = not message.chunked and not (self._auto_decompress and message.compression)
        if len(self._messages) >= self._max_msg_queue_size - 4:
            # The queue is (nearly) full: the parser may have stopped at a request's end and
            # kept the rest of the read back. A read that began where a request does is kept
            # (a reference) to parse again should the parser fail in that rest.
            self._since = None
            if self._held is not None:
                self._held = self._held + read if len(self._held) + len(read) <= HEAD_MAX else None
            elif buf:
                self._held, self._held_base = buf, count
            return
        held, self._held = self._held, None
        end = None
        new = self._request_count - count
        if buf is not None and 0 < new <= len(self._messages):
            queued = self._messages
            mine = [queued[i] for i in range(len(queued) - new, len(queued))]
            end = _messages_end(buf, mine, self._auto_decompress)
        if end is not None:
            self._since = [buf[end:]] if buf is not None and end < len(buf) else []
        elif body is EMPTY_PAYLOAD and not message.upgrade and (read or held or b"").endswith(b"\r\n\r\n"):
            self._since = []  # a head never holds an empty line: none is held
        else:
            self._since = None

    def _decline_upgrade(self) -> None:
        """No llmtap port switches protocols (no WebSocket): aiohttp holds what came after an
        upgrade request until it is answered, then parses it past this guard, which lost the
        requests in it before a fault (rev28). It is parsed now, as any pipelined bytes are."""
        tail, self._message_tail = self._message_tail, b""
        self._upgraded = False
        if self._parser is not None:
            self._parser.set_upgraded(False)
        self._since = []  # the tail begins where the upgrade request ended
        if tail:
            self.data_received(tail)

    def _after_upgrade(self, message: Any) -> None:
        """An upgrade aiohttp does not know (`Upgrade: h2c`, which `curl --http2` sends): its
        parser drops the rest of the read the request ends in, and the requests pipelined in
        it were never answered nor recorded, the client waiting for ever (rev28). That rest is
        parsed here when where it begins is known. A body still coming is waited for (its
        end is where the rest begins: `_upgrade_body_ended`). Not known, the requests parsed
        are answered, the upgrade request last, and the connection closes."""
        if self._body is not None and not self._body.is_eof():
            self._upgrading = True  # a WebSocket one too: aiohttp switches at the body's end
            return
        if _known_upgrade(message):
            # aiohttp's parser switches at its end, keeping what follows (`_decline_upgrade`),
            # also when it reaches it later, its queue of requests full (rev30: taken for an
            # unknown one, the requests after it were dropped)
            return
        since = self._since
        if since is None:
            self._discarding = True  # bytes after dropped ones are read out of their framing
            message, body = self._messages[-1]
            self._messages[-1] = (message._replace(should_close=True), body)
            return
        self._since = []
        if since:
            self.data_received(since[0])

    def _upgrade_body_ended(self, rest: bytes | None) -> None:
        """The body of an upgrade request ended in this read; `rest` is what followed it (None:
        not known, the body was chunked)."""
        self._upgrading = False
        if self._upgraded:
            self._decline_upgrade()
        elif rest is None:
            self.close()  # the requests after it are lost to aiohttp's parser: end it there
        else:
            self._since = []
            if rest:
                self.data_received(rest)

    def _recover(self, buf: bytes | None, read: bytes, count: int) -> None:
        """The parser failed in this read: the complete requests it parsed in the same read,
        before the fault, are lost with it (llhttp raises, and keeps them). Parsed again here,
        from where a request began, they are handled before the 400."""
        self._since = None
        held, self._held = self._held, None
        if held is not None:
            found = self._reparse(held + read, count - self._held_base)
        elif buf:
            found = self._reparse(buf, 0)
        else:
            return  # where the parser stood before this read is not known: nothing is certain
        if found:
            fault = self._messages.pop()
            self._messages.extend(found)
            self._messages.append(fault)
            self._request_count += len(found)

    def _held_requests(self, emitted: int) -> list[Any]:
        """The complete requests of the held read the parser lost to a fault after them, past
        the `emitted` it returned since the last read."""
        held, self._held = self._held, None
        if held is None:
            return []
        return self._reparse(held, self._request_count - self._held_base + emitted)

    def _reparse(self, data: bytes, skip: int) -> list[Any]:
        """The requests in `data` (which begins where a request does) up to a fault, past the
        first `skip`. A fresh parser is fed `data` cut after each empty line, so that every head
        is complete at the end of a call, which returns its request before the fault can take
        it; the request whose body the fault is in fails its read (rev27: a chunked body
        malformed in the read of its head got aiohttp's 400 and no record). Nothing unless it
        does fault (then the two parsers read `data` otherwise)."""
        if self._parser is None:  # the connection is gone
            return []
        parser = type(self._parser)(
            self, self._loop, self._read_bufsize,
            max_line_size=self.max_line_size, max_field_size=self.max_field_size,
            max_headers=self.max_headers, payload_exception=RequestPayloadError,
            auto_decompress=self._auto_decompress, max_msg_queue_size=0,
        )  # fmt: skip
        found: list[Any] = []
        seen = start = 0
        cut = -1  # where the next piece ends when it is known: an upgrade request's body's end
        try:
            for _ in range(4096):  # a bound on the work (pieces); and on the requests, below
                if start >= len(data) or seen > skip + 128:
                    break
                if cut >= 0:
                    end, cut = min(cut, len(data)), -1
                else:
                    end = data.find(b"\r\n\r\n", start)
                    end = len(data) if end < 0 else end + 4
                messages, upgraded, tail = parser.feed_data(data[start:end])
                for message in messages:
                    seen += 1
                    if seen > skip:
                        found.append(message)
                    head, body = message
                    if head.upgrade and body is not EMPTY_PAYLOAD:
                        # Its body ends the parser's parse of its piece (an upgrade it does not
                        # know drops the rest): the body is fed as a piece of its own.
                        size = head.headers.get("Content-Length", "")
                        if not head.chunked and size.isdigit():
                            cut = end + int(size)
                        elif not _known_upgrade(head):
                            _fail(found, BadHttpMessage("an upgrade request's chunked body: not read"))
                            return found
                if upgraded:  # declined (`_decline_upgrade`): what follows it is parsed on
                    parser.set_upgraded(False)
                    end -= len(tail)
                start = end
        except HttpProcessingError as e:
            _fail(found, e)  # the request the fault is in: its body turned malformed, so its
            return found  # handler answers 400 and records why
        return []

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """Stop within `timeout`, not twice it.

        aiohttp waits `timeout` for the request being handled, then cancels only its body and
        waits `timeout` again: a handler waiting on its upstream held the stop for twice
        `LLMTAP_SHUTDOWN_TIMEOUT`. Its task is cancelled once the first wait is over.
        """
        timer = None
        if timeout is not None and self._request_in_progress:
            timer = asyncio.get_running_loop().call_later(timeout, self._cancel_handler)
        try:
            await super().shutdown(timeout)
        finally:
            if timer is not None:
                timer.cancel()

    def _cancel_handler(self) -> None:
        # aiohttp's first wait ends here rather than in a race with its own timeout (at 5 s or
        # less both fire at once: the finished handler then set a result on the cancelled
        # waiter, "InvalidStateError" at ERROR on every such stop).
        waiter, self._handler_waiter = self._handler_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        task = self._task_handler
        if task is not None and not task.done():
            task.cancel()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._body = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse, without the request's bytes: its
        message quotes the offending line (`Authorization: Bearer sk-...` back to the client,
        whose SDK puts error bodies into exceptions and their logs). The reason stays."""
        if message and status != 500:
            # Each line up to where it quotes (`b'...`): "Got more than 8190 bytes ... b'<value>'".
            said = [_QUOTE.split(line, 1)[0].rstrip() for line in message.splitlines()]
            message = redact_text("\n".join(line for line in said if line.strip("^ ")).rstrip())
        return super().handle_error(request, status, exc, message)

    def _refuse(self) -> None:
        """Answer 431, and close once the client had time to read it: closing at once, with its
        headers still arriving, would reset the connection and lose the answer on the way."""
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._discarding = True
        self._refuse_when_idle()

    def _refuse_when_idle(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._waiter is None or self._messages:
            # Pipelined behind requests still being answered (aiohttp's loop waits for the
            # next one only when idle): a 431 now would land inside an answer, and closing
            # would drop the complete requests queued. They are answered first.
            self._loop.call_later(0.05, self._refuse_when_idle)
            return
        transport.write(_TOO_LARGE)
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(self._header_timeout, self.force_close)

    def _arm(self) -> None:
        self._armed_count = self._request_count
        self._header_timer = self._loop.call_later(self._header_timeout, self._expire)

    def _expire(self) -> None:
        self._header_timer = None
        # Bytes that arrived while a request was being handled (a body the handler did not
        # read, or a pipelined request) are not a slow client: aiohttp deals with those.
        if self._request_count == self._armed_count and not self._request_in_progress:
            self.force_close()


class GuardedServer(web.Server):
    """aiohttp's low-level server whose connections time their requests' headers."""

    #: The connection handler class (the gateway's also records requests it never handled).
    handler_class: type[GuardedHandler]

    def __init__(self, handler: Any, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.handler_class = GuardedHandler

    def __call__(self) -> RequestHandler:
        return self.handler_class(self, loop=self._loop, header_timeout=self.header_timeout, **self._kwargs)


class _AppRunner(web.AppRunner):
    """`web.AppRunner` whose server is a `GuardedServer`."""

    def __init__(self, app: web.Application, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return GuardedServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            header_timeout=self._header_timeout,
            **made._kwargs,
        )


def app_runner(app: web.Application, header_timeout: float, **kwargs: Any) -> web.AppRunner:
    """A runner for an `Application` (the server, a worker's probe) with the header deadline."""
    return _AppRunner(app, header_timeout=header_timeout, **kwargs)
