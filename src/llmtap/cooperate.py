"""How background work shares `llmtap up`'s one event loop with the gateway's requests.

In `llmtap up` the gateway, the worker and the server share one event loop (and one GIL).
Two rules keep the logging from costing the requests their latency and their throughput:

- Python work done for many records in one go yields to the loop every `SLICE` records. A
  batch of 500 records decoded, built, searched for text or priced in one go would hold every
  request in flight for as long (at 20-60 us a record, 10-30 ms). So every loop over a batch's
  records on the event loop gives the loop a turn every `SLICE` records (`await
  asyncio.sleep(0)`: the requests that became ready run, then the batch goes on).
- While the gateway's requests keep the loop busy, the worker takes no new batch
  (`Foreground`): the durable queue holds the records, and the worker stores them once the
  burst is over, or after `LLMTAP_WORKER_DEFER_S` at the latest.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

#: Records of Python work between two turns of the event loop.
SLICE = 32

#: Share of the event loop's thread on the CPU, over a probe, above which it counts as busy.
#: Requests at saturation keep it at 0.85-0.97 (the rest: waiting for the GIL, for sockets), a
#: sequential client against a 0.1 ms upstream at 0.5-0.75; a machine whose other work takes
#: the core keeps it lower (mean 0.44 beside the test suite and a CPU hog): the worker waits less.
BUSY_SHARE = 0.6
#: Seconds each probe of the loop's load lasts (and the worker sleeps) while it waits.
PROBE_S = 0.05


class Foreground:
    """The gateway's requests, which a worker in the same process lets go first.

    Interleaved with the requests, a worker's batches take the loop from them: at saturation
    `llmtap up` served 0.53-0.59x the bare passthrough's requests a second, and 0.70-0.87x with
    the worker waiting for the burst to end (bench/README.md, "The worker steps aside"). So
    before taking a batch, a worker given a `Foreground` calls `wait_turn`: if the gateway
    handled a request since the last look (`activity`, a counter the gateway bumps anyway), the
    worker probes the loop's thread for `PROBE_S` and waits while it stays busier than
    `BUSY_SHARE`.

    Bounded: after `max_wait` seconds of waiting in a row the worker stops waiting until it has
    caught up (`taken` sees a batch less than a quarter full), so under a load that never ends
    it stores as it did without this, with at most `max_wait` seconds of traffic more queued.
    Nothing is dropped either way: the records wait in the queue, which is what it is for.
    """

    def __init__(
        self,
        activity: Callable[[], int],
        max_wait: float,
        *,
        busy_share: float = BUSY_SHARE,
        probe: float = PROBE_S,
        cpu: Callable[[], float] = time.thread_time,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.activity = activity
        self.max_wait = max_wait
        self.busy_share = busy_share
        self.probe = probe
        self._cpu = cpu
        self._clock = clock
        self._seen = activity()
        #: Waited `max_wait` and not caught up since: take batches without waiting.
        self.draining = False
        #: Seconds waited in all, and how often the wait ran out (for the worker's metrics).
        self.waited = 0.0
        self.ran_out = 0

    def active(self) -> bool:
        """Whether the worker should look at the loop's load before its next batch."""
        seen, self._seen = self._seen, self.activity()
        return self.max_wait > 0 and not self.draining and seen != self._seen

    async def wait_turn(
        self, pause: Callable[[float], Awaitable[None]], stopping: Callable[[], bool]
    ) -> None:
        """Return once the loop has time to spare (or on stop, or after `max_wait`).

        Call it with none of the caller's own work on the loop: the probe measures the loop's
        thread, whoever runs on it.
        """
        cpu, clock = self._cpu, self._clock
        start = clock()
        while not stopping():
            c0, t0 = cpu(), clock()
            await pause(self.probe)
            c1, t1 = cpu(), clock()
            if t1 <= t0 or (c1 - c0) / (t1 - t0) < self.busy_share:
                break
            if t1 - start >= self.max_wait:
                self.draining = True
                self.ran_out += 1
                break
        self.waited += clock() - start

    def taken(self, n: int, batch_size: int) -> None:
        """After each consume: a batch less than a quarter full means the worker caught up."""
        if n * 4 < batch_size:
            self.draining = False
