"""The file body store's own edges: atomic replace, safe keys, outages as TransientError."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from llmtap.bodies.file import FileBodyStore
from llmtap.errors import BackendUnavailable, TransientError


async def test_small_bodies_of_a_batch_share_one_pack_per_directory(tmp_path: Path) -> None:
    s = FileBodyStore(str(tmp_path / "b"))
    await s.connect()
    refs = await s.put_many(
        [
            ("t/2026/01/02/a.request.zst", b"one"),
            ("t/2026/01/02/b.request.zst", b"two"),
            ("u/2026/01/02/c.request.zst", b"three"),
        ]
    )
    files = sorted(
        p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    assert len(files) == 2 and all(f.endswith(".pack") for f in files)  # one per tenant/day, no temp files
    assert [await s.get(r) for r in refs] == [b"one", b"two", b"three"]
    assert refs[0].startswith("t/2026/01/02/") and "#" in refs[0]


async def test_large_body_gets_its_own_file_replaced_atomically(tmp_path: Path) -> None:
    from llmtap.bodies.file import PACK_MAX

    s = FileBodyStore(str(tmp_path / "b"))
    await s.connect()
    big1, big2 = os.urandom(PACK_MAX), os.urandom(PACK_MAX + 1)
    (ref,) = await s.put_many([("t/2026/01/02/a.request.zst", big1)])
    assert ref == "t/2026/01/02/a.request.zst"
    await s.put_many([("t/2026/01/02/a.request.zst", big2)])
    files = sorted(
        p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    assert files == ["t/2026/01/02/a.request.zst"]
    assert await s.get(ref) == big2


@pytest.mark.parametrize("ref", ["t/x.pack#1", "t/x.pack#a+b", "t/x.pack#-1+2"])
async def test_malformed_pack_refs_are_refused(tmp_path: Path, ref: str) -> None:
    s = FileBodyStore(str(tmp_path / "b"))
    await s.connect()
    with pytest.raises(ValueError):
        await s.get(ref)


async def test_a_ref_that_names_no_body_file_is_an_error_not_an_outage(tmp_path: Path) -> None:
    """A folder, a path through a file, a name too long: no retry can read them. They were
    `TransientError`s, which the chain retries for ever (a store outage), so one such record
    held back every record behind it; as `ValueError` it is dead-lettered with its reason."""
    s = FileBodyStore(str(tmp_path / "b"))
    await s.connect()
    (ref,) = await s.put_many([("t/2026/01/02/a.request.zst", b"x" * 100)])
    for bad in ("t/2026/01/02", "t/2026", f"{ref.partition('#')[0]}/x.zst", f"t/{'x' * 300}.zst"):
        with pytest.raises(ValueError) as e:
            await s.get(bad)
        assert not isinstance(e.value, TransientError), bad
    # ... but the store's own folder gone (a lost mount, a file in its place) is an outage.
    root = tmp_path / "b"
    root.rename(tmp_path / "away")
    root.write_bytes(b"")
    with pytest.raises(TransientError):
        await s.get(ref)


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
    (ref,) = await s.put_many([("t/2026/01/02/c.request.zst", b"2")])
    assert await s.get(ref) == b"2"


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
    (ref,) = await s.put_many([("t/x.events.zst", data)])
    assert await s.get(ref) == data
    await s.delete_many([ref, "t/missing.zst"])
    assert await s.get(ref) is None


async def test_large_batch_spread_over_threads_round_trips(tmp_path: Path) -> None:
    s = FileBodyStore(str(tmp_path / "b"))
    await s.connect()
    from llmtap.bodies.file import PACK_MAX

    items = [(f"t{i % 3}/2026/01/02/{i}.request.zst", os.urandom(i % 50)) for i in range(300)]
    items += [(f"t{i % 3}/2026/01/02/big{i}.request.zst", os.urandom(PACK_MAX + i)) for i in range(130)]
    refs = await s.put_many(items)
    for ref, (_, data) in zip(refs, items, strict=True):
        assert await s.get(ref) == data
    assert sum(1 for p in (tmp_path / "b").rglob("*") if p.is_file()) == 3 + 130


async def test_deleting_a_days_bodies_removes_the_folders_it_leaves_empty(tmp_path: Path) -> None:
    """Retention left an empty folder per day deleted (an outside soak)."""
    s = FileBodyStore(str(tmp_path / "b"))
    await s.connect()
    old = await s.put_many([("t/2026/11/02/a.request.zst", b"one"), ("t/2026/11/03/b.request.zst", b"two")])
    kept = await s.put_many([("t/2026/12/05/c.request.zst", b"three")])
    await s.delete_many(old)
    left = sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_dir())
    assert left == ["t", "t/2026", "t/2026/12", "t/2026/12/05"]
    assert await s.get(kept[0]) == b"three"
    again = await s.put_many([("t/2026/11/02/d.request.zst", b"four")])  # the folder is made again
    assert await s.get(again[0]) == b"four"
    await s.delete_many(again + kept)
    assert list((tmp_path / "b").iterdir()) == []  # the root stays
