"""Multi-tenant mode through a real `llmtap up`: keys made with the CLI map gateway traffic to
tenants; bad and revoked keys are refused before anything goes upstream; a client-chosen
request id is scoped to its tenant, so one tenant can never overwrite another's record."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from procs import (
    Proc,
    fake_upstream,
    free_port,
    get_record,
    http_json,
    llmtap_env,
    start_llmtap,
    wait_http,
    wait_until,
)


def _cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "llmtap.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("tenants")
    with fake_upstream(tmp) as upstream:
        gw, srv = free_port(), free_port()
        env = llmtap_env(
            tmp / "data",
            multi_tenant="true",
            gateway_port=gw,
            server_port=srv,
            openai_base_url=upstream,
            anthropic_base_url=upstream,
        )
        key_a = _cli(env, "keys", "create", "--tenant", "acme", "--name", "ci")
        key_b = _cli(env, "keys", "create", "--tenant", "globex")
        proc: Proc = start_llmtap("up", env, tmp / "up.log")
        try:
            wait_http(f"http://127.0.0.1:{gw}/healthz")
            wait_http(f"http://127.0.0.1:{srv}/healthz")
            yield {
                "gw": f"http://127.0.0.1:{gw}",
                "srv": f"http://127.0.0.1:{srv}",
                "upstream": upstream,
                "env": env,
                "a": key_a,
                "b": key_b,
            }
        finally:
            proc.stop()


def _chat(
    stack: dict[str, Any], key: str | None, rid: str | None = None, text: str = "hi"
) -> tuple[int, Any]:
    headers = {"authorization": "Bearer sk-upstream"}
    if key is not None:
        headers["llmtap-auth"] = f"Bearer {key}"
    if rid is not None:
        headers["llmtap-request-id"] = rid
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    return http_json("POST", f"{stack['gw']}/openai/v1/chat/completions", body, headers)


def _upstream_count(stack: dict[str, Any]) -> int:
    _, body = http_json("GET", f"{stack['upstream']}/_fake/requests")
    return len(body["requests"])


def test_keys_map_traffic_to_tenants_and_bad_keys_never_reach_upstream(stack: dict[str, Any]) -> None:
    before = _upstream_count(stack)
    for bad in (None, "lt_not-a-real-key", "garbage"):
        status, body = _chat(stack, bad)
        assert status == 401, body
    assert _upstream_count(stack) == before  # refused before anything went upstream

    rid = str(uuid.uuid4())
    status, _ = _chat(stack, stack["a"], rid)
    assert status == 200
    rec = get_record(stack["srv"], rid, headers={"authorization": f"Bearer {stack['a']}"})
    assert rec["tenant"] == "acme"
    # tenant B cannot see it
    status, _ = http_json(
        "GET", f"{stack['srv']}/api/v1/requests/{rid}", headers={"authorization": f"Bearer {stack['b']}"}
    )
    assert status == 404


def test_same_request_id_in_two_tenants_is_two_records(stack: dict[str, Any]) -> None:
    rid = str(uuid.uuid4())
    assert _chat(stack, stack["a"], rid, "from acme")[0] == 200
    assert _chat(stack, stack["b"], rid, "from globex")[0] == 200
    ra = get_record(stack["srv"], rid, headers={"authorization": f"Bearer {stack['a']}"})
    rb = get_record(stack["srv"], rid, headers={"authorization": f"Bearer {stack['b']}"})
    assert ra["request_body"]["messages"][0]["content"] == "from acme"
    assert rb["request_body"]["messages"][0]["content"] == "from globex"
    # and a second request of acme with that id does not replace acme's record
    assert _chat(stack, stack["a"], rid, "again")[0] == 200
    marker = str(uuid.uuid4())  # a later acme request: once it is stored, "again" was handled too
    assert _chat(stack, stack["a"], marker)[0] == 200
    get_record(stack["srv"], marker, headers={"authorization": f"Bearer {stack['a']}"})
    ra2 = get_record(stack["srv"], rid, headers={"authorization": f"Bearer {stack['a']}"})
    assert ra2["request_body"]["messages"][0]["content"] == "from acme"


def test_revoked_key_stops_working(stack: dict[str, Any]) -> None:
    env = stack["env"]
    key = _cli(env, "keys", "create", "--tenant", "initech")
    assert _chat(stack, key)[0] == 200
    listing = _cli(env, "keys", "list", "--tenant", "initech")
    key_id = listing.split()[0]
    _cli(env, "keys", "revoke", key_id)
    # another process revoked it: the gateway's key cache lives at most keys.CACHE_TTL seconds
    wait_until(lambda: _chat(stack, key)[0] == 401, timeout=10, what="revoked key refused")
    assert "revoked" in _cli(env, "keys", "list", "--tenant", "initech")


def test_two_different_keys_are_refused_and_an_underscore_key_never_goes_upstream(
    stack: dict[str, Any],
) -> None:
    """An outside check: with two `Llmtap-Auth` headers the last one won (a client could bill
    another tenant's key over its front proxy's), and `Llmtap_Auth` (which CGI-style stacks take
    for `Llmtap-Auth`) was sent to the provider, a tenant's key with it."""
    from rawhttp import exchange, request_bytes

    port = int(stack["gw"].rsplit(":", 1)[1])
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'

    def send(*headers: tuple[bytes, bytes]) -> Any:
        base = [(b"Authorization", b"Bearer sk-upstream"), (b"Content-Type", b"application/json")]
        return exchange(port, request_bytes(b"POST", b"/openai/v1/chat/completions", [*base, *headers], body))

    a, b = (f"Bearer {stack[k]}".encode() for k in ("a", "b"))
    before = _upstream_count(stack)
    got = send((b"Llmtap-Auth", a), (b"Llmtap-Auth", b))
    assert got is not None and got.status == 401 and b"two different Llmtap-Auth keys" in got.body, got
    assert _upstream_count(stack) == before  # refused before anything went upstream
    got = send((b"Llmtap-Auth", a), (b"llmtap-auth", a))  # the same key twice: one tenant
    assert got is not None and got.status == 200, got
    got = send((b"Llmtap-Auth", a), (b"Llmtap_Auth", b), (b"Llmtap_User_Id", b"u-underscore"))
    assert got is not None and got.status == 200, got
    _, seen = http_json("GET", f"{stack['upstream']}/_fake/requests")
    names = {k.lower() for k, _ in seen["requests"][-1]["headers"]}
    assert not {n for n in names if n.startswith(("llmtap-", "llmtap_"))}, names
    rec = get_record(
        stack["srv"], got.header("llmtap-request-id") or "", headers={"authorization": f"Bearer {stack['a']}"}
    )
    assert rec["tenant"] == "acme" and rec["user_id"] is None
    assert not [h for h in rec["request_headers"] if h.startswith("llmtap")], rec["request_headers"]


