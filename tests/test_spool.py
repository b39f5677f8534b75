"""The disk spool keeps every appended record across a 'crash' and drops only torn frames."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmtap.gateway.spool import DiskSpool, SpoolFull


def test_append_replay_roundtrip(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path / "spool", max_bytes=10_000_000)
    values = [f"record-{i}".encode() * (i % 7 + 1) for i in range(1234)]
    spool.append(values[:1000])
    spool.append(values[1000:])
    got: list[bytes] = []
    for seg in spool.segments_for_replay():
        for batch in spool.replay(seg):
            got += batch
        spool.done(seg)
    assert got == values
    assert not spool.pending()
    assert spool.size() == 0


def test_new_process_sees_records_of_dead_one(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    writer = DiskSpool(d, max_bytes=10_000_000)
    writer.append([b"a", b"b", b"c"])
    # no close(): the process "died"; its lock goes with its fd
    os.close(writer._fd)  # type: ignore[arg-type]
    writer._fd = None
    reader = DiskSpool(d, max_bytes=10_000_000)
    got = [v for seg in reader.segments_for_replay() for batch in reader.replay(seg) for v in batch]
    assert got == [b"a", b"b", b"c"]


def test_torn_tail_is_dropped_rest_kept(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path / "spool", max_bytes=10_000_000)
    spool.append([b"first", b"second"])
    spool.close()
    (seg,) = spool.segments_for_replay()
    with open(seg, "ab") as f:
        f.write(b"\x00\x00\x00\x10\x12\x34")  # a frame header cut short, as a crash would leave
    got = [v for batch in spool.replay(seg) for v in batch]
    assert got == [b"first", b"second"]


def test_growing_segment_is_not_replayed_by_another_process(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    writer = DiskSpool(d, max_bytes=10_000_000)
    writer.append([b"x"])
    other = DiskSpool(d, max_bytes=10_000_000)
    segs = sorted(d.glob("*.spool"))
    assert [v for seg in segs for batch in other.replay(seg) for v in batch] == []
    writer.close()
    assert [v for seg in segs for batch in other.replay(seg) for v in batch] == [b"x"]


def test_full_spool_refuses(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path / "spool", max_bytes=100)
    spool.append([b"x" * 50])
    with pytest.raises(SpoolFull):
        spool.append([b"y" * 60])
