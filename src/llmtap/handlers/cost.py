"""Cost: fills `cost_usd`, `cost_nanos` and `price_version` from usage and model (`llmtap.pricing`).

Pure CPU, a few microseconds a record; deterministic, so running it again on a redelivered
record gives the same answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmtap.handlers.base import Handler, Item
from llmtap.handlers.chain import fail_each
from llmtap.pricing import apply_cost


class CostHandler(Handler):
    name = "cost"

    async def handle(self, items: Sequence[Item]) -> None:
        # A record the price table chokes on fails alone (`chain.fail_each`), the rest go on.
        await fail_each(self, items, lambda item: apply_cost(item.record))
