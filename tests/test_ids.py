"""Request ids (`llmtap.ids`): version 7 UUIDs, time-ordered, unique, never shared with a fork."""

from __future__ import annotations

import os
import threading
import time
import uuid

from llmtap.ids import new_id


def test_ids_are_version_7_uuids_in_canonical_form_carrying_their_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(20_000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    for s in ids[:1000] + ids[-1000:]:
        u = uuid.UUID(s)
        assert str(u) == s and u.version == 7 and u.variant == uuid.RFC_4122
        assert before <= u.int >> 80 <= after
    # the random part is random: every hex digit shows up in every random position
    for pos in (15, 16, 17, 20, 21, 24, 30, 35):
        assert len({s[pos] for s in ids}) == 16, pos
    assert {s[19] for s in ids} == set("89ab")


def test_ids_of_later_milliseconds_sort_after_earlier_ones() -> None:
    """What keeps the stores' (tenant, id) indexes append-mostly."""
    first = [new_id() for _ in range(100)]
    t = time.time_ns()
    while time.time_ns() - t < 2_000_000:  # at least one millisecond boundary
        pass
    later = [new_id() for _ in range(100)]
    assert max(first) < min(later)
    assert max(uuid.UUID(s).int >> 80 for s in first) < min(uuid.UUID(s).int >> 80 for s in later)


def test_threads_never_get_the_same_id() -> None:
    out: list[list[str]] = [[] for _ in range(4)]

    def take(n: int) -> None:
        out[n] = [new_id() for _ in range(5000)]

    threads = [threading.Thread(target=take, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for part in out for i in part]
    assert len(set(flat)) == len(flat) == 20_000


def test_a_forked_child_does_not_repeat_its_parents_random_bits() -> None:
    new_id()  # the parent's pool holds random bits it has not used yet
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        os.write(w, "\n".join(new_id()[15:] for _ in range(50)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = set(f.read().split("\n"))
    os.waitpid(pid, 0)
    parent = {new_id()[15:] for _ in range(50)}  # the random part only: the time may match
    assert len(child) == 50 and not child & parent
