"""Complete requests that arrive in the same read as a malformed one (the real `llmtap up`, raw
sockets). llhttp raises on the fault and keeps the requests it parsed before it in that read:
aiohttp queued only the 400, and they were never proxied nor recorded."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from procs import fake_upstream, list_records, running_up

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
BAD = b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"


@dataclass
class Stack:
    gw_port: int
    api: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("garbage")
    with fake_upstream(tmp) as fake, running_up(tmp, openai_base_url=fake) as up:
        yield Stack(up.gw_port, up.api)


def chat(rid: str, close: bool = False) -> bytes:
    return (
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer sk-test\r\nLlmtap-Request-Id: %s\r\n%sContent-Length: %d\r\n\r\n%s"
        % (rid.encode(), b"Connection: close\r\n" if close else b"", len(CHAT), CHAT)
    )


def send(port: int, data: bytes, *, read: bool = True) -> bytes:
    """`data` in one write; the answers, read to EOF (or none: the client hangs up at once)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(data)
        if not read:
            return b""
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def recorded(stack: Stack, ids: list[str], timeout: float = 30) -> set[str]:
    """Which of `ids` are stored, once all are or `timeout` passed."""
    deadline = time.monotonic() + timeout
    while True:
        found = {r["id"] for r in list_records(stack.api)} & set(ids)
        if found == set(ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


@pytest.mark.parametrize("n", [2, 10])
def test_requests_before_a_malformed_one_in_the_same_read_are_answered_and_recorded(
    stack: Stack, n: int
) -> None:
    """Before: one 400, no record."""
    rids = ids(n)
    answers = send(stack.gw_port, b"".join(chat(r) for r in rids) + BAD)
    assert answers.count(b"HTTP/1.1 200 ") == n, answers[:300]
    assert answers.count(b" 400 Bad Request\r\n") == 1, answers[-300:]
    assert recorded(stack, rids) == set(rids)


def test_a_request_with_connection_close_and_a_stray_byte_is_answered_and_recorded(stack: Stack) -> None:
    """Before: a 400 ("Data after `Connection: close`"), no record. The request ends the
    connection: its answer, and nothing after it."""
    [rid] = ids(1)
    answers = send(stack.gw_port, chat(rid, close=True) + b"x")
    assert answers.startswith(b"HTTP/1.1 200 ") and b" 400 " not in answers, answers[:300]
    assert recorded(stack, [rid]) == {rid}


def test_after_a_kept_alive_request_the_next_read_with_garbage_is_recovered(stack: Stack) -> None:
    """The first read ended where its request did (known from the read's own bytes), so the
    next one is parsed again on its own."""
    rids = ids(3)
    with socket.create_connection(("127.0.0.1", stack.gw_port), timeout=60) as s:
        s.sendall(chat(rids[0]))
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first[:300]
        time.sleep(0.2)  # the whole answer
        s.sendall(chat(rids[1]) + chat(rids[2]) + BAD)
        rest = b""
        while chunk := s.recv(65536):
            rest += chunk
    assert rest.count(b"HTTP/1.1 200 ") == 2 and rest.count(b" 400 Bad Request\r\n") == 1, rest[:300]
    assert recorded(stack, rids) == set(rids)


def test_pipelined_requests_the_parser_held_back_are_recorded_when_garbage_follows(stack: Stack) -> None:
    """40 requests and a malformed one in one write, and the client hangs up: the parser holds
    back what is past aiohttp's 32-request queue, and lost those to the fault (before: 34 of 40)."""
    rids = ids(40)
    send(stack.gw_port, b"".join(chat(r) for r in rids) + BAD, read=False)
    assert recorded(stack, rids) == set(rids)


def test_a_read_that_continues_a_head_is_never_parsed_again_on_its_own(stack: Stack) -> None:
    """The parser held the start of a head from the read before: parsed alone, this read would
    give a request the client never sent as one (its bytes end the held head). Only the 400."""
    first, smuggled = ids(2)
    with socket.create_connection(("127.0.0.1", stack.gw_port), timeout=60) as s:
        s.sendall(chat(first) + b"POST /openai/v1/chat/completions HTTP/1.1\r\nX-A: ")
        answers = s.recv(65536)
        time.sleep(0.2)
        s.sendall(b"\r\n\r\n" + chat(smuggled) + BAD)
        while chunk := s.recv(65536):
            answers += chunk
    assert answers.count(b"HTTP/1.1 200 ") == 1 and answers.count(b" 400 Bad Request\r\n") == 1, answers
    assert recorded(stack, [first]) == {first}
    assert recorded(stack, [smuggled], timeout=3) == set()


def upgrade(rid: str, protocol: bytes) -> bytes:
    return (
        b"GET /openai/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
        b"Connection: Upgrade\r\nUpgrade: %s\r\nLlmtap-Request-Id: %s\r\n\r\n" % (protocol, rid.encode())
    )


def pieces(port: int, reads: list[bytes]) -> bytes:
    """Each of `reads` in a write of its own, apart enough to be a read of its own; the answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, data in enumerate(reads):
            if i:
                time.sleep(0.3)
            s.sendall(data)
        answers = b""
        while chunk := s.recv(65536):
            answers += chunk
    return answers


def test_a_body_that_copies_a_heads_start_never_makes_the_next_read_parse_alone(stack: Stack) -> None:
    """Read 1: a chat whose body is a GET head's start, an empty line, that start again (the
    real next head, which the parser holds). It ends like a request and its body (rev28: taken
    for one, read 2 was parsed alone and its header lines made a POST never sent, proxied and
    recorded, and the GET the client sent was lost). Read 2 ends that GET's head (its lines
    look like a POST's) and body, then garbage: the GET is what is answered and recorded."""
    first, second = ids(2)
    start = b"GET /openai/v1/models HTTP/1.1\r\nX-Junk: "
    head = chat(first).split(b"\r\n\r\n", 1)[0].replace(b"Length: %d" % len(CHAT), b"Length: %d" % len(start))
    rest = (
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nLlmtap-Request-Id: %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (second.encode(), len(CHAT), CHAT)
    )
    answers = pieces(stack.gw_port, [head + b"\r\n\r\n" + start + b"\r\n\r\n" + start, rest + BAD])
    assert recorded(stack, [first, second]) == {first, second}, answers
    by_id = {r["id"]: r for r in list_records(stack.api)}
    assert (by_id[first]["method"], by_id[first]["path"]) == ("POST", "/v1/chat/completions")
    assert (by_id[second]["method"], by_id[second]["path"]) == ("GET", "/v1/models"), by_id[second]


