"""Cost: fills `cost_usd`, `cost_nanos` and `price_version` from usage and model (`llmtap.pricing`).

Pure CPU, a few microseconds a record; deterministic, so running it again on a redelivered
record gives the same answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmtap.handlers.base import Handler, Item
from llmtap.pricing import apply_cost


class CostHandler(Handler):
    name = "cost"

    async def handle(self, items: Sequence[Item]) -> None:
        for item in items:
            try:
                apply_cost(item.record)
            except Exception as e:  # a record the price table chokes on: that record's fault
                item.fail(f"{self.name}: {type(e).__name__}: {e}")
