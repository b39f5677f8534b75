"""Every body store gives the same answers: round trip, overwrite, missing keys, delete.

The S3 case runs against the real S3-compatible server that scripts/services.sh starts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from llmtap.bodies import BodyStore, body_key
from llmtap.errors import BackendUnavailable, ConfigError, NotDeleted, TransientError


def _s3_env() -> dict[str, str] | None:
    keys = (
        "LLMTAP_TEST_S3_ENDPOINT",
        "LLMTAP_TEST_S3_ACCESS_KEY",
        "LLMTAP_TEST_S3_SECRET_KEY",
        "LLMTAP_TEST_S3_BUCKET",
    )
    if not all(os.environ.get(k) for k in keys):
        return None
    return {k: os.environ[k] for k in keys}


def _s3_store(prefix: str, **over: str) -> BodyStore:
    from llmtap.bodies.s3 import S3BodyStore

    env = _s3_env()
    assert env
    return S3BodyStore(
        over.get("url", f"s3://{env['LLMTAP_TEST_S3_BUCKET']}/{prefix}"),
        endpoint=over.get("endpoint", env["LLMTAP_TEST_S3_ENDPOINT"]),
        access_key_id=env["LLMTAP_TEST_S3_ACCESS_KEY"],
        secret_access_key=env["LLMTAP_TEST_S3_SECRET_KEY"],
    )


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BodyStore]:
    if request.param == "file":
        from llmtap.bodies.file import FileBodyStore

        s: BodyStore = FileBodyStore(str(tmp_path / "bodies"))
    else:
        if _s3_env() is None:
            pytest.skip("LLMTAP_TEST_S3_* not set: run scripts/services.sh up")
        s = _s3_store(f"test-{uuid.uuid4().hex[:8]}")
    await s.connect()
    yield s
    await s.close()


async def test_round_trip_many(store: BodyStore) -> None:
    now = datetime.now(UTC)
    datas = [(os.urandom(n), part) for n, part in [(0, "request"), (10, "response"), (300_000, "events")]]
    items = [(body_key("acme", str(uuid.uuid4()), now, part, data), data) for data, part in datas]
    refs = await store.put_many(items)
    assert len(refs) == len(items)
    for ref, (_, data) in zip(refs, items, strict=True):
        assert await store.get(ref) == data
    # idempotent re-write (at-least-once delivery writes bodies again)
    refs2 = await store.put_many(items)
    assert await store.get(refs2[1]) == items[1][1]
    assert await store.get(refs[1]) == items[1][1]
    assert await store.get(body_key("acme", "missing", now, "request", b"")) is None
    await store.delete_many(refs + refs2)
    for ref in refs + refs2:
        assert await store.get(ref) is None


def test_keys_are_by_tenant_date_and_id() -> None:
    when = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    key = body_key("acme", "abc", when, "request", b"x")
    assert key.startswith("acme/2026/11/26/abc.request.") and key.endswith(".zst")
    # a tenant name can never escape its prefix, nor be a path step
    for tenant in ("../etc", "..", ".", "", "/", "a/../../b"):
        segments = body_key(tenant, "abc", when, "request", b"x").split("/")
        assert len(segments) == 5 and not any(s in ("", ".", "..") for s in segments), (tenant, segments)


#: Pairs the old sanitizer (`/` and `..` to `_`) mapped to one directory, and other lookalikes.
_LOOKALIKE_TENANTS = [
    ("grp/eu", "grp_eu"),
    ("a..b", "a_b"),
    ("x/y", "x%2Fy"),
    ("", "~"),
    ("", "_"),
    (".", "%2E"),
    ("T", "t"),
    ("\udc80", "\ufffd"),
    ("ü", "u\u0308"),
    ("p" * 200 + "1", "p" * 200 + "2"),
]


def test_key_segments_are_injective() -> None:
    from llmtap.bodies.base import key_segment

    seen: dict[str, str] = {}
    values = [v for pair in _LOOKALIKE_TENANTS for v in pair] + [chr(c) for c in range(0x250)]
    values += ["%" + chr(c) for c in range(0x80)] + ["~" * n for n in range(1, 4)]
    for value in values:
        seg = key_segment(value)
        assert seen.setdefault(seg, value) == value, f"{value!r} and {seen[seg]!r} share {seg!r}"
        assert "/" not in seg and "\\" not in seg and "\0" not in seg and 0 < len(seg) <= 120
        assert seg not in (".", "..")
    # very long values stay bounded (file names, S3 keys) and still distinct
    assert len(key_segment("é" * 100_000)) <= 120


@pytest.mark.parametrize("pair", _LOOKALIKE_TENANTS, ids=repr)
async def test_lookalike_tenants_never_share_a_body(store: BodyStore, pair: tuple[str, str]) -> None:
    """Tenants the old sanitizer mapped together write and read distinct bodies (small and large)."""
    when = datetime.now(UTC)
    rid = str(uuid.uuid4())
    for size in (10, 300_000):  # packed and single-file on the file store
        same = os.urandom(size)  # identical bytes too: the key must still differ by tenant
        items = [(body_key(t, rid, when, "request", same), same) for t in pair]
        assert items[0][0] != items[1][0]
        refs = await store.put_many(items)
        assert refs[0] != refs[1]
        await store.delete_many([refs[0]])  # one tenant's retention leaves the other's body
        assert await store.get(refs[1]) == same
        assert await store.get(refs[0]) is None


async def test_reused_request_id_never_overwrites_a_body(store: BodyStore) -> None:
    """A second request with the same id and another (large) body leaves the first one's body."""
    when = datetime.now(UTC)
    rid = str(uuid.uuid4())
    first, second = os.urandom(300_000), os.urandom(300_000)
    (ref1,) = await store.put_many([(body_key("acme", rid, when, "request", first), first)])
    (ref2,) = await store.put_many([(body_key("acme", rid, when, "request", second), second)])
    assert ref1 != ref2
    assert await store.get(ref1) == first
    assert await store.get(ref2) == second


