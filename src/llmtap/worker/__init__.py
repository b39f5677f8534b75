"""The log worker: queue → handler chain → store, with retries and dead letters."""

from llmtap.worker.worker import WorkerService

__all__ = ["WorkerService"]
