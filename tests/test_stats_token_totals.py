"""`/api/v1/stats` totals include cache writes and reasoning tokens, on both stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmtap.record import Usage
from llmtap.store.base import StatsQuery
from store_helpers import open_store, rec, store_params


@pytest.mark.parametrize("kind", store_params())
async def test_stats_sum_cache_writes_and_reasoning(kind: str, tmp_path: Path) -> None:
    rows = [
        rec(
            0,
            usage=Usage(
                source="provider",
                prompt_tokens=100,
                completion_tokens=10,
                total_tokens=110,
                cached_tokens=20,
                cache_write_tokens=30,
                reasoning_tokens=4,
            ),
        ),
        rec(
            1,
            usage=Usage(
                source="provider",
                prompt_tokens=50,
                completion_tokens=5,
                total_tokens=55,
                cache_write_tokens=7,
                reasoning_tokens=3,
            ),
        ),
        rec(2),  # no cache writes, no reasoning: counts as 0
    ]
    async with open_store(kind, tmp_path) as store:
        await store.write_batch(rows)
        got = await store.stats("acme", StatsQuery(group_by="model"))
    overall = got["overall"]
    assert (overall["cache_write_tokens"], overall["reasoning_tokens"], overall["cached_tokens"]) == (
        37,
        7,
        20,
    )
    (group,) = got["groups"]
    assert group["cache_write_tokens"] == 37
