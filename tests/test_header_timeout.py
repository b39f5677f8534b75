"""Slow clients: `LLMTAP_HEADER_TIMEOUT` closes a connection whose request headers do not arrive.

A client that sends its headers a few bytes at a time used to hold its connection (and a file
descriptor) for as long as it kept sending, on the gateway and on the server. The real
`llmtap up` with a 2 s deadline, raw sockets: the slow header senders are cut off, and nothing
else is: a body sent slowly, a stream longer than the deadline, a kept-alive connection that
is quiet between two requests.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from procs import Up, fake_upstream, get_record, running_up

DEADLINE = 2.0
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
STREAM = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    tmp = tmp_path_factory.mktemp("slow")
    with fake_upstream(tmp) as fake, running_up(tmp, openai_base_url=fake, header_timeout=DEADLINE) as up:
        yield up


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _closed(s: socket.socket) -> bool:
    """Whether the server closed the connection (EOF or a reset), without waiting."""
    s.setblocking(False)
    try:
        return s.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    finally:
        s.setblocking(True)


def _dribble_until_closed(port: int, first: bytes, limit: float = 90) -> tuple[float, int]:
    """Send `first`, then one header byte every 0.2 s until the server closes the connection.

    Returns the seconds it stayed open and the header bytes sent; fails if it never closes."""
    s = _connect(port)
    start = time.monotonic()
    sent = 0
    try:
        s.sendall(first)
        while time.monotonic() - start < limit:
            if _closed(s):
                return time.monotonic() - start, sent
            try:
                s.sendall(b"X-Slow: " if sent % 20 == 0 else b"a" if sent % 20 < 19 else b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start, sent
            sent += 1
            time.sleep(0.2)
    finally:
        s.close()
    raise AssertionError(f"a client sending its headers one byte at a time kept its connection {limit} s")


#: Bytes read past a response, per socket: the next response's (a loaded client reads two at once).
_AHEAD: dict[socket.socket, bytes] = {}


def _read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length or chunked body."""
    status, headers, body, _AHEAD[s] = _parse_response(s, _AHEAD.pop(s, b""))
    return status, headers, body


