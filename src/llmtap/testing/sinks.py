"""A publisher sink that keeps what it is given, for tests and benchmarks of the gateway."""

from __future__ import annotations

from collections.abc import Sequence

from llmtap.errors import BackendUnavailable
from llmtap.gateway.publisher import Sink
from llmtap.record import LogRecord, Route


class ListSink(Sink):
    """Keeps the records in `records`; `down = True` makes it refuse like an unreachable sink."""

    def __init__(self, route: Route = "queue", *, large_bodies: bool = False) -> None:
        self.route = route
        self.large_bodies = large_bodies
        self.records: list[LogRecord] = []
        self.down = False
        self.closed = False

    async def send(self, records: Sequence[LogRecord]) -> None:
        if self.down:
            raise BackendUnavailable(f"{self.route} down")
        for r in records:
            r.route = self.route
        self.records.extend(records)

    async def close(self) -> None:
        self.closed = True
