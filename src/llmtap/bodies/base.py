"""The body-store interface: opaque bytes by key.

Keys are built by `body_key` from tenant, date, request id and a digest of the bytes, so listing
one tenant's or one day's bodies (and retention) is a prefix operation on every backend, two
tenants never share a key, and two requests reusing one id never overwrite each other's body.
Values are stored as the record carries them (zstd-compressed). `put_many` is idempotent:
writing a key again with the same request's bytes is harmless, which at-least-once delivery
needs. Keys are stored in rows as references, so keys of an older scheme keep reading.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

from llmtap.backends import BODIES

if TYPE_CHECKING:
    from llmtap.config import Settings


#: Characters kept as they are in a key segment; everything else is percent-encoded.
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_ALL_SAFE = re.compile(r"[A-Za-z0-9._-]+")  # the common case (a UUID) in one call, not per character
#: A segment longer than this (encoded) is cut and suffixed with `~` and a hash of the whole.
_SEGMENT_MAX = 96


def key_segment(value: str) -> str:
    """An injective, path-safe, bounded encoding of a tenant or request id for a body key.

    Percent-encoding of everything but `[A-Za-z0-9._-]` (`%` itself included, lone surrogates
    as their escaped code point), so `grp/eu` and `grp_eu` can never share a key (the old
    sanitizer mapped both to `grp_eu`). `~` never appears in an encoding, so it marks the two
    special forms: the empty string (`~`) and a value too long for a file name or an S3 key
    (readable prefix, `~`, a 128-bit hash of the whole value). `.` and `..` are encoded so a
    segment is never a path step.
    """
    if _ALL_SAFE.fullmatch(value) and value.strip(".") != "":
        out = value
    elif not value:
        return "~"
    else:
        out = "".join(
            c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
            for c in value
        )
        if out.strip(".") == "":
            out = out.replace(".", "%2E")
    if len(out) <= _SEGMENT_MAX:
        return out
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    head = out[:64]
    cut = head.rfind("%", len(head) - 2)  # never split a %XX escape
    if cut >= 0:
        head = head[:cut]
    return f"{head}~{digest}"


def body_key(tenant: str, request_id: str, created: datetime, part: str, data: bytes) -> str:
    """`<tenant>/<yyyy>/<mm>/<dd>/<id>.<part>.<digest>.zst`; `part` is request | response | events.

    Tenant and id go through `key_segment` (injective). `digest` is a hash of the stored bytes:
    a second request reusing a request id (its record is refused by the store, first write
    wins) writes its body under another key instead of overwriting the first request's body,
    while a redelivery of the same record rewrites the same key with the same bytes.
    """
    digest = hashlib.blake2b(data, digest_size=12).hexdigest()
    return f"{key_segment(tenant)}/{day_folder(created)}{key_segment(request_id)}.{part}.{digest}.zst"


def day_folder(created: datetime) -> str:
    """`<yyyy>/<mm>/<dd>/` of the UTC day: retention purges whole UTC days, packs and all (a
    record ingested with +05:00 shared a later day's pack)."""
    if created.utcoffset():
        created = created.astimezone(UTC)
    # Not strftime: this runs two or three times per record and strftime costs microseconds.
    return f"{created.year:04d}/{created.month:02d}/{created.day:02d}/"


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

    async def erase_many(self, refs: Sequence[str]) -> None:
        """Delete exactly these bodies and no other (`llmtap erase`): where `delete_many` takes
        a file store's whole pack, other requests' bodies in it must stay. One object per body
        (S3): the same as `delete_many`."""
        await self.delete_many(refs)

    async def delete_days_before(self, day: date) -> int:
        """Delete every body in a day folder before `day`, named by a record or not; how many
        folders went. What retention's refs miss (a second request reusing an id: its row was
        refused, its body written) goes with its day. None by default."""
        return 0


def open_body_store(settings: Settings) -> BodyStore:
    """The body store named by `LLMTAP_BODIES` (`ConfigError` when its extra is missing)."""
    url = settings.bodies
    backend, cls = BODIES.load(url)
    store: BodyStore
    if backend.embedded:
        store = cls(BODIES.embedded_path(url, settings.data_dir))
    else:
        store = cls(
            url,
            endpoint=settings.s3_endpoint,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
        )
    return store
