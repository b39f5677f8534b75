"""Launcher for failure tests: the real `llmtap worker` with two test-only handlers in its chain.

A test that SIGKILLs a worker "mid-batch" proves nothing if the kill may land between batches:
a worker that acknowledged before storing would pass whenever it did. So this process builds the
worker exactly as `llmtap worker` does (settings from `LLMTAP_*`, the standard chain, the real
queue and stores) and adds, so that product code carries no test hooks:

- `BlockOnce` just before the store handler: the first worker (of all the processes sharing the
  `--marker` path) that gets a batch holding the record `--block-on` writes its pid and that
  batch's record ids to the marker file, then waits forever. The batch is then consumed and
  unacknowledged, its records not stored, and the queue's heartbeats keep running: the worker
  is certainly inside the handler chain when the test kills it. Later workers pass it through.
- `Seen` at the end of the chain: appends the id of every record that went through the whole
  chain to `<--seen>/<pid>.seen`, so a test counts processings and redeliveries (rows cannot
  show them: the store's primary key makes them unique whatever happens).

Usage: `python tests/chain_worker.py [--seen DIR] [--block-on ID --marker FILE] [--sqlite-lease S]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from llmtap.config import Settings, load_settings
from llmtap.handlers.base import Handler, Item
from llmtap.handlers.store import StoreHandler
from llmtap.queue.base import Queue, open_queue
from llmtap.queue.sqlite import SQLiteQueue
from llmtap.runtime import install_uvloop, run_services, setup_logging
from llmtap.worker import WorkerService


class BlockOnce(Handler):
    name = "block-once"

    def __init__(self, record_id: str, marker: Path) -> None:
        self.record_id = record_id
        self.marker = marker

    async def handle(self, items: Sequence[Item]) -> None:
        if not any(i.record.id == self.record_id for i in items):
            return
        # Written aside and linked into place: the link is atomic and fails if another worker
        # got there first (then this is the survivor, seeing the record again: pass it on).
        tmp = self.marker.with_name(f"{self.marker.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "ids": [i.record.id for i in items]}))
        try:
            os.link(tmp, self.marker)
        except FileExistsError:
            return
        finally:
            tmp.unlink()
        print(f"chain_worker: blocking on a batch of {len(items)} holding {self.record_id}", flush=True)
        await asyncio.Event().wait()  # until SIGKILL


class Seen(Handler):
    name = "seen"

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"{os.getpid()}.seen"

    async def handle(self, items: Sequence[Item]) -> None:
        # One append per batch: a SIGKILL cannot leave half a line (the page cache keeps it).
        with open(self.path, "a") as f:
            f.write("".join(f"{i.record.id}\n" for i in items))


def _queue(settings: Settings, lease: float | None) -> Queue:
    q = open_queue(settings)
    if lease is not None and isinstance(q, SQLiteQueue):  # a faster takeover than the default 5 s
        q = SQLiteQueue(q.path, settings.partitions, lease_timeout=lease, heartbeat_interval=lease / 5)
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seen", type=Path, help="directory for <pid>.seen files")
    ap.add_argument("--block-on", help="record id whose batch blocks the first worker that gets it")
    ap.add_argument("--marker", type=Path, help="file written when blocking (shared by the workers)")
    ap.add_argument("--sqlite-lease", type=float, help="lease timeout of the SQLite queue, seconds")
    args = ap.parse_args()
    if bool(args.block_on) != bool(args.marker):
        ap.error("--block-on and --marker go together")

    settings = load_settings()
    setup_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    svc = WorkerService(settings, queue=_queue(settings, args.sqlite_lease))
    handlers = svc.chain.handlers
    if args.block_on:
        at = next(n for n, h in enumerate(handlers) if isinstance(h, StoreHandler))
        handlers.insert(at, BlockOnce(args.block_on, args.marker))
    if args.seen:
        args.seen.mkdir(parents=True, exist_ok=True)
        handlers.append(Seen(args.seen))

    install_uvloop()
    sys.exit(asyncio.run(run_services(settings, "worker", [svc])))


if __name__ == "__main__":
    main()
