"""`cooperate.Foreground`: when a worker sharing the gateway's event loop (`llmtap up`) waits.

The policy on a scripted clock (no sleeping, no timing): how long it waits for which load, the
bound, the reset once caught up; and that `llmtap up` hands the gateway's activity to its
worker. The worker honouring it on real backends is in test_worker.py.
"""

from __future__ import annotations

from pathlib import Path

from llmtap.cli import _foreground
from llmtap.config import Settings
from llmtap.cooperate import BUSY_SHARE, Foreground
from llmtap.gateway.app import GatewayService

PROBE = 1 / 16  # exact in binary: sums of probes compare equal


class Loop:
    """The loop's thread as the probe sees it: each pause advances the clock, and the thread's
    CPU by the share the script gives for that probe (the last one repeats)."""

    def __init__(self, shares: list[float]) -> None:
        self.shares = shares
        self.t = 100.0
        self.c = 7.0
        self.probes = 0
        self.requests = 0

    async def pause(self, seconds: float) -> None:
        share = self.shares[min(self.probes, len(self.shares) - 1)]
        self.probes += 1
        self.t += seconds
        self.c += share * seconds

    def foreground(self, max_wait: float) -> Foreground:
        return Foreground(
            lambda: self.requests, max_wait, probe=PROBE, cpu=lambda: self.c, clock=lambda: self.t
        )


def never() -> bool:
    return False


def test_only_a_gateway_that_did_something_since_the_last_look_is_probed() -> None:
    loop = Loop([1.0])
    fg = loop.foreground(10)
    assert not fg.active()  # nothing since it was made
    loop.requests += 3
    assert fg.active()
    assert not fg.active()  # the same count again: the gateway is idle
    loop.requests += 1
    assert not loop.foreground(0).active() and fg.active()  # 0 turns it off


async def test_waits_while_the_loop_is_busy_and_goes_on_once_it_has_time_to_spare() -> None:
    loop = Loop([0.97, 0.9, BUSY_SHARE + 0.01, BUSY_SHARE - 0.01, 1.0])
    fg = loop.foreground(10)
    await fg.wait_turn(loop.pause, never)
    assert loop.probes == 4  # just over the bound is busy, just under it is not
    assert fg.waited == 4 * PROBE
    assert not fg.draining and fg.ran_out == 0


async def test_a_loop_with_time_to_spare_costs_one_probe() -> None:
    loop = Loop([0.3])
    fg = loop.foreground(10)
    await fg.wait_turn(loop.pause, never)
    assert loop.probes == 1 and not fg.draining


async def test_the_wait_is_bounded_then_the_worker_drains_until_caught_up() -> None:
    loop = Loop([1.0])
    fg = loop.foreground(1.0)

    def runaway() -> bool:  # without the bound this would wait for ever: fail instead
        return loop.probes > 1000

    await fg.wait_turn(loop.pause, runaway)
    assert loop.probes == 16  # busy throughout: it gives up after max_wait
    assert fg.draining and fg.ran_out == 1
    loop.requests += 1
    assert not fg.active()  # draining: batches are taken without a probe, however busy
    fg.taken(500, 500)
    fg.taken(125, 500)  # a quarter full: not caught up yet
    assert not fg.active()
    fg.taken(124, 500)  # less than a quarter: caught up
    loop.requests += 1
    assert fg.active()
    await fg.wait_turn(loop.pause, runaway)
    assert fg.ran_out == 2 and fg.waited == 2.0


async def test_stopping_ends_the_wait() -> None:
    loop = Loop([1.0])
    fg = loop.foreground(3600)
    stop_after = 3

    def stopping() -> bool:
        return loop.probes >= stop_after

    await fg.wait_turn(loop.pause, stopping)
    assert loop.probes == stop_after and not fg.draining


def test_up_hands_the_gateways_requests_to_its_worker(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    gateway = GatewayService(settings)
    fg = _foreground(settings, gateway)
    assert fg is not None and fg.max_wait == settings.worker_defer_s == 10.0
    assert not fg.active()
    gateway.publisher.submitted += 1  # what each proxied request's capture does
    assert fg.active()
    assert _foreground(settings, None) is None  # `llmtap worker`: no gateway in the process
    assert _foreground(settings.model_copy(update={"worker_defer_s": 0}), gateway) is None
