"""Which backends exist: one table per family (queue, store, bodies), URL scheme → class → extra.

Settings validation, the missing-driver check and the openers (`open_queue`, `open_store`,
`open_body_store`) all read these tables, so a backend is added in one row here plus its module.
`pip install llmtap` brings only the embedded backends; a network backend's driver comes with
its extra (`llmtap[kafka]`, ...), and configuring one without it stops start-up with one
sentence naming the extra. This module imports no driver itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtap.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Backend:
    """One row: the URLs a backend answers, where its class lives, and what installs its driver."""

    name: str
    #: URL schemes it answers; an embedded backend's first scheme is also its bare name ("sqlite").
    schemes: tuple[str, ...]
    #: "module:Class", imported only when the backend is opened.
    target: str
    #: How the settings error spells it ("kafka://host:port/topic").
    example: str
    #: The pip extra that installs its driver, the driver's modules and what to call it.
    extra: str | None = None
    drivers: tuple[str, ...] = ()
    driver: str = ""
    #: Embedded: `NAME`, `NAME:PATH` or `NAME://PATH` on this machine, else a network URL.
    embedded: bool = False
    #: File name under the data directory when an embedded URL names no path.
    default_path: str = ""
    #: A network URL must name a host (libpq's URLs need none: no host is the local socket).
    host: bool = True

    def matches(self, url: str) -> bool:
        if self.embedded:
            return url == self.schemes[0] or url.startswith(self.schemes[0] + ":")
        return url.startswith(tuple(f"{s}://" for s in self.schemes))

    def local_path(self, url: str) -> str:
        """An embedded URL's path ("" for the default under the data directory)."""
        return "" if url == self.schemes[0] else url.removeprefix(self.schemes[0] + ":").removeprefix("//")

    def require(self, setting: str, url: str) -> None:
        """Raise `ConfigError` naming the extra when the driver cannot be imported."""
        if self.extra is not None:
            scheme = url.split("://", 1)[0]
            require_modules(self.drivers, f"{setting}={scheme}://… needs {self.driver}", self.extra)

    def load(self, setting: str, url: str) -> Callable[..., Any]:
        """The backend's class, after checking its driver is installed."""
        self.require(setting, url)
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Family:
    """The backends one setting can name; the first that matches a URL opens it."""

    #: The setting (`Settings.queue`) and its variable.
    setting: str
    #: How error messages name one ("queue", "body store").
    noun: str
    backends: tuple[Backend, ...]

    @property
    def env(self) -> str:
        return f"LLMTAP_{self.setting.upper()}"

    @property
    def expected(self) -> str:
        """The settings error for a URL no backend answers."""
        shown = [f"'{b.example}'" for b in self.backends]
        return "must be " + (", ".join(shown[:-1]) + " or " + shown[-1] if len(shown) > 1 else shown[0])

    def find(self, url: str) -> Backend | None:
        return next((b for b in self.backends if b.matches(url)), None)

    def backend(self, url: str) -> Backend:
        found = self.find(url)
        if found is None:
            raise ValueError(f"unknown {self.noun} {url!r}")
        return found

    def embedded_path(self, url: str, data_dir: Path) -> str | None:
        """The file or directory of an embedded backend (default: under `data_dir`), else None."""
        backend = self.find(url)
        if backend is None or not backend.embedded:
            return None
        return backend.local_path(url) or str(data_dir / backend.default_path)

    def load(self, url: str) -> tuple[Backend, Callable[..., Any]]:
        """The backend answering `url` and its class (`ConfigError` when its extra is missing)."""
        backend = self.backend(url)
        return backend, backend.load(self.env, url)


def require_modules(modules: Sequence[str], needs: str, extra: str) -> None:
    """Import `modules`; if one fails, raise `ConfigError`: "<needs>: pip install 'llmtap[extra]'".

    Imported, not merely looked up: a driver that is present but cannot load (a wheel for another
    platform) must stop start-up too, and then the sentence says why.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            top = (e.name or "").split(".")[0] if isinstance(e, ModuleNotFoundError) else None
            absent = top == module.split(".")[0]
            why = "" if absent else f" (importing {module} failed: {e})"
            raise ConfigError(f"{needs}{why}: pip install 'llmtap[{extra}]'") from None


QUEUES = Family(
    "queue",
    "queue",
    (
        Backend(
            "sqlite", ("sqlite",), "llmtap.queue.sqlite:SQLiteQueue", "sqlite",
            embedded=True, default_path="queue.db",
        ),
        Backend(
            "kafka", ("kafka",), "llmtap.queue.kafka:KafkaQueue", "kafka://host:port/topic",
            extra="kafka", drivers=("aiokafka",), driver="the Kafka driver",
        ),
        Backend(
            "redis", ("redis", "rediss"), "llmtap.queue.redis:RedisQueue", "redis://host:port/db",
            extra="redis", drivers=("redis",), driver="the Redis driver",
        ),
        # sqs://queue-name: the name is the netloc, the region comes from the AWS chain.
        Backend(
            "sqs", ("sqs",), "llmtap.queue.sqs:SQSQueue", "sqs://queue-name",
            extra="sqs", drivers=("aiobotocore",), driver="the AWS SQS client (aiobotocore)",
        ),
    ),
)  # fmt: skip

STORES = Family(
    "store",
    "store",
    (
        Backend(
            "sqlite", ("sqlite",), "llmtap.store.sqlite:SQLiteStore", "sqlite",
            embedded=True, default_path="store.db",
        ),
        Backend(
            "postgres", ("postgresql", "postgres"), "llmtap.store.postgres:PostgresStore",
            "postgresql://user:password@host:port/database",
            extra="postgres", drivers=("asyncpg",), driver="the PostgreSQL driver", host=False,
        ),
    ),
)  # fmt: skip

BODIES = Family(
    "bodies",
    "body store",
    (
        Backend(
            "file", ("file",), "llmtap.bodies.file:FileBodyStore", "file",
            embedded=True, default_path="bodies",
        ),
        Backend(
            "s3", ("s3",), "llmtap.bodies.s3:S3BodyStore", "s3://bucket/prefix",
            extra="s3", drivers=("aiobotocore",), driver="the S3 client (aiobotocore)",
        ),
    ),
)  # fmt: skip

FAMILIES = (QUEUES, STORES, BODIES)
