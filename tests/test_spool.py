"""The disk spool keeps every appended record across a 'crash' and drops only torn frames."""

from __future__ import annotations

import os
import time
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


def test_a_clock_stepped_back_still_replays_segments_in_the_order_they_were_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock audit: a gateway whose clock was stepped back an hour named its new segment
    before the older ones, so a request id logged by both kept the second copy, not the first."""
    d = tmp_path / "spool"
    first = DiskSpool(d, max_bytes=10_000_000)
    first.append([b"first"])
    first.close()  # that gateway stopped; the next one starts with the clock an hour behind
    now = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: now - 3600 * 10**9)
    second = DiskSpool(d, max_bytes=10_000_000)
    second.append([b"second"])
    second.close()
    second.append([b"third"])  # and again within one process
    got = [v for seg in second.segments_for_replay() for batch in second.replay(seg) for v in batch]
    assert got == [b"first", b"second", b"third"]


def test_two_writers_of_one_pid_naming_the_same_stamp_keep_both_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deploy audit: containers sharing a spool volume are all pid 1; two that name the
    same stamp at once (clocks behind the newest segment) made one name, and the second
    rename replaced the first's segment while it was being written."""
    d = tmp_path / "spool"
    monkeypatch.setattr(os, "getpid", lambda: 1)
    monkeypatch.setattr(DiskSpool, "_next_stamp", lambda self: 101)  # the race, made certain
    one, two = DiskSpool(d, max_bytes=10_000_000), DiskSpool(d, max_bytes=10_000_000)
    one.append([b"from one"])
    two.append([b"from two"])
    one.append([b"one again"])
    one.close()
    two.close()
    got = {v for seg in one.segments_for_replay() for batch in one.replay(seg) for v in batch}
    assert got == {b"from one", b"from two", b"one again"}


def test_torn_tail_is_dropped_rest_kept(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path / "spool", max_bytes=10_000_000)
    spool.append([b"first", b"second"])
    spool.close()
    (seg,) = spool.segments_for_replay()
    with open(seg, "ab") as f:
        f.write(b"\x00\x00\x00\x10\x12\x34")  # a frame header cut short, as a crash would leave
    got = [v for batch in spool.replay(seg) for v in batch]
    assert got == [b"first", b"second"]
    assert spool.unreadable_bytes == 6  # said and kept: a file cut short by hand looks the same


def test_a_segment_cut_short_by_hand_says_its_lost_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The queue audit cut a closed segment 50 bytes into its 75th frame: 25 records that had
    been written and acknowledged vanished without a line, read as a crash's torn tail."""
    spool = DiskSpool(tmp_path / "spool", max_bytes=10_000_000)
    values = [b"record-%03d" % i * 20 for i in range(100)]
    spool.append(values)
    spool.close()
    (seg,) = spool.segments_for_replay()
    cut = sum(8 + len(v) for v in values[:74]) + 50
    os.truncate(seg, cut)
    got = [v for batch in spool.replay(seg) for v in batch]
    assert got == values[:74]
    (line,) = [r.getMessage() for r in caplog.records if "spool:" in r.getMessage()]
    assert "ends in 50 bytes that are not a whole record" in line and "cut short" in line, line
    assert spool.unreadable_bytes == 50 and len(list((tmp_path / "spool" / "corrupt").iterdir())) == 1
    # Read again (a replay cut short by an outage starts the segment over): said once, counted
    # once (rev13: 17 lines in 20 s, the count growing at each).
    for _ in range(3):
        assert [v for batch in spool.replay(seg) for v in batch] == values[:74]
    assert len([r for r in caplog.records if "spool:" in r.getMessage()]) == 1
    assert spool.unreadable_bytes == 50


@pytest.mark.parametrize("damage", ["flipped", "zeroed"])
def test_a_corrupt_frame_costs_its_own_records_not_those_after_it(tmp_path: Path, damage: str) -> None:
    """A disk error mid-segment (a flipped bit, a zeroed block) lost every frame after it."""
    spool = DiskSpool(tmp_path / "spool", max_bytes=10_000_000)
    values = [b'{"id": "r-%d", "pad": "%s"}' % (i, b"x" * (i % 50)) for i in range(300)]
    spool.append(values[:100])
    spool.append(values[100:200])
    spool.append(values[200:])
    spool.close()
    (seg,) = spool.segments_for_replay()
    data = bytearray(seg.read_bytes())
    at = data.index(b'"r-150"')
    if damage == "flipped":
        data[at] ^= 0x01
    else:
        data[at - 20 : at + 4000] = bytes(4020)
    seg.write_bytes(bytes(data))
    got = [v for batch in spool.replay(seg) for v in batch]
    lost = [v for v in values if v not in got]
    assert got == [v for v in values if v not in lost]  # the rest, in order
    assert 1 <= len(lost) <= (1 if damage == "flipped" else 150) and values[150] in lost
    assert values[-1] in got
    kept = list((tmp_path / "spool" / "corrupt").iterdir())
    assert len(kept) == 1 and spool.unreadable_bytes == kept[0].stat().st_size > 0
    if damage == "flipped":  # exactly the damaged frame, for whoever reads it by hand
        assert kept[0].read_bytes()[8:] == values[150].replace(b'"r-', b"#r-")


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


