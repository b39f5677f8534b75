"""What the store writes into the webhook outbox, and how a delivery is signed.

The store calls `plan` inside the transaction that inserts a batch, with the records that
transaction actually inserted: a delivery row exists exactly when its record's row does, and a
redelivered record (already stored) adds none. A delivery's id is derived from (endpoint, event,
tenant, subject), so it is also the stable `webhook-id` receivers deduplicate on, and the primary
key makes a second insert of the same event a no-op.

Signing follows Standard Webhooks: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` keyed
by the base64 part of a `whsec_` secret; during a rotation both secrets sign (space-separated).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from llmtap.record import Body, LogRecord
from llmtap.redact import redact_text, redact_webhook_url

REQUEST_COMPLETED = "request.completed"
DELIVERY_DISABLED = "delivery.disabled"
#: Alert events (`llmtap.alerts`): a rule's condition held, and later cleared.
ALERT_FIRING = "alert.firing"
ALERT_RESOLVED = "alert.resolved"
EVENTS = (REQUEST_COMPLETED, DELIVERY_DISABLED, ALERT_FIRING, ALERT_RESOLVED)
#: Payload formats of an endpoint: the signed envelope, or Slack's `{"text": ...}` (see `slack_text`).
FORMATS = ("standard", "slack")

_DROP = frozenset({"request_body", "response_body", "response_events", "request_headers", "response_headers"})
_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class Endpoint:
    id: str
    tenant: str
    url: str
    secret: str
    events: list[str] = field(default_factory=lambda: list(EVENTS))
    filters: dict[str, str] = field(default_factory=dict)
    sample: float = 1.0
    include_bodies: bool = False
    previous_secret: str | None = None
    created_at: int = 0
    disabled_at: int | None = None
    failing_since: int | None = None
    retry_at: int | None = None
    failures: int = 0
    format: str = "standard"

    def public(self) -> dict[str, Any]:
        """The endpoint as listings show it: never the secret itself, nor a password or token
        in its URL (the CLI's listing hides them too)."""
        return {
            "id": self.id,
            "tenant": self.tenant,
            "url": redact_webhook_url(self.url),
            "events": self.events,
            "filters": self.filters,
            "sample": self.sample,
            "include_bodies": self.include_bodies,
            "secret_prefix": self.secret[:10] + "…",
            "rotating": self.previous_secret is not None,
            "created_at": self.created_at,
            "disabled_at": self.disabled_at,
            "failing_since": self.failing_since,
            "format": self.format,
        }


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def check_secret(secret: str) -> str:
    """A `whsec_` secret whose key part is base64 (what `standardwebhooks` expects)."""
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret starts with whsec_")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("a webhook secret's key is at least 16 bytes")
    return secret


def parse_filters(items: Iterable[str]) -> dict[str, str]:
    """`model=gpt-4o`, `property.feature=chat` → a dict; anything else is refused."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not (key == "model" or (key.startswith("property.") and len(key) > 9)):
            raise ValueError(f"filter {item!r}: use model=NAME or property.NAME=VALUE")
        out[key.lower() if key.startswith("property.") else key] = value
    return out


def delivery_id(endpoint_id: str, event: str, tenant: str, subject: str) -> str:
    digest = hashlib.sha256("\x00".join((endpoint_id, event, tenant, subject)).encode()).hexdigest()
    return "msg_" + digest[:32]


def _sampled(endpoint: Endpoint, record: LogRecord) -> bool:
    """Deterministic per (endpoint, request): a redelivered record decides the same way."""
    if endpoint.sample >= 1.0:
        return True
    h = hashlib.sha256(f"{endpoint.id}\x00{record.tenant}\x00{record.id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < endpoint.sample


def matches(endpoint: Endpoint, record: LogRecord) -> bool:
    if REQUEST_COMPLETED not in endpoint.events or endpoint.tenant != record.tenant:
        return False
    for key, value in endpoint.filters.items():
        if key == "model":
            if record.model != value:
                return False
        elif record.properties.get(key.removeprefix("property.")) != value:
            return False
    return _sampled(endpoint, record)


def _body_meta(body: Body | None) -> dict[str, Any] | None:
    """A body as the outbox row keeps it: what it is, never its bytes (the deliverer reads
    those from the store when it sends, `webhooks.bodies`)."""
    if body is None:
        return None
    return {"content_type": body.content_type, "size": body.size, "truncated": body.truncated}


def record_data(record: LogRecord, include_bodies: bool) -> dict[str, Any]:
    """The record's metadata; no headers and no query string (where credentials could hide).
    With `include_bodies`, each body's metadata: the deliverer adds its text when it sends."""
    # Every field, a default or None included: a receiver reads `data["streamed"]` without
    # knowing which fields the queue's compact encoding leaves out.
    full = {f: getattr(record, f) for f in record.__struct_fields__ if f not in _DROP}
    full["usage"] = {f: getattr(record.usage, f) for f in record.usage.__struct_fields__}
    data: dict[str, Any] = {"v": record.v, **msgspec.to_builtins(full)}
    data["target_url"] = record.target_url.split("?", 1)[0]
    if record.error:  # the gateway redacts what it writes; an ingested record may not have
        data["error"] = redact_text(record.error)
    if include_bodies:
        data["request_body"] = _body_meta(record.request_body)
        data["response_body"] = _body_meta(record.response_body)
    return data


def envelope(event: str, timestamp: str, data: dict[str, Any]) -> bytes:
    return _encoder.encode({"type": event, "timestamp": timestamp, "data": data})


@dataclass(slots=True)
class NewDelivery:
    id: str
    endpoint_id: str
    tenant: str
    event: str
    subject: str
    payload: bytes
    created_at: int  # microseconds


def plan(endpoints: Sequence[Endpoint], records: Sequence[LogRecord], now_us: int) -> list[NewDelivery]:
    """Deliveries due for `records` (newly inserted ones only) to enabled `endpoints`."""
    out = []
    for ep in endpoints:
        if ep.disabled_at is not None:
            continue
        for r in records:
            if matches(ep, r):
                body = envelope(REQUEST_COMPLETED, r.ended_at.isoformat(), record_data(r, ep.include_bodies))
                out.append(
                    NewDelivery(
                        delivery_id(ep.id, REQUEST_COMPLETED, r.tenant, r.id),
                        ep.id, r.tenant, REQUEST_COMPLETED, r.id, body, now_us,
                    )
                )  # fmt: skip
    return out


def slack_text(payload: bytes) -> bytes:
    """An envelope as Slack's incoming-webhook body: one line of text a person reads.

    Rendered when sent, not when queued: the outbox keeps the standard envelope, so the delivery
    log and a redelivery look the same for every endpoint."""
    msg: dict[str, Any] = msgspec.json.decode(payload)
    event, data = msg.get("type", ""), msg.get("data") or {}
    if event in (ALERT_FIRING, ALERT_RESOLVED):
        text = data.get("summary") or f"{event} {data.get('alert_id')}"
        mark = ":rotating_light: FIRING" if event == ALERT_FIRING else ":white_check_mark: RESOLVED"
        line = f"{mark}: {text}"
    elif event == DELIVERY_DISABLED:
        line = f":warning: webhook endpoint {data.get('url')} disabled: {data.get('last_error')}"
    else:
        line = (
            f"{event}: {data.get('provider')} {data.get('model')} status {data.get('status')}"
            f" in {_ms(data.get('latency_ms'))} ms (request {data.get('id')})"
        )
    return _encoder.encode({"text": line})


def _ms(v: Any) -> Any:
    """A latency as people read it (`1.87`, not `1.8745400000170775`)."""
    return round(v, 2) if isinstance(v, float) else v


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signature_header(endpoint: Endpoint, msg_id: str, timestamp: int, body: bytes) -> str:
    sigs = [sign(endpoint.secret, msg_id, timestamp, body)]
    if endpoint.previous_secret:
        sigs.append(sign(endpoint.previous_secret, msg_id, timestamp, body))
    return " ".join(sigs)