async def test_any_request_id_names_a_body(store: BodyStore) -> None:
    """Slashes, dots, NUL, lone surrogates, 100 KB: every id the gateway accepts has a key."""
    when = datetime.now(UTC)
    for rid in ("../../etc/passwd", "a/b", "..", "", "nul\0id", "\udcff", "x" * 100_000, "ü/" * 5000):
        data = os.urandom(300_000)
        (ref,) = await store.put_many([(body_key("acme", rid, when, "response", data), data)])
        assert await store.get(ref) == data


@pytest.mark.s3
async def test_s3_unreachable_is_one_sentence() -> None:
    if _s3_env() is None:
        pytest.skip("LLMTAP_TEST_S3_* not set")
    s = _s3_store("x", endpoint="http://127.0.0.1:1")
    with pytest.raises(BackendUnavailable) as e:
        await s.connect()
    assert "127.0.0.1:1" in str(e.value) and "\n" not in str(e.value)
    s = _s3_store("x", url="s3://no-such-bucket-llmtap/x")  # S3 answers: a setting to fix
    with pytest.raises(
        ConfigError, match=r"^invalid setting LLMTAP_BODIES: .*no-such-bucket-llmtap.*no such bucket"
    ):
        await s.connect()


async def test_s3_reads_during_a_connect_that_then_fails_are_transient() -> None:
    """A server started during an S3 outage retries its connect while the API reads bodies: a
    read must not use the client a failing connect is about to close (it raised "'NoneType'
    object has no attribute 'get'" from inside aiobotocore), nor one not yet connected."""
    import asyncio

    pytest.importorskip("aiobotocore")
    from llmtap.bodies.s3 import S3BodyStore

    arrived = asyncio.Event()
    conns: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)  # accepts, never answers: the connect's HEAD hangs
        arrived.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    s = S3BodyStore("s3://b/p", endpoint=f"http://127.0.0.1:{port}", access_key_id="a", secret_access_key="b")
    key = body_key("acme", str(uuid.uuid4()), datetime.now(UTC), "request", b"")
    try:
        with pytest.raises(TransientError, match="not connected yet"):
            await s.get(key)
        connecting = asyncio.create_task(s.connect())
        await asyncio.wait_for(arrived.wait(), 60)  # the bucket check is on its way
        for call in (s.get(key), s.put_many([(key, b"x")]), s.delete_many([key])):
            with pytest.raises(TransientError, match="not connected yet"):
                await asyncio.wait_for(call, 60)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting
    finally:
        for w in conns:
            w.close()
        server.close()
        await s.close()


@pytest.mark.s3
@pytest.mark.slow
async def test_s3_outage_mid_run_is_transient_then_recovers() -> None:
    """Stop the real S3 server: writes raise TransientError (the worker retries), then work again."""
    import subprocess

    if _s3_env() is None:
        pytest.skip("LLMTAP_TEST_S3_* not set")
    script = Path(__file__).resolve().parents[1] / "scripts" / "services.sh"
    s = _s3_store("outage")
    await s.connect()
    key = body_key("acme", str(uuid.uuid4()), datetime.now(UTC), "request", b"")
    subprocess.run([str(script), "stop", "s3"], check=True, capture_output=True)
    try:
        with pytest.raises(TransientError):
            await s.put_many([(key, b"payload")])
    finally:
        subprocess.run([str(script), "start", "s3"], check=True, capture_output=True)
    await s.put_many([(key, b"payload")])
    assert await s.get(key) == b"payload"
    await s.close()