def test_a_segment_deleted_between_listing_and_stat_does_not_fail_an_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found live (`bench/memory_bench.py`, 62 records lost): the replayer deleted a segment
    it had just replayed while an append was summing the spool's size, and the append failed
    with FileNotFoundError. Here the listing names a segment that is gone by its `stat`."""
    d = tmp_path / "spool"
    spool = DiskSpool(d, max_bytes=10_000_000)
    spool.append([b"first"])
    listed = Path.glob

    def glob_with_a_ghost(self: Path, pattern: str):  # type: ignore[no-untyped-def]
        yield from listed(self, pattern)
        if self == d:
            yield d / "00000000000000000001-1-000001.spool"  # replayed and deleted meanwhile

    monkeypatch.setattr(Path, "glob", glob_with_a_ghost)
    spool.append([b"second"])
    assert spool.size() > 0
    monkeypatch.undo()
    got = [v for seg in spool.segments_for_replay() for batch in spool.replay(seg) for v in batch]
    assert got == [b"first", b"second"]


def test_appends_and_replays_on_two_threads_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's sink thread appends while the replayer's thread replays and deletes
    segments (small ones here, so they rotate and vanish often): every value comes out once."""
    import threading

    import llmtap.gateway.spool as spool_module

    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 2048)
    spool = DiskSpool(tmp_path / "spool", max_bytes=100_000_000)
    values = [f"value-{i:06d}".encode() * 4 for i in range(6000)]
    errors: list[BaseException] = []
    writing = True

    def write() -> None:
        nonlocal writing
        try:
            for i in range(0, len(values), 20):
                spool.append(values[i : i + 20])
        except BaseException as e:  # reported below
            errors.append(e)
        finally:
            writing = False

    got: list[bytes] = []
    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 60
    while writing or spool.pending():
        assert time.monotonic() < deadline, "the spool never drained"
        for seg in spool.segments_for_replay():
            frames = [v for batch in spool.replay(seg) for v in batch]
            if frames:  # as `SpoolReplayer`: nothing read is a segment still written (locked)
                got += frames
                spool.done(seg)
    writer.join()
    assert errors == []
    assert sorted(got) == sorted(values) and len(got) == len(values)


FULL_DISK = """
import json, pathlib, resource, signal, sys
from llmtap.gateway.spool import DiskSpool

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
spool = DiskSpool(pathlib.Path(sys.argv[1]), max_bytes=10**9)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
kept, failed = [], 0


def batch(i):
    return [f"batch-{i}-record-{j}-".encode() * 40 for j in range(3)]  # ~2.4 KB


def append(i):
    global failed
    try:
        spool.append(batch(i))
        kept.extend(v.decode() for v in batch(i))
    except OSError:
        failed += 1


resource.setrlimit(resource.RLIMIT_FSIZE, (10, hard))  # full at once: the first write fails
append(0)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # full part-way through a batch
for i in range(1, 20):
    append(i)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space again
for i in range(20, 25):
    append(i)
print(json.dumps({"kept": kept, "failed": failed}))
"""


def test_a_full_disk_leaves_no_torn_frame_before_later_records_and_no_empty_segments(tmp_path: Path) -> None:
    """A soak on a full tmpfs (an outside check) left an empty segment per failed attempt, and a
    write cut short by the full disk left a torn frame that the next batch, once there was space
    again, was appended after: a replay stops at a torn frame, so those records were lost. The
    disk is made full for real here, by the process's file-size limit."""
    import json
    import subprocess
    import sys

    d = tmp_path / "spool"
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(d)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["failed"] > 1 and len(result["kept"]) > 15  # some batches failed, later ones not
    reader = DiskSpool(d, max_bytes=10**9)
    segments = reader.segments_for_replay()
    assert all(seg.stat().st_size > 0 for seg in segments), [seg.stat().st_size for seg in segments]
    got = [v.decode() for seg in segments for batch in reader.replay(seg) for v in batch]
    assert got == result["kept"]  # every batch it said it kept, in order, and nothing else