def test_requests_left_unhandled_by_a_client_that_hung_up_are_recorded_for_their_own_tenants(
    stack: dict[str, Any],
) -> None:
    """Requests pipelined behind one waiting on its upstream, the client gone before their turn:
    each is recorded for the tenant of its own key (`gateway.orphans`), none goes upstream, and
    an unknown key's is refused as it would have been: no record."""
    import socket

    port = int(stack["gw"].rsplit(":", 1)[1])
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    ids = {k: str(uuid.uuid4()) for k in ("slow", "a", "b", "bad")}

    def post(key: str, rid: str, *extra: bytes) -> bytes:
        return (
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-upstream\r\n"
            b"Content-Type: application/json\r\nLlmtap-Auth: Bearer " + key.encode() + b"\r\n"
            b"Llmtap-Request-Id: " + rid.encode() + b"\r\n" + b"".join(extra)
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )  # fmt: skip

    before = _upstream_count(stack)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            post(stack["a"], ids["slow"], b"x-fake-delay-ms: 60000\r\n")
            + post(stack["a"], ids["a"])
            + post(stack["b"], ids["b"])
            + post("lt_not-a-real-key", ids["bad"])
        )
        wait_until(lambda: _upstream_count(stack) == before + 1, timeout=30, what="the first one upstream")
    auth = {t: {"authorization": f"Bearer {stack[t]}"} for t in ("a", "b")}
    for rid, tenant, other in ((ids["slow"], "a", "b"), (ids["a"], "a", "b"), (ids["b"], "b", "a")):
        rec = get_record(stack["srv"], rid, headers=auth[tenant])
        assert rec["tenant"] == ("acme" if tenant == "a" else "globex")
        assert rec["outcome"] == "client_disconnected" and rec["status"] is None, rec
        assert http_json("GET", f"{stack['srv']}/api/v1/requests/{rid}", headers=auth[other])[0] == 404
    assert get_record(stack["srv"], ids["a"], headers=auth["a"])["error"] == (
        "client went away before the request was sent upstream"
    )
    for t in ("a", "b"):
        assert http_json("GET", f"{stack['srv']}/api/v1/requests/{ids['bad']}", headers=auth[t])[0] == 404
    assert _upstream_count(stack) == before + 1
