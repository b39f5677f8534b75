"""Run `llmtap worker` with one test-only handler first in its chain: a record whose model is
`kill-me` kills the worker *process* with SIGKILL (no exception to catch, nothing flushed), as a
segfault in a C extension or the OOM killer would. Before dying it appends the record id to
$LLMTAP_TEST_KILL_LOG (fsynced), so the test counts how many times the record was handled.

    python tests/kill_worker.py      # settings from the environment, like `llmtap worker`
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # when run as a script from a checkout
    sys.path.insert(0, str(ROOT / "src"))

from llmtap.handlers import base, chain  # noqa: E402

if TYPE_CHECKING:
    from llmtap.bodies.base import BodyStore
    from llmtap.config import Settings
    from llmtap.store.base import Store

POISON_MODEL = "kill-me"
_standard_chain = chain.build_chain


class KillProcess(base.Handler):
    name = "kill-process"

    async def handle(self, items: Sequence[base.Item]) -> None:
        for i in items:
            if i.record.model == POISON_MODEL:
                fd = os.open(os.environ["LLMTAP_TEST_KILL_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, f"{i.record.id}\n".encode())
                os.fsync(fd)
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)


def build_chain(settings: Settings, store: Store, bodies: BodyStore) -> chain.Chain:
    standard = _standard_chain(settings, store, bodies)
    standard.handlers.insert(0, KillProcess())
    return standard


if __name__ == "__main__":
    chain.build_chain = build_chain  # before the worker module imports it
    from llmtap.cli import main

    sys.argv = ["llmtap", "worker"]
    main()
