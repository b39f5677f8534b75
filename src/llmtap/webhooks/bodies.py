"""Bodies in the `request.completed` payloads of endpoints added with `--include-bodies`.

The outbox row holds the record's metadata only: the bodies are read when the delivery is sent,
from wherever the record's row says each one is (inline, or the body store: the one rule is
`bodies.offload.read`), so the outbox never holds a second copy of every prompt. A store or body
store that is down makes that delivery wait (`BodiesUnavailable`: the deliverer postpones it
without counting it against the endpoint), never fail and never go out without its bodies.

Each body's text is redacted (`redact.redact_body`: credential-named JSON members, bearer tokens,
key shapes) and then cut to `LLMTAP_WEBHOOK_BODY_BYTES` of UTF-8; `size` stays the body's full
size and `truncated` says the text is not all of it (cut here, or at capture by
`LLMTAP_MAX_BODY_BYTES`). A body that is gone (retention) arrives with `"text": null`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import orjson

from llmtap.bodies import offload
from llmtap.errors import BackendUnavailable, TransientError
from llmtap.record import Body
from llmtap.redact import REDACT_MARGIN, redact_body

if TYPE_CHECKING:
    from llmtap.bodies.base import BodyStore
    from llmtap.store.base import Store

#: The bodies a payload carries (a stream's raw events are left out: the response body holds
#: the reassembled message).
PARTS = ("request_body", "response_body")


class BodiesUnavailable(Exception):
    """The record's row or a body could not be read now (an outage): send the delivery later."""


def body_field(meta: dict[str, Any] | None, raw: bytes | None, cap: int) -> dict[str, Any] | None:
    """One body as a payload shows it, its text redacted and cut to `cap` bytes of UTF-8."""
    if meta is None:
        return None
    out: dict[str, Any] = {
        "content_type": meta.get("content_type"),
        "size": meta.get("size", 0),
        "truncated": bool(meta.get("truncated")),
        "text": None,
    }
    if raw is None:
        return out
    # Only what can be sent is decoded and redacted, plus a margin so a credential running
    # across the cut is still recognised whole (and masked) before the cut.
    window = cap + REDACT_MARGIN
    text = redact_body(raw[:window].decode("utf-8", "replace"))
    data = text.encode("utf-8")
    if len(raw) > window or len(data) > cap:
        # Cut on bytes; "ignore" only drops the character the cut split (the rest is valid UTF-8).
        text = data[:cap].decode("utf-8", "ignore")
        out["truncated"] = True
    out["text"] = text
    return out


class PayloadBodies:
    """Puts a record's bodies into its payload at send time."""

    def __init__(self, store: Store, bodies: Callable[[], Awaitable[BodyStore]], cap: int) -> None:
        self.store = store
        self._bodies = bodies  # connects the body store on first use (it may be down at start)
        self.cap = cap

    async def payload(self, tenant: str, record_id: str, payload: bytes) -> bytes:
        """`payload` with the record's bodies in `data`; raises `BodiesUnavailable` on an outage."""
        try:
            row = await self.store.get_request(tenant, record_id)
            metas = [None if row is None else row.get(p) for p in PARTS]
            raws: list[bytes | None] = [None] * len(PARTS)
            if any(m is not None for m in metas):
                store = await self._bodies()
                raws = list(
                    await asyncio.gather(
                        *(
                            _none() if m is None else offload.read(store, msgspec.convert(m, Body))
                            for m in metas
                        )
                    )
                )
        except (TransientError, BackendUnavailable, OSError) as e:
            raise BodiesUnavailable(f"{type(e).__name__}: {e}") from e
        event = orjson.loads(payload)
        data = event["data"]
        for part, meta, raw in zip(PARTS, metas, raws, strict=True):
            if row is None:  # the record is gone (retention): what the outbox row knew
                meta = data.get(part)
            data[part] = body_field(meta, raw, self.cap)
        return orjson.dumps(event)


async def _none() -> None:
    return None
