"""The worker's handler chain: body storage → usage and cost → analytics store → webhooks."""

from llmtap.handlers.base import Chain, Handler, Item, build_chain

__all__ = ["Chain", "Handler", "Item", "build_chain"]