@pytest.mark.parametrize("split", [10, 60, 200])
def test_a_head_split_across_reads_then_garbage_is_answered_and_recorded(stack: Stack, split: int) -> None:
    """The head began where a request does, in an earlier read: kept, it is parsed again with
    the read that fails (before: lost at every split inside the head)."""
    [rid] = ids(1)
    data = chat(rid)
    answers = pieces(stack.gw_port, [data[:split], data[split:] + BAD])
    assert answers.count(b"HTTP/1.1 200 ") == 1 and answers.count(b" 400 Bad Request\r\n") == 1, answers[:300]
    assert recorded(stack, [rid]) == {rid}


def test_a_request_after_a_body_that_spans_reads_then_garbage_is_answered_and_recorded(stack: Stack) -> None:
    """`Expect: 100-continue`: the head, then the body, the next request and garbage in one read.
    The next request begins where the body's bytes end (before: never answered, no record)."""
    first, second = ids(2)
    head, body = (
        chat(first).replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n").split(b"\r\n\r\n", 1)
    )
    answers = pieces(stack.gw_port, [head + b"\r\n\r\n", body + chat(second) + BAD])
    assert answers.count(b"HTTP/1.1 200 ") == 2 and answers.count(b" 400 Bad Request\r\n") == 1, answers[:600]
    assert recorded(stack, [first, second]) == {first, second}