def _parse_response(s: socket.socket, buf: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before the response headers: {buf!r}"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            chunk = s.recv(65536)
            assert chunk, "connection closed mid-body"
            rest += chunk
        return status, headers, rest[:n], rest[n:]
    body = b""
    while True:  # chunked
        while b"\r\n" not in rest:
            rest += s.recv(65536)
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        while len(rest) < size + 2:
            chunk = s.recv(65536)
            assert chunk, "connection closed mid-chunk"
            rest += chunk
        body, rest = body + rest[:size], rest[size + 2 :]
        if size == 0:
            return status, headers, body, rest


def _post(target: bytes, body: bytes, extra: bytes = b"") -> tuple[bytes, bytes]:
    head = (
        b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-test\r\n"
        b"Content-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )
    return head, body


@pytest.mark.parametrize("port_of", ["gateway", "server"])
def test_a_client_that_sends_its_headers_a_byte_at_a_time_is_cut_off(stack: Up, port_of: str) -> None:
    port = stack.gw_port if port_of == "gateway" else stack.api_port
    opened, sent = _dribble_until_closed(
        port, b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    )
    # Closed by the deadline, not by a header-size limit (20 bytes a line, 5 lines a second).
    assert opened >= DEADLINE - 0.5 and sent < 64 * 1024, (opened, sent)


def test_headers_past_one_mib_are_refused_431_and_a_big_but_sane_head_is_served(stack: Up) -> None:
    """An outside check: 1,000 header lines of 60 KB each (the gateway takes 1,024 lines of up to
    64 KiB), never finished, held 115 MB of the gateway's memory per connection, with no key
    asked for. Past 1 MiB the connection is now answered 431 and closed. (The server's port
    keeps aiohttp's 8 KiB lines: it refuses the first such line.)"""
    line = b"X-Big: " + b"a" * 60_000 + b"\r\n"
    s = _connect(stack.gw_port)
    got = b""
    sent = 0
    try:
        s.sendall(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        while sent < 64 * 1024 * 1024:  # far past the limit, if never cut
            try:
                s.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(line)
            s.setblocking(False)
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            finally:
                s.setblocking(True)
            got += chunk
            if not chunk or got.endswith(b"not read\r\n"):
                break
    finally:
        s.close()
    assert sent < 8 * 1024 * 1024, sent  # answered soon after 1 MiB, not at 64 MiB
    assert got.startswith(b"HTTP/1.1 431 ") and got.endswith(b"larger than 1 MiB: not read\r\n"), got[:200]
    head, body = _post(b"/openai/v1/chat/completions", CHAT, line * 15)  # 900 KB: big, but served
    with _connect(stack.gw_port) as s:
        s.sendall(head + body)
        status, _, answer = _read_response(s)
    assert status == 200, answer


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_a_head_pipelined_behind_a_request_in_progress_is_held_to_one_mib(stack: Up) -> None:
    """The review of the cap: it counted only while no request was being answered, so a head
    pipelined behind a slow one (every LLM call takes seconds) grew without bound again: 40 MB
    of it, 83 MB of the gateway's memory. Past 1 MiB it is now read and dropped; the request
    being answered is finished, and the connection closed after it."""
    head, body = _post(b"/openai/v1/chat/completions", CHAT, b"x-fake-delay-ms: 3000\r\n")
    line = b"X-Big: " + b"a" * 60_000 + b"\r\n"
    before = _rss(stack.proc.pid)
    s = _connect(stack.gw_port)
    sent = 0
    try:
        s.sendall(head + body + b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            while sent < 48 * 1024 * 1024:
                s.sendall(line)
                sent += len(line)
        except (BrokenPipeError, ConnectionResetError):
            pass
        grown = _rss(stack.proc.pid) - before
        status, _, answer = _read_response(s)  # the first request's answer, whole
        assert status == 200 and b"chat.completion" in answer, answer[:200]
        deadline = time.monotonic() + 60
        while not _closed(s):
            assert time.monotonic() < deadline, "the connection stayed open"
            time.sleep(0.1)
    finally:
        s.close()
    assert grown < 24 * 1024 * 1024, (grown, sent)  # not the ~2x of what was sent


def test_requests_pipelined_before_an_oversized_head_are_answered_then_431(stack: Up) -> None:
    """The second review: a complete request queued between one in progress and an oversized
    head was dropped unanswered (and unlogged) when the connection closed after the first."""
    slow, body = _post(b"/openai/v1/chat/completions", CHAT, b"x-fake-delay-ms: 1500\r\n")
    quick, _ = _post(b"/openai/v1/chat/completions", CHAT, b"Llmtap-User-Id: queued\r\n")
    # 2.4 MB: past HEAD_MAX by more than the one read a pipelined head may go uncounted
    big = b"POST /openai/v1/chat/completions HTTP/1.1\r\n" + (b"X-Big: " + b"a" * 60_000 + b"\r\n") * 40
    s = _connect(stack.gw_port)
    try:
        s.sendall(slow + body + quick + body + big)
        first = _read_response(s)
        second = _read_response(s)
        third = _read_response(s)
    finally:
        s.close()
    assert first[0] == 200 and second[0] == 200 and third[0] == 431, (first[0], second[0], third)
    rec = get_record(stack.api, second[1]["llmtap-request-id"], timeout=60)
    assert rec["user_id"] == "queued"


def test_a_flood_of_chunked_trailers_is_cut_off(stack: Up) -> None:
    """The second review: a chunked upload's trailers are headers aiohttp holds, and were not
    counted: 57 MB of unfinished ones held 111 MB of the gateway's memory. The request is cut
    off once what came beyond its body passes 1 MiB (and the body itself)."""
    before = _rss(stack.proc.pid)
    s = _connect(stack.gw_port)
    sent = 0
    try:
        s.sendall(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-t\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(CHAT):x}\r\n".encode() + CHAT + b"\r\n0\r\n"
        )
        line = b"X-Trailer: " + b"a" * 60_000 + b"\r\n"
        try:
            while sent < 48 * 1024 * 1024 and not _closed(s):
                s.sendall(line)
                sent += len(line)
        except (BrokenPipeError, ConnectionResetError):
            pass
        grown = _rss(stack.proc.pid) - before
    finally:
        s.close()
    assert sent < 48 * 1024 * 1024, "never cut off"
    assert grown < 24 * 1024 * 1024, (grown, sent)


def test_a_connection_that_never_sends_a_byte_is_closed(stack: Up) -> None:
    s = _connect(stack.gw_port)
    start = time.monotonic()
    try:
        s.settimeout(60)
        assert s.recv(1) == b""  # EOF, not the 60 s socket timeout
    finally:
        s.close()
    assert time.monotonic() - start >= DEADLINE - 0.5


def test_a_slow_body_a_long_stream_and_a_quiet_kept_alive_connection_are_not_cut(stack: Up) -> None:
    s = _connect(stack.gw_port)
    try:
        # 1. Headers at once, the body over three deadlines.
        head, body = _post(b"/openai/v1/chat/completions", CHAT, b"Llmtap-User-Id: slow-body\r\n")
        s.sendall(head)
        step = len(body) // 6 + 1
        for i in range(0, len(body), step):
            s.sendall(body[i : i + step])
            time.sleep(DEADLINE / 2)
        status, headers, answer = _read_response(s)
        assert status == 200, answer
        slow_body = headers["llmtap-request-id"]

        # 2. Quiet for two deadlines between requests on the same connection.
        time.sleep(DEADLINE * 2)
        assert not _closed(s)

        # 3. A stream that lasts longer than the deadline (10 chunks, 0.5 s apart).
        head, body = _post(
            b"/openai/v1/chat/completions", STREAM, b"x-fake-chunks: 10\r\nx-fake-chunk-delay-ms: 500\r\n"
        )
        s.sendall(head + body)
        started = time.monotonic()
        status, headers, answer = _read_response(s)
        assert status == 200 and answer.rstrip().endswith(b"data: [DONE]"), answer[-200:]
        assert time.monotonic() - started > DEADLINE
        stream = headers["llmtap-request-id"]
    finally:
        s.close()
    first = get_record(stack.api, slow_body, timeout=60)
    assert first["user_id"] == "slow-body" and first["status"] == 200 and first["outcome"] == "completed"
    second = get_record(stack.api, stream, timeout=60)
    assert second["streamed"] and second["outcome"] == "completed"


def test_the_gateway_serves_others_while_slow_clients_wait_to_be_cut_off(stack: Up) -> None:
    slow = [_connect(stack.gw_port) for _ in range(50)]
    try:
        for s in slow:
            s.sendall(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
        head, body = _post(b"/openai/v1/chat/completions", CHAT)
        with _connect(stack.gw_port) as s:
            s.sendall(head + body)
            status, _, _ = _read_response(s)
        assert status == 200
        deadline = time.monotonic() + 60
        while not all(_closed(s) for s in slow):
            assert time.monotonic() < deadline, "slow clients still connected 60 s later"
            time.sleep(0.2)
    finally:
        for s in slow:
            s.close()


async def test_a_body_that_arrives_before_its_handler_runs_arms_no_deadline() -> None:
    """An outside review: body bytes parsed before aiohttp's handler task started (or after it
    answered) armed the header deadline, so an idle kept-alive connection was closed after
    `LLMTAP_HEADER_TIMEOUT` instead of aiohttp's keep-alive. The connection is driven byte by byte
    here (the two `data_received` calls that the network may or may not deliver apart)."""
    import asyncio

    from aiohttp import web

    from llmtap.headertimeout import GuardedServer

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.closed, self.out = False, b""

        def write(self, data: Any) -> None:
            self.out += bytes(data)

        def writelines(self, chunks: Any) -> None:
            self.out += b"".join(chunks)

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("127.0.0.1", 1) if name == "peername" else default

        def get_write_buffer_size(self) -> int:
            return 0

    async def handler(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    server = GuardedServer(handler, header_timeout=0.3, keepalive_timeout=3600)
    conn, transport = server(), Transport()
    conn.connection_made(transport)
    conn.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    conn.data_received(b"x" * 10)  # before the handler task ran
    deadline = time.monotonic() + 30
    while b"200 OK" not in transport.out:
        assert time.monotonic() < deadline, "no answer"
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.0)  # idle, kept alive, longer than the header deadline
    assert not transport.closed
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n")  # the next request's headers, half of them
    while not transport.closed:
        assert time.monotonic() < deadline, "half-sent headers were not cut off"
        await asyncio.sleep(0.05)
    conn.connection_lost(None)
