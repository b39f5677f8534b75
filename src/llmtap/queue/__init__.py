"""Durable queues between gateways and workers, all behind one interface (`base.Queue`)."""

from llmtap.queue.base import DeadLetter, Delivery, Message, PartitionStatus, Queue, QueueStatus, open_queue

__all__ = ["DeadLetter", "Delivery", "Message", "PartitionStatus", "Queue", "QueueStatus", "open_queue"]
