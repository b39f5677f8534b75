"""Who is calling: the tenant of a query-API call, and whether an ingest call is allowed.

- Single-tenant mode (default): every API call reads `settings.default_tenant`; no key needed.
- Multi-tenant mode (`LLMTAP_MULTI_TENANT=true`): every `/api/v1/*` call except the ingest
  endpoint and the OpenAPI document needs `Authorization: Bearer <key>` (a key made with
  `llmtap keys create`); the key's tenant scopes every query, in SQL. Keys are resolved through
  `llmtap.keys.resolve_tenant` (cached for at most `keys.CACHE_TTL` seconds per process).
- Ingest (`POST /api/v1/ingest`) is a service path used by gateways: it always needs
  `Authorization: Bearer <token>`, `LLMTAP_INGEST_TOKEN` or the one kept in the data dir
  (`llmtap.ingest_token`); no address is trusted (behind a reverse proxy on the same host
  every caller is loopback). In multi-tenant mode a tenant's API key is taken too (records of
  that tenant only).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from llmtap import keys
from llmtap.config import Settings
from llmtap.ingest_token import FILE
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


@dataclass(frozen=True, slots=True)
class IngestCaller:
    """Who posted to ingest: a gateway with the service token (`tenant` None: records of any
    tenant), or a tenant's API key (multi-tenant mode: only that tenant's records)."""

    tenant: str | None = None


async def check_ingest(request: web.Request, settings: Settings, store: Store) -> IngestCaller:
    """Who may post these records; raises `Unauthorized` when nobody.

    The ingest token (`LLMTAP_INGEST_TOKEN`, or the data dir's) lets a gateway post records of
    any tenant; in multi-tenant mode a tenant's key posts that tenant's.
    """
    token = request.app[INGEST_TOKEN]
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
    raise Unauthorized(  # the data dir's path is the server's business: not named to callers
        "ingest needs 'Authorization: Bearer <token>': LLMTAP_INGEST_TOKEN as set on the server,"
        f" or when it is not set the token in the server's <data dir>/{FILE}"
    )


#: The server's ingest token, read or made once at start-up (`llmtap.ingest_token`).
INGEST_TOKEN: web.AppKey[str | None] = web.AppKey("ingest_token", str)
