"""Every body store gives the same answers: round trip, overwrite, missing keys, delete.

The S3 case runs against the real S3-compatible server that scripts/services.sh starts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llmtap.bodies import BodyStore, body_key
from llmtap.errors import BackendUnavailable, TransientError


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
    items = [
        (body_key("acme", str(uuid.uuid4()), now, part), os.urandom(n))
        for n, part in [(0, "request"), (10, "response"), (300_000, "events")]
    ]
    refs = await store.put_many(items)
    assert len(refs) == len(items)
    for ref, (_, data) in zip(refs, items, strict=True):
        assert await store.get(ref) == data
    # idempotent re-write (at-least-once delivery writes bodies again)
    refs2 = await store.put_many(items)
    assert await store.get(refs2[1]) == items[1][1]
    assert await store.get(refs[1]) == items[1][1]
    assert await store.get(body_key("acme", "missing", now, "request")) is None
    await store.delete_many(refs + refs2)
    for ref in refs + refs2:
        assert await store.get(ref) is None


def test_keys_are_by_tenant_date_and_id() -> None:
    when = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert body_key("acme", "abc", when, "request") == "acme/2026/11/26/abc.request.zst"
    # a tenant name can never escape its prefix
    assert body_key("../etc", "abc", when, "request").startswith("_/etc/") or ".." not in body_key(
        "../etc", "abc", when, "request"
    )


@pytest.mark.s3
async def test_s3_unreachable_is_one_sentence() -> None:
    if _s3_env() is None:
        pytest.skip("LLMTAP_TEST_S3_* not set")
    s = _s3_store("x", endpoint="http://127.0.0.1:1")
    with pytest.raises(BackendUnavailable) as e:
        await s.connect()
    assert "127.0.0.1:1" in str(e.value) and "\n" not in str(e.value)
    s = _s3_store("x", url="s3://no-such-bucket-llmtap/x")
    with pytest.raises(BackendUnavailable, match="no-such-bucket-llmtap"):
        await s.connect()


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
    key = body_key("acme", str(uuid.uuid4()), datetime.now(UTC), "request")
    subprocess.run([str(script), "stop", "s3"], check=True, capture_output=True)
    try:
        with pytest.raises(TransientError):
            await s.put_many([(key, b"payload")])
    finally:
        subprocess.run([str(script), "start", "s3"], check=True, capture_output=True)
    await s.put_many([(key, b"payload")])
    assert await s.get(key) == b"payload"
    await s.close()