# -- through the whole pipeline: gateway, queue, worker, store, API ----------------------------------


def _bodies_env(kind: str) -> dict[str, str]:
    if kind == "file":
        return {}
    env = _s3_env()
    if env is None:
        pytest.skip("LLMTAP_TEST_S3_* not set: run scripts/services.sh up s3")
    return {
        "bodies": f"s3://{env['LLMTAP_TEST_S3_BUCKET']}/reuse-{uuid.uuid4().hex[:8]}",
        "s3_endpoint": env["LLMTAP_TEST_S3_ENDPOINT"],
        "s3_access_key_id": env["LLMTAP_TEST_S3_ACCESS_KEY"],
        "s3_secret_access_key": env["LLMTAP_TEST_S3_SECRET_KEY"],
    }


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_reused_request_id_serves_the_first_requests_metadata_and_body(kind: str, tmp_path: Path) -> None:
    """Two requests with one Llmtap-Request-Id and different large bodies: the record, and the
    body the API serves, are both the first request's.

    Incompressible bodies of two sizes take both upload paths: ~40 KB compressed travels inline
    in the queue message and the worker's body handler uploads it; ~400 KB is uploaded by the
    gateway itself (a file of its own on the file store). Before keys carried a digest of the
    bytes, the second request rewrote the first one's key (S3, file singles) while the first
    request's row stayed.
    """
    import base64

    from procs import fake_upstream, free_port, get_record, http_json, llmtap_env, start_llmtap, wait_http

    with fake_upstream(tmp_path) as upstream:
        gw, srv = free_port(), free_port()
        env = llmtap_env(
            tmp_path / "data",
            gateway_port=gw,
            server_port=srv,
            openai_base_url=upstream,
            partition_key="tenant",  # one ordered partition: the marker is stored after the second
            **_bodies_env(kind),
        )
        proc = start_llmtap("up", env, tmp_path / "up.log")
        try:
            wait_http(f"http://127.0.0.1:{gw}/healthz", 60)
            wait_http(f"http://127.0.0.1:{srv}/healthz", 60)
            for size in (40_000, 400_000):
                rid = str(uuid.uuid4())
                texts = [base64.b64encode(os.urandom(size)).decode() for _ in range(2)]
                for who, text in zip(("first", "second"), texts, strict=True):
                    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
                    headers = {
                        "authorization": "Bearer sk-upstream",
                        "llmtap-request-id": rid,
                        "llmtap-user-id": who,
                    }
                    status, _ = http_json(
                        "POST", f"http://127.0.0.1:{gw}/openai/v1/chat/completions", body, headers, timeout=60
                    )
                    assert status == 200
                    if who == "first":  # the first is stored before the second is sent
                        get_record(f"http://127.0.0.1:{srv}", rid, timeout=60)
                # a later request on the same partition: once it is stored, the second was handled
                marker = str(uuid.uuid4())
                status, _ = http_json(
                    "POST",
                    f"http://127.0.0.1:{gw}/openai/v1/chat/completions",
                    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "marker"}]},
                    {"authorization": "Bearer sk-upstream", "llmtap-request-id": marker},
                )
                assert status == 200
                get_record(f"http://127.0.0.1:{srv}", marker, timeout=60)
                row = get_record(f"http://127.0.0.1:{srv}", rid)
                assert row["user_id"] == "first"
                assert row["request_body"]["messages"][0]["content"] == texts[0], size
        finally:
            proc.stop()


def test_a_zstd_body_decodes_every_frame_and_no_more_than_the_limit() -> None:
    """The body-store review: a 16 KB frame of zeros declared 512 MB was decoded whole (6.9 GB
    for one API read); a body of two frames came back as its first, and a frame without its
    size in the header as "not valid zstd"."""
    import zstandard

    from llmtap.record import DECODE_LIMIT, compress, decompress

    one, two = compress(b"first " * 20), compress(b"second " * 10)
    assert decompress(one + two) == b"first " * 20 + b"second " * 10
    sizeless = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 5000)
    assert decompress(sizeless) == b"x" * 5000
    bomb = compress(bytes(256 << 20))  # ~8 KB
    assert len(bomb) < 64 << 10
    assert decompress(bomb, 1 << 20) == bytes(1 << 20)
    assert len(decompress(bomb)) == DECODE_LIMIT
    # Damaged: cut short (with or without its size in the header), or followed by bytes that
    # are no frame. An error (the API then says `missing`), never an empty or shorter body.
    for damaged in (one[:-10], one[:12], sizeless[:-10], one + b"trailing garbage", one + two[:-5],
                    sizeless + b"junk", b"not zstd at all"):  # fmt: skip
        with pytest.raises(zstandard.ZstdError):
            decompress(damaged)


