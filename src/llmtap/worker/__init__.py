"""The log worker: queue → handler chain → store, with retries and dead letters."""

from llmtap.worker.worker import WorkerService, process_records

__all__ = ["WorkerService", "process_records"]
