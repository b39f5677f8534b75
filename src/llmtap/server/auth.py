"""Who is calling: the tenant of a query-API call, and whether an ingest call is allowed.

- Single-tenant mode (default): every API call reads `settings.default_tenant`; no key needed.
- Multi-tenant mode (`LLMTAP_MULTI_TENANT=true`): every `/api/v1/*` call except the ingest
  endpoint and the OpenAPI document needs `Authorization: Bearer <key>` (a key made with
  `llmtap keys create`); the key's tenant scopes every query, in SQL. Keys are resolved through
  `llmtap.keys.resolve_tenant` (cached for at most `keys.CACHE_TTL` seconds per process).
- Ingest (`POST /api/v1/ingest`) is a service path used by gateways: it needs
  `Authorization: Bearer <LLMTAP_INGEST_TOKEN>`. In single-tenant mode without an ingest token
  it accepts only connections from loopback addresses (127.0.0.0/8, ::1), which is what the
  embedded `llmtap up` needs and never exposes the endpoint to the network by accident. In
  multi-tenant mode it is always authenticated: the ingest token (records of any tenant) or a
  tenant's API key (records of that tenant only); loopback is not trusted there.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from aiohttp import web

from llmtap import keys
from llmtap.config import Settings
from llmtap.store.base import Store


class Unauthorized(Exception):
    """The call lacks valid credentials; the message says what is missing."""


async def tenant_for(request: web.Request, settings: Settings, store: Store) -> str:
    """The tenant this API call may see. Raises `Unauthorized` in multi-tenant mode without a key."""
    if not settings.multi_tenant:
        return settings.default_tenant
    header = request.headers.get("Authorization")
    if not header:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    tenant = await keys.resolve_tenant(store, header)
    if tenant is None:
        raise Unauthorized("invalid or revoked API key")
    return tenant


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class IngestCaller:
    """Who posted to ingest: a gateway with the service token (`tenant` None: records of any
    tenant), or a tenant's API key (multi-tenant mode: only that tenant's records)."""

    tenant: str | None = None


async def check_ingest(request: web.Request, settings: Settings, store: Store) -> IngestCaller:
    """Who may post these records; raises `Unauthorized` when nobody.

    Multi-tenant mode never trusts the network: a local caller (or a reverse proxy on this
    host) could otherwise forge records into any tenant. It takes the ingest token or a
    tenant's key; single-tenant mode keeps the loopback rule when no token is set.
    """
    token = settings.ingest_token
    given = keys.parse_bearer(request.headers.get("Authorization"))
    if token is not None and given is not None:
        if hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode()):
            return IngestCaller()
    if settings.multi_tenant:
        if given is not None:
            tenant = await keys.resolve_tenant(store, request.headers["Authorization"])
            if tenant is not None:
                return IngestCaller(tenant=tenant)
        raise Unauthorized(
            "ingest in multi-tenant mode needs 'Authorization: Bearer <LLMTAP_INGEST_TOKEN>'"
            " (set on the server) or a tenant's API key"
        )
    if token is None:
        if not is_loopback(request.remote):
            raise Unauthorized("ingest from other hosts needs LLMTAP_INGEST_TOKEN set on the server")
        return IngestCaller()
    raise Unauthorized("invalid or missing ingest token: send 'Authorization: Bearer <LLMTAP_INGEST_TOKEN>'")