@pytest.mark.parametrize("protocol", [b"foo", b"h2c"])
def test_requests_pipelined_behind_an_unknown_upgrade_are_answered_and_recorded(
    stack: Stack, protocol: bytes
) -> None:
    """aiohttp's parser drops the rest of a read after an upgrade it does not know (before: the
    two chats were never answered nor recorded, and the connection hung)."""
    rids = ids(3)
    answers = send(stack.gw_port, upgrade(rids[0], protocol) + chat(rids[1]) + chat(rids[2], close=True))
    assert answers.count(b"HTTP/1.1 200 ") == 3, answers[:600]
    assert recorded(stack, rids) == set(rids)


def test_requests_behind_a_declined_websocket_upgrade_are_recovered_from_garbage(stack: Stack) -> None:
    """aiohttp held what followed the upgrade request until it was answered, then parsed it past
    the guard: the chat before the garbage got no answer and no record."""
    rids = ids(2)
    answers = send(stack.gw_port, upgrade(rids[0], b"websocket") + chat(rids[1]) + BAD)
    assert answers.count(b"HTTP/1.1 200 ") == 2 and answers.count(b" 400 Bad Request\r\n") == 1, answers[:600]
    assert recorded(stack, rids) == set(rids)


H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"


@pytest.mark.parametrize("protocol", [b"h2c", b"websocket"])
def test_an_upgrade_requests_body_after_its_heads_read_is_read_and_answered(
    stack: Stack, protocol: bytes
) -> None:
    """What `curl --http2` sends over http://: an upgrade header on a POST. Its body came after
    the head's read (rev29: the connection was closed for reads at its head, the body never
    came, no answer, recorded as the client gone); then a chat behind it."""
    first, second = ids(2)
    data = chat(first).replace(
        b"Host: x\r\n", b"Host: x\r\nConnection: Upgrade\r\nUpgrade: %s\r\n" % protocol
    )
    cut = data.index(b"\r\n\r\n") + 4 + 10
    answers = pieces(stack.gw_port, [data[:cut], data[cut:] + chat(second, close=True)])
    assert answers.count(b"HTTP/1.1 200 ") == 2, answers[:600]
    assert recorded(stack, [first, second]) == {first, second}


def test_a_chunked_upgrade_request_malformed_in_the_read_is_answered_400_and_recorded(stack: Stack) -> None:
    """The parse again stopped at its head (rev29: its body was never fed nor failed: no answer)."""
    first, second = ids(2)
    bad = (
        chat(second).replace(b"Host: x\r\n", b"Host: x\r\n" + H2C).split(b"Content-Length")[0]
        + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n"
    )
    answers = send(stack.gw_port, chat(first) + bad)
    assert answers.startswith(b"HTTP/1.1 200 ") and b" 400 " in answers, answers[:600]
    assert recorded(stack, [first, second]) == {first, second}
    assert {r["id"]: r["status"] for r in list_records(stack.api)}[second] == 400


def test_an_unknown_upgrade_among_pipelined_requests_keeps_those_after_it(stack: Stack) -> None:
    """Where the rest of the read begins is proven past every request in it, not only one
    (rev29: the connection closed, and the chats before and after it were not answered)."""
    rids = ids(12)
    models = upgrade(rids[10], b"h2c")
    answers = send(stack.gw_port, b"".join(chat(r) for r in rids[:10]) + models + chat(rids[11], close=True))
    assert answers.count(b"HTTP/1.1 200 ") == 12, answers.count(b"HTTP/1.1 200 ")
    assert recorded(stack, rids) == set(rids)


@pytest.mark.parametrize("at", [31, 33])
def test_a_websocket_upgrade_past_the_request_queues_limit_keeps_those_after_it(
    stack: Stack, at: int
) -> None:
    """aiohttp's parser reaches it with its 32-request queue full, and reports the switch only
    later: taken for an upgrade it does not know, the requests after it were dropped (rev30:
    34 of 45 answered and recorded)."""
    rids = ids(45)
    data = b"".join(
        upgrade(r, b"websocket") if i == at else chat(r, close=i == len(rids) - 1) for i, r in enumerate(rids)
    )
    answers = send(stack.gw_port, data)
    assert answers.count(b"HTTP/1.1 200 ") == 45, answers.count(b"HTTP/1.1 200 ")
    assert recorded(stack, rids) == set(rids)
