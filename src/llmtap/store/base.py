"""The store interface: idempotent batched writes of log records, and the queries the API serves.

Every backend must give the same answers to the same queries (the API test suite runs against
each). Rows are keyed by (tenant, id): writing a record whose key exists is a no-op, which is
what makes at-least-once delivery yield exactly one row.

Rows are returned as plain dicts in the API's shape (see `ROW_FIELDS`); bodies are *references*
(`request_body`, `response_body`, `response_events` hold `llmtap.record.Body` dicts without
inline data); the API resolves them through the body store. What a query may ask, and how
the API spells it, is `llmtap.store.query`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from llmtap.backends import STORES
from llmtap.redact import redact_dsn

# The query vocabulary's two queries, re-exported: the `Store` methods take them.
from llmtap.store.query import ListQuery as ListQuery
from llmtap.store.query import StatsQuery as StatsQuery
from llmtap.store.query import UserTotals as UserTotals

if TYPE_CHECKING:
    from llmtap.config import Settings
    from llmtap.record import LogRecord
    from llmtap.webhooks.db import WebhookDB

#: Fields of a stored request as the API returns them (bodies resolved by the API layer).
ROW_FIELDS = (
    "id", "tenant", "created_at", "provider", "model", "method", "path", "target_url", "status",
    "outcome", "error", "streamed", "latency_ms", "time_to_first_token_ms", "prompt_tokens",
    "completion_tokens", "total_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens",
    "usage_source", "cost_usd", "price_version", "user_id", "session_id", "properties",
    "request_headers", "response_headers", "request_body", "response_body", "response_events",
    "route", "first_byte_at", "ended_at", "gateway", "cache_write_1h_tokens", "input_audio_tokens",
    "output_audio_tokens", "service_tier", "web_search_requests", "audio_seconds", "input_characters",
    "truncated",
)  # fmt: skip


@dataclass(slots=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


@dataclass(slots=True)
class ApiKey:
    id: str
    tenant: str
    name: str | None
    prefix: str  # first characters of the key, to recognise it in listings
    created_at: datetime
    revoked_at: datetime | None = None


class Store(ABC):
    description: str = ""

    @abstractmethod
    async def connect(self) -> None:
        """Connect and apply migrations; raise `BackendUnavailable` with one sentence if unreachable."""

    @abstractmethod
    async def close(self) -> None: ...

    async def cut_reads(self) -> None:
        """End the reads asked for so far: running ones are interrupted, queued ones refused,
        their callers told the store is unavailable (a 503). A stopping server calls it so that
        its stop waits for no slow query; reads asked for afterwards run as usual. Writes are
        not cut: once sent, they finish (the worker's batch, an API key made)."""
        return None

    def webhooks(self) -> WebhookDB:
        """Webhook endpoints and the outbox (written with the records by `write_batch`)."""
        raise NotImplementedError(f"{type(self).__name__} has no webhook outbox")

    # -- writes (worker) ----------------------------------------------------------------------
    @abstractmethod
    async def write_batch(
        self, records: Sequence[LogRecord], texts: Sequence[str | None] | None = None
    ) -> int:
        """Insert records, ignoring (tenant, id) already present. Returns rows inserted.

        `texts[i]` is record i's searchable text (`llmtap.store.search`); where None (or no
        `texts`), the text of the bodies still inline in the record is indexed.

        Raises `TransientError` when the database is unreachable (the batch is retried).
        """

    # -- reads (API) --------------------------------------------------------------------------
    @abstractmethod
    async def get_request(self, tenant: str, request_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def list_requests(self, tenant: str, query: ListQuery) -> Page: ...

    @abstractmethod
    async def stats(self, tenant: str, query: StatsQuery) -> dict[str, Any]:
        """`{"overall": {...}, "groups": [...], "buckets": [...]}` with count, error_count,
        error_rate, prompt/completion/total tokens, cost_usd, latency and TTFT p50/p90/p99."""

    @abstractmethod
    async def sessions(self, tenant: str, session_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def list_sessions(self, tenant: str, query: ListQuery) -> Page:
        """Sessions with a request matching `query`'s filters, most recently active first
        (keyset pages of `query.limit`): `session_id`, totals, `first_at`/`last_at`."""

    @abstractmethod
    async def users(
        self,
        tenant: str,
        limit: int = 100,
        *,
        exact: bool = False,
        after: tuple[int, str] | None = None,
        sort: str = "time",
    ) -> list[UserTotals]:
        """Per-user totals (no percentiles), most recently active first (`sort="time"`) or
        highest cost first (`"cost"`; unpriced counts as 0), then by user id; those after
        `after` (the sort's value: last active in microseconds, or cost in nanodollars; user
        id); from the user rollups when they hold every stored request, else (or `exact`) from
        raw rows."""

    # -- retention ----------------------------------------------------------------------------
    @abstractmethod
    async def delete_older_than(self, cutoff: datetime, limit: int = 10_000) -> list[str]:
        """Delete rows created before `cutoff`; returns the body refs they held."""

    @abstractmethod
    async def erase(self, tenant: str, by: str, value: str, limit: int = 10_000) -> tuple[int, list[str]]:
        """Delete up to `limit` of `tenant`'s rows whose `by` (`sql.ERASE_BY`: a user, a session,
        a request id) is `value`, with their properties, search text and share of the rollups
        (a user's own rollup rows go with their last request); returns (rows deleted, their body
        refs). Call again until it deletes nothing (`llmtap erase`)."""

    # -- API keys -----------------------------------------------------------------------------
    @abstractmethod
    async def create_key(self, tenant: str, name: str | None, key_hash: str, prefix: str) -> ApiKey: ...

    @abstractmethod
    async def key_by_hash(self, key_hash: str) -> ApiKey | None: ...

    @abstractmethod
    async def list_keys(self, tenant: str | None = None) -> list[ApiKey]: ...

    @abstractmethod
    async def revoke_key(self, key_id: str) -> bool: ...


def embedded_store_path(settings: Settings) -> str | None:
    """The SQLite store's file when `LLMTAP_STORE` is the embedded store, else None."""
    return STORES.embedded_path(settings.store, settings.data_dir)


def left_behind(settings: Settings) -> str | None:
    """A warning when the data directory's embedded store holds requests and `LLMTAP_STORE`
    names another store: llmtap moves nothing between stores, and after switching to
    PostgreSQL a team saw an empty dashboard with no word about where its requests were."""
    default = settings.data_dir / STORES.backend("sqlite").default_path
    if not default.is_file():
        return None
    in_use = embedded_store_path(settings)
    with contextlib.suppress(OSError):  # the same file however named: relative, `./`, a symlink
        if in_use is not None and os.path.samefile(in_use, default):
            return None
    try:
        with contextlib.closing(sqlite3.connect(f"{default.resolve().as_uri()}?mode=ro", uri=True)) as db:
            if not db.execute("SELECT EXISTS (SELECT 1 FROM requests)").fetchone()[0]:
                return None
    except sqlite3.Error:
        return None  # not a store, or not one we can read: nothing to say about it
    return (
        f"{default} holds requests, but LLMTAP_STORE is {redact_dsn(settings.store)}: llmtap does not"
        " move stored requests from one store to another, so they are not shown or counted here"
        " (see the README's Backup and restore; move or delete that file to stop this warning)"
    )


def open_store(settings: Settings, *, admin: bool = False) -> Store:
    """The store named by `LLMTAP_STORE` (`ConfigError` when its extra is missing). `admin`: a
    command's connection, which keeps the rolled-up properties the services registered, whatever
    its own `LLMTAP_ROLLUP_PROPERTIES` says."""
    backend, cls = STORES.load(settings.store)
    target = embedded_store_path(settings) if backend.embedded else settings.store
    props = None if admin else settings.rollup_property_names
    store: Store = cls(target, rollup_properties=props)
    return store
