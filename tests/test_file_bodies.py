"""The file body store's own edges: atomic replace, safe keys, outages as TransientError."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from llmtap.bodies.file import FileBodyStore
from llmtap.errors import BackendUnavailable, TransientError


async def test_writes_leave_no_temporary_files_and_replace_atomically(tmp_path: Path) -> None:
    s = FileBodyStore(str(tmp_path / "b"))
    await s.connect()
    await s.put_many([("t/2026/01/02/a.request.zst", b"one"), ("t/2026/01/02/b.request.zst", b"two")])
    await s.put_many([("t/2026/01/02/a.request.zst", b"one again")])
    files = sorted(
        p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    assert files == ["t/2026/01/02/a.request.zst", "t/2026/01/02/b.request.zst"]
    assert await s.get("t/2026/01/02/a.request.zst") == b"one again"


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../x", "a//b", "", "a/./b", "a\\b"])
async def test_keys_cannot_leave_the_root(tmp_path: Path, key: str) -> None:
    s = FileBodyStore(str(tmp_path / "b"))
    await s.connect()
    with pytest.raises(ValueError):
        await s.put_many([(key, b"x")])
    with pytest.raises(ValueError):
        await s.get(key)


async def test_directory_removed_behind_our_back_is_recreated(tmp_path: Path) -> None:
    s = FileBodyStore(str(tmp_path / "b"))
    await s.connect()
    await s.put_many([("t/2026/01/02/a.request.zst", b"1")])
    shutil.rmtree(tmp_path / "b" / "t")
    await s.put_many([("t/2026/01/02/c.request.zst", b"2")])
    assert await s.get("t/2026/01/02/c.request.zst") == b"2"


async def test_unusable_root_is_one_sentence_and_write_failure_is_transient(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(BackendUnavailable) as e:
        await FileBodyStore(str(blocker / "b")).connect()
    assert "\n" not in str(e.value) and str(blocker) in str(e.value)
    s = FileBodyStore(str(tmp_path / "b"))
    await s.connect()
    (tmp_path / "b" / "t").write_text("a file where a directory should be")
    with pytest.raises(TransientError):
        await s.put_many([("t/2026/01/02/a.request.zst", b"1")])


async def test_fsync_mode_round_trips(tmp_path: Path) -> None:
    s = FileBodyStore(str(tmp_path / "b"), fsync=True)
    await s.connect()
    data = os.urandom(100_000)
    await s.put_many([("t/x.events.zst", data)])
    assert await s.get("t/x.events.zst") == data
    await s.delete_many(["t/x.events.zst", "t/missing.zst"])
    assert await s.get("t/x.events.zst") is None


async def test_large_batch_spread_over_threads_round_trips(tmp_path: Path) -> None:
    s = FileBodyStore(str(tmp_path / "b"))
    await s.connect()
    items = [(f"t{i % 3}/2026/01/02/{i}.request.zst", os.urandom(i % 50)) for i in range(300)]
    await s.put_many(items)
    for key, data in items:
        assert await s.get(key) == data
    assert sum(1 for p in (tmp_path / "b").rglob("*") if p.is_file()) == 300
