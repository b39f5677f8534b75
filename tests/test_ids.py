"""Request ids (`llmtap.ids`): random version-4 UUIDs, unique, and never shared with a fork."""

from __future__ import annotations

import os
import threading
import uuid

from llmtap.ids import new_id


def test_ids_are_random_version_4_uuids_in_canonical_form() -> None:
    ids = [new_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for s in ids[:1000]:
        u = uuid.UUID(s)
        assert str(u) == s and u.version == 4 and u.variant == uuid.RFC_4122
    # the random part is random: every hex digit shows up in every free position
    for pos in (0, 9, 15, 20, 35):
        assert len({s[pos] for s in ids}) == 16, pos
    assert {s[19] for s in ids} == set("89ab")


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


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_id()  # the parent's pool holds ids it has not handed out yet
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        os.write(w, "\n".join(new_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = set(f.read().split("\n"))
    os.waitpid(pid, 0)
    parent = {new_id() for _ in range(50)}
    assert len(child) == 50 and not child & parent