def test_an_empty_segment_left_behind_is_removed_by_the_replay(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    d.mkdir()
    (d / "00000000000000000001-1-000001.spool").touch()  # left by a version before the fix
    spool = DiskSpool(d, max_bytes=10_000_000)
    assert [list(spool.replay(seg)) for seg in spool.segments_for_replay()] == [[]]
    assert not spool.pending()


def test_a_replayer_in_another_process_never_deletes_a_segment_being_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outside review: a replayer that removes empty unlocked segments (left by a full disk)
    could take one between the writer's `open` and its `flock`; the writer then appended, and
    fsynced, to a deleted file. Segments rotate at every append here, and the replayer is a
    spool of its own on the same directory (as a second gateway's would be)."""
    import threading

    import llmtap.gateway.spool as spool_module

    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 1)  # every append opens a new segment
    writer_spool = DiskSpool(tmp_path / "spool", max_bytes=10**9)
    reader = DiskSpool(tmp_path / "spool", max_bytes=10**9)
    values = [f"value-{i:06d}".encode() for i in range(3000)]
    writing = True

    def write() -> None:
        nonlocal writing
        try:
            for v in values:
                writer_spool.append([v])
        finally:
            writing = False

    got: list[bytes] = []
    thread = threading.Thread(target=write)
    thread.start()
    deadline = time.monotonic() + 120
    while writing:
        assert time.monotonic() < deadline, "the writer never finished"
        for seg in sorted((tmp_path / "spool").glob("*.spool")):
            frames = [v for batch in reader.replay(seg) for v in batch]
            if frames:
                got += frames
                reader.done(seg)
    thread.join()
    writer_spool.close()
    for seg in reader.segments_for_replay():
        got += [v for batch in reader.replay(seg) for v in batch]
    assert sorted(got) == values


def test_the_oldest_segment_says_how_long_it_has_waited(tmp_path: Path) -> None:
    """`llmtap_gateway_spool_oldest_seconds`: a replay that makes no progress is seen by it."""
    spool = DiskSpool(tmp_path / "spool", max_bytes=10_000_000)
    assert spool.stats() == (0, 0, 0.0)
    spool.append([b"a"])
    spool.close()
    spool.append([b"b"])
    spool.close()
    first = sorted((tmp_path / "spool").glob("*.spool"))[0]
    os.utime(first, (time.time() - 600, time.time() - 600))
    held = spool.write_segment([b"waits"])  # rewritten at each try: its bytes say it waits
    os.utime(held, (time.time() - 900, time.time() - 900))
    total, held_bytes, oldest = spool.stats()
    assert total == spool.size() and 0 < held_bytes < total and 599 < oldest < 700


def test_what_is_no_segment_in_the_spool_holds_neither_the_replay_nor_the_figures(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """rev20, rev21: a link loop, a directory or a FIFO named like a segment (sorted first)
    failed every replay for ever, so every record spooled after it waited on disk; the FIFO
    held the replay's thread, and the process's stop, in `open`. They are no segments now: the
    real ones replay, and the figures count those only. A segment that cannot be read is said
    once, and the others go on."""
    d = tmp_path / "spool"
    spool = DiskSpool(d, max_bytes=10_000_000)
    spool.append([b"a", b"b"])
    spool.close()
    spool.append([b"c"])
    spool.close()
    real = spool.size()
    (d / "0-loop.spool").symlink_to("0-loop.spool")
    (d / "1-dir.spool").mkdir()
    os.mkfifo(d / "2-fifo.spool")
    (d / "3-link.spool").symlink_to(next(iter(spool.segments_for_replay())))  # no copy of a segment
    (d / "._0.spool").write_bytes(b"\x00\x05\x16\x07")  # macOS's metadata on a shared volume (rev22)
    assert spool.stats()[0] == real and spool.size() == real
    got = [v for seg in spool.segments_for_replay() for batch in spool.replay(seg) for v in batch]
    assert got == [b"a", b"b", b"c"]
    # A segment whose bytes cannot be read (a disk error): said once, the next one still read.
    first, second = spool.segments_for_replay()
    real_read = os.read

    def failing_read(fd: int, n: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}") == str(first):
            raise OSError(5, "Input/output error")
        return real_read(fd, n)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "read", failing_read)
        for _ in range(3):
            assert [v for batch in spool.replay(first) for v in batch] == []
            assert [v for batch in spool.replay(second) for v in batch] == [b"c"]
    assert sum("cannot read segment" in r.getMessage() for r in caplog.records) == 1
