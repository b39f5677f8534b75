"""The body-store interface: opaque bytes by key.

Keys are built by `body_key` from tenant, date and request id, so listing one tenant's or one
day's bodies (and retention) is a prefix operation on every backend. Values are stored as the
record carries them (zstd-compressed). `put_many` is idempotent: writing a key again with the
same request's bytes is harmless, which at-least-once delivery needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmtap.config import Settings


def body_key(tenant: str, request_id: str, created: datetime, part: str) -> str:
    """`<tenant>/<yyyy>/<mm>/<dd>/<id>.<part>.zst`; `part` is request | response | events."""
    safe_tenant = tenant.replace("/", "_").replace("..", "_") or "_"
    # Not strftime: this runs two or three times per record and strftime costs microseconds.
    return f"{safe_tenant}/{created.year:04d}/{created.month:02d}/{created.day:02d}/{request_id}.{part}.zst"


class BodyStore(ABC):
    description: str = ""

    @abstractmethod
    async def connect(self) -> None:
        """Check reachability; raise `BackendUnavailable` with one sentence when not."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[str]:
        """Write all; return each body's ref (what `get` takes), in order.

        A ref is the key itself on stores with one object per body (S3); the file store packs
        small bodies of a batch into one file and returns `pack#offset+length` refs.
        Raise `TransientError` on an outage (the caller retries).
        """

    @abstractmethod
    async def get(self, ref: str) -> bytes | None:
        """The bytes stored under a ref from `put_many`, or None when they are gone."""

    @abstractmethod
    async def delete_many(self, refs: Sequence[str]) -> None:
        """Delete by ref (for the file store, a pack ref removes its whole pack)."""


def open_body_store(settings: Settings) -> BodyStore:
    url = settings.bodies
    if url == "file" or url.startswith("file:"):
        from llmtap.bodies.file import FileBodyStore

        path = url.removeprefix("file:").removeprefix("//") if url != "file" else ""
        return FileBodyStore(path or str(settings.data_dir / "bodies"))
    if url.startswith("s3://"):
        from llmtap.bodies.s3 import S3BodyStore

        return S3BodyStore(
            url,
            endpoint=settings.s3_endpoint,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
        )
    raise ValueError(f"unknown body store {url!r}")
