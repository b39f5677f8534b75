"""The real `llmtap up` against bytes no well-behaved client sends (issue 7, items 1, 13, 15).

Raw sockets, because aiohttp, httpx and urllib refuse to send them. One stack per module:
`llmtap up` on embedded SQLite, the fake OpenAI upstream, and a raw upstream (at the Anthropic
route) whose response carries a header byte that is not UTF-8.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from procs import Proc, fake_upstream, get_record, http_json, running_up
from rawhttp import RawUpstream, exchange, request_bytes

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
ANTHROPIC = b'{"model":"claude-3-5-haiku-latest","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
ODD_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Odd-Upstream: caf\xe9 \xff\xfe\r\n"
    b"Content-Length: 2\r\n\r\n{}"
)


@dataclass
class Stack:
    gw_port: int
    api: str
    fake: str
    proc: Proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("hostile")
    raw_up = RawUpstream(ODD_RESPONSE)
    try:
        with (
            fake_upstream(tmp) as fake,
            running_up(tmp, openai_base_url=fake, anthropic_base_url=raw_up.url) as up,
        ):
            yield Stack(up.gw_port, up.api, fake, up.proc)
    finally:
        raw_up.close()


def _chat(
    stack: Stack, headers: list[tuple[bytes, bytes]], target: bytes = b"/openai/v1/chat/completions"
) -> str:
    """One raw chat call; returns the request id the gateway answered with (asserts it did)."""
    if not any(k.lower() == b"authorization" for k, _ in headers):
        headers = [(b"Authorization", b"Bearer sk-test"), *headers]
    ans = exchange(
        stack.gw_port,
        request_bytes(b"POST", target, [(b"Content-Type", b"application/json"), *headers], CHAT),
    )
    assert ans is not None and ans.status == 200, ans
    rid = ans.header("llmtap-request-id")
    assert rid, ans.headers
    return rid


def test_odd_bytes_in_any_header_are_stored_escaped_and_spare_the_batch(stack: Stack) -> None:
    """Before: one request header byte that is not UTF-8 made the record unencodable, and the
    publisher gave up the whole batch, normal neighbours included, while every client had its 200."""
    normal = [_chat(stack, [(b"X-Seq", str(i).encode())]) for i in range(3)]
    odd_forwarded = _chat(stack, [(b"X-Odd", b"caf\xff\xfe")])
    odd_llmtap = _chat(
        stack,
        [
            (b"Llmtap-User-Id", b"u\xff1"),
            (b"Llmtap-Session-Id", b"s\xc3\x28"),
            (b"Llmtap-Property-Feature", b"v\xe9"),
        ],
    )
    # An upstream whose response header is not UTF-8 (the Anthropic route goes to the raw one).
    ans = exchange(
        stack.gw_port,
        request_bytes(
            b"POST", b"/anthropic/v1/messages", [(b"Content-Type", b"application/json")], ANTHROPIC
        ),
    )
    assert ans is not None and ans.status == 200, ans
    odd_upstream = ans.header("llmtap-request-id")
    assert odd_upstream
    normal += [_chat(stack, [(b"X-Seq", str(i).encode())]) for i in range(3, 6)]

    for rid in normal:
        get_record(stack.api, rid, timeout=60)
    r = get_record(stack.api, odd_forwarded, timeout=60)
    assert r["request_headers"]["x-odd"] == "caf\\xff\\xfe"
    r = get_record(stack.api, odd_llmtap, timeout=60)
    # `Llmtap-*` values that are no UTF-8 are Latin-1, as Node's fetch sends `José` (clients audit)
    assert (r["user_id"], r["session_id"], r["properties"]) == ("u\xff1", "s\xc3(", {"feature": "v\xe9"})
    from llmtap.gateway.headers import LlmtapHeaders

    # ... in the RFC 8187 form too (rev22: 'é\\xe9' was stored)
    assert LlmtapHeaders([("Llmtap-Property-X", "UTF-8''%C3%A9\udce9")]).properties == {"x": "\xe9\xe9"}
    r = get_record(stack.api, odd_upstream, timeout=60)
    assert r["response_headers"]["x-odd-upstream"] == "caf\\xe9 \\xff\\xfe"
    assert "gave up" not in stack.proc.output()


QUERY_SECRETS = {
    "api%2Dkey": "QS-NEEDLE-1",
    "password": "QS-NEEDLE-2",
    "sig": "QS-NEEDLE-3",
    "secret": "QS-NEEDLE-4",
    "auth": "QS-NEEDLE-5",
    "signature": "QS-NEEDLE-6",
    "access_token": "QS-NEEDLE-7",
    "apiKey": "QS-NEEDLE-8",
    "code": "QS-NEEDLE-9",
    "api%252Dkey": "QS-NEEDLE-10",
}


def test_query_secrets_are_redacted_in_the_store_but_reach_the_upstream(stack: Stack) -> None:
    query = "&".join(f"{k}={v}" for k, v in QUERY_SECRETS.items()) + "&api-version=2024-10-21"
    rid = _chat(stack, [(b"X-Mark", b"qs-test")], f"/openai/v1/chat/completions?{query}".encode())
    r = get_record(stack.api, rid, timeout=60)
    blob = json.dumps(r)
    leaked = [v for v in QUERY_SECRETS.values() if v in blob]
    assert not leaked, r["target_url"]
    parsed = urllib.parse.urlsplit(r["target_url"])
    assert parsed.query.endswith("api-version=2024-10-21"), r["target_url"]
    assert parsed.query.count("=***") == len(QUERY_SECRETS), r["target_url"]
    # ... and the upstream got the query unchanged.
    status, body = http_json("GET", f"{stack.fake}/_fake/requests")
    assert status == 200
    hits = [q for q in body["requests"] if ["X-Mark", "qs-test"] in q["headers"]]
    assert len(hits) == 1
    assert all(f"{k}={v}" in json.dumps(hits[0]) for k, v in QUERY_SECRETS.items()), hits[0]


MALFORMED = [
    # A control character in Authorization: aiohttp's parser refuses the header.
    b"GET /openai/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer LOG-NEEDLE-1\x01x\r\n\r\n",
    # A raw non-ASCII byte in a query beside ?api-key=: aiohttp refuses the request line.
    b"GET /openai/v1/models?api-key=LOG-NEEDLE-2&x=\xc3\x28 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /openai/v1/chat/completions?key=LOG-NEEDLE-3\xff HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    # A header name that is not a token, holding a key.
    b"GET /openai/v1/models HTTP/1.1\r\nHost: x\r\nX-Api-K\xffey: LOG-NEEDLE-4\r\n\r\n",
    # A bare CR inside a key value.
    b"GET /openai/v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: LOG-NEEDLE-5\rtail\r\n\r\n",
    # Request line with an absurd method and a secret.
    b"G\x00T /openai/v1/models?token=LOG-NEEDLE-6 HTTP/1.1\r\nHost: x\r\n\r\n",
]


def test_malformed_requests_never_put_a_credential_in_the_log(stack: Stack) -> None:
    """Before: aiohttp logged a traceback quoting the raw request line or header, key included."""
    before = stack.proc.output()
    api_port = int(stack.api.rsplit(":", 1)[1])
    for port in (stack.gw_port, api_port):  # the gateway's port and the server's
        for data in MALFORMED:
            ans = exchange(port, data, timeout=30)
            assert ans is None or ans.status == 400, ans
    # aiohttp writes its log line (unbuffered stderr) before it sends the 400, so every line is
    # in the file by now.
    log = stack.proc.output()
    assert "LOG-NEEDLE" not in log, log[len(before) :]
    new = log[len(before) :]
    assert "Traceback" not in new, new
    assert new.count("rejected a malformed request") >= 2 * (len(MALFORMED) - 1), new  # one isn't logged
    assert stack.proc.alive()
    # Still healthy, still logging.
    rid = _chat(stack, [(b"Authorization", b"Bearer sk-live-after")])
    get_record(stack.api, rid, timeout=60)


def test_a_hostile_end_user_in_the_body_is_cut_cleaned_and_flagged_never_refused(stack: Stack) -> None:
    """The body's `user` becomes the user id without a header: a megabyte of it, NUL, a lone
    surrogate escape or a non-string is held to the same limits as the header's, and the call
    and its record go through."""
    from llmtap import limits

    cases = [  # the `user` member as a client's JSON writes it, and the user id stored
        (json.dumps("ü" * 5000).encode(), "ü" * (limits.MAX_ID_BYTES // 2)),
        (b'"a\\u0000b\\ud800c"', "a\ufffdb\ufffdc"),
        ('"\u202eevil ü"'.encode(), "\u202eevil ü"),  # raw UTF-8, a bidi override kept as text
        (b'{"id": "x"}', None),
        (b'["u"]', None),
        (b"null", None),
        (b'"   "', None),  # blank: no user, as a blank header
    ]
    for member, expected in cases:
        body = (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "user": '
            + member
            + b"}"
        )
        head = [(b"Authorization", b"Bearer sk-test"), (b"Content-Type", b"application/json")]
        ans = exchange(stack.gw_port, request_bytes(b"POST", b"/openai/v1/chat/completions", head, body))
        # (The fake refuses a lone surrogate with a 400, as OpenAI does: logged all the same.)
        assert ans is not None and ans.status in (200, 400), ans
        r = get_record(stack.api, ans.header("llmtap-request-id"), timeout=60)
        assert r["user_id"] == expected, (member[:40], r["user_id"])
        assert r["truncated"] == (["user_id"] if member == cases[0][0] else []), r["truncated"]


def test_metadata_beyond_the_limits_is_cut_and_flagged_never_refused(stack: Stack) -> None:
    """Issue 7 item 4: one request stored 6.6 MB of properties. Now the documented limits hold:
    the call goes through, the record is cut and says what was cut. (Within the 1 MiB a
    request's head may take: past it, the connection is answered 431, `test_header_timeout`.)"""
    from llmtap import limits

    props = [(f"Llmtap-Property-P{i:03d}".encode(), b"v" * 8_000) for i in range(100)]
    headers = [
        *props,
        (b"Llmtap-Property-" + b"N" * 1000, b"x"),
        (b"Llmtap-User-Id", "ü".encode() * 5000),  # cut at a character boundary
        (b"Llmtap-Session-Id", b"s" * 300),
        (b"X-Big", b"h" * 60_000),
    ]
    rid = _chat(stack, headers)
    r = get_record(stack.api, rid, timeout=60)
    assert sorted(r["truncated"]) == sorted(
        ["request_headers", "user_id", "session_id", "properties", "property_value"]
    ), r["truncated"]
    assert len(r["properties"]) == limits.MAX_PROPERTIES
    assert all(len(k.encode()) <= limits.MAX_PROPERTY_NAME_BYTES for k in r["properties"])
    assert all(len(v.encode()) <= limits.MAX_PROPERTY_VALUE_BYTES for v in r["properties"].values())
    assert r["user_id"] == "ü" * (limits.MAX_ID_BYTES // 2)
    assert r["session_id"] == "s" * limits.MAX_ID_BYTES
    assert len(r["request_headers"]["x-big"]) == limits.MAX_HEADER_VALUE_BYTES
    assert "llmtap-truncated" not in r["request_headers"]
    # A record within the limits says so.
    ok = get_record(stack.api, _chat(stack, [(b"Llmtap-Property-Feature", b"search")]), timeout=60)
    assert ok["truncated"] == [] and ok["properties"] == {"feature": "search"}
    # The list page holding it stays small: a few hundred KB at most, not megabytes.
    status, body = http_json("GET", f"{stack.api}/api/v1/requests?limit=50")
    assert status == 200 and any(i["id"] == rid for i in body["items"])
    assert len(json.dumps(body)) < 1_000_000


def test_credentials_in_user_session_and_property_values_are_stored_masked(stack: Stack) -> None:
    """rev26: a key, a `Bearer` token or a JWT sent as a user id, session id or property value
    was stored and served whole, where any other header holding it is dropped. Masked as `***`;
    the names, and ordinary values beside them, are kept."""
    key = b"sk-proj-Ab3dEf6hIj9lMn2pQr5tUv8xYz1Bc4De7Fg0Hi3Jk6Lm9No2Pq5"
    jwt = b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
    rid = _chat(
        stack,
        [
            (b"Llmtap-Property-Apikey", key),
            (b"Llmtap-Property-Note", b"Bearer abcdefSECRETPROP"),
            (b"Llmtap-Property-Feature", b"search"),
            (b"Llmtap-User-Id", b"sk-ant-api03-USERIDKEYAbCdEfGhIjKlMnOpQrStUv"),
            (b"Llmtap-Session-Id", jwt),
        ],
    )
    r = get_record(stack.api, rid, timeout=60)
    assert r["properties"] == {"apikey": "***", "note": "***", "feature": "search"}
    assert (r["user_id"], r["session_id"]) == ("***", "***")
    assert b"SECRETPROP" not in json.dumps(r).encode() and b"USERIDKEY" not in json.dumps(r).encode()
