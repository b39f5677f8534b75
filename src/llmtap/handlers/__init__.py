"""The worker's handler chain: body storage → usage and cost → analytics store → webhooks."""

from llmtap.handlers.base import Handler, Item
from llmtap.handlers.chain import Chain, RetryPolicy, build_chain, run_with_attempts

__all__ = ["Chain", "Handler", "Item", "RetryPolicy", "build_chain", "run_with_attempts"]