async def test_s3_keys_a_delete_refused_one_by_one_are_not_taken_for_deleted() -> None:
    """The body-store review: DeleteObjects answers 200 and lists the keys it refused (access
    denied, a lock); retention logged them removed and they stayed for ever. The answer's shape
    is S3's documented one, handed over by a stand-in client (SeaweedFS refuses no key)."""
    from llmtap.bodies.s3 import S3BodyStore

    class Client:
        def __init__(self, errors: list[dict[str, str]]) -> None:
            self.errors = errors

        async def delete_objects(self, **kw: Any) -> dict[str, Any]:
            return {"Errors": self.errors} if self.errors else {}

    store = S3BodyStore("s3://b/p")
    store._client = Client([{"Key": "p/a", "Code": "AccessDenied", "Message": "Access Denied"}])
    with pytest.raises(NotDeleted, match=r"refused to delete 1 of 2 bodies \(AccessDenied") as e:
        await store.delete_many(["a", "b"])
    assert e.value.refs == ["a"] and isinstance(e.value, TransientError)
    store._client = Client([{"Key": "p/k0", "Code": "AccessDenied", "Message": "Access Denied"}])
    calls: list[int] = []
    real = store._client.delete_objects

    async def counted(**kw: Any) -> dict[str, Any]:
        calls.append(len(kw["Delete"]["Objects"]))
        return await real(**kw)

    store._client.delete_objects = counted
    with pytest.raises(NotDeleted):  # a refusal in the first 1,000 keys: the rest still sent
        await store.delete_many([f"k{i}" for i in range(2500)])
    assert calls == [1000, 1000, 500]
    store._client = Client([{"Key": "p/a", "Code": "NoSuchKey", "Message": "gone already"}])
    await store.delete_many(["a", "b"])  # gone is what was wanted


@pytest.mark.s3
async def test_s3_day_folders_before_a_day_go_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention's sweep on S3 (the file store removes whole day folders): bodies no row names
    any more (a reused id's second body, a delete that failed before a restart) stayed in the
    bucket for ever. Listings walk pages (two keys a page here); objects llmtap did not write,
    folders that are not days and another deployment's prefix are left alone."""
    import llmtap.bodies.s3 as s3

    if _s3_env() is None:
        pytest.skip("LLMTAP_TEST_S3_* not set: run scripts/services.sh up")
    monkeypatch.setattr(s3, "_PAGE", 2)
    run = uuid.uuid4().hex[:8]
    store, other = _s3_store(f"sweep-{run}"), _s3_store(f"sweep-{run}-other")
    await store.connect()
    await other.connect()
    try:
        day = datetime(2026, 3, 1, tzinfo=UTC).date()
        at = [datetime(2025, 12, 31, 23, tzinfo=UTC), datetime(2026, 2, 27, tzinfo=UTC),
              datetime(2026, 2, 28, 23, 59, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC),
              datetime(2026, 3, 2, tzinfo=UTC)]  # fmt: skip
        old_refs, kept_refs = [], []
        for tenant in ("acme", "globex", "grp/eu"):
            for when in at:
                items = [(body_key(tenant, f"r{i}", when, "request", b"%d" % i), b"x") for i in range(3)]
                refs = await store.put_many(items)
                (old_refs if when.date() < day else kept_refs).extend(refs)
        theirs = await other.put_many([(body_key("acme", "r", at[0], "request", b"x"), b"x")])
        env = _s3_env()
        assert env and isinstance(store, s3.S3BodyStore)
        client = store._connected()
        mine = ("acme/2025/12/31/notes.txt", "acme/2025/13/01/x.request.ab.zst",
                "acme/old/01/01/x.request.ab.zst", "readme.request.ab.zst")  # fmt: skip
        foreign = [f"sweep-{run}/{key}" for key in mine]
        for key in foreign:
            await client.put_object(Bucket=env["LLMTAP_TEST_S3_BUCKET"], Key=key, Body=b"theirs")
        assert await store.delete_days_before(day) == 3 * 3  # three tenants, three days each
        assert [await store.get(r) for r in old_refs] == [None] * len(old_refs)
        assert all([await store.get(r) for r in kept_refs]) and await other.get(theirs[0])
        for key in foreign:
            await client.head_object(Bucket=env["LLMTAP_TEST_S3_BUCKET"], Key=key)  # still there
        assert await store.delete_days_before(day) == 0  # nothing left to sweep
    finally:
        await store.close()
        await other.close()
