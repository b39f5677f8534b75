"""Tenants' API keys: generation, hashing, and resolving a bearer header to a tenant.

A key is `lt_` + 32 random bytes (urlsafe base64). Only its SHA-256 and a short prefix are
stored. A fast hash is the right choice here: keys carry 256 bits of entropy, so there is
nothing to brute-force and nothing a slow password hash (bcrypt, argon2) would protect; a slow
hash would only add latency to every API call. Lookup is by hash (indexed), and the store
confirms the match with `hmac.compare_digest`.

`resolve_tenant` keeps a small in-process cache (hash → key) so an API call or a gateway request
does not cost a database round trip. Revoking a key through `revoke_key` drops it from this
process's cache at once; other processes (another server or gateway) notice within
`CACHE_TTL` seconds, the cache's lifetime.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import weakref

from llmtap.store.base import ApiKey, Store

KEY_PREFIX = "lt_"
#: Characters of the key kept in clear to recognise it in listings (`lt_` + 8).
PREFIX_CHARS = 11
#: Seconds a resolved key (or an unknown one) is trusted before it is looked up again.
CACHE_TTL = 2.0
_CACHE_MAX = 10_000

# One cache per store object; entries: key hash -> (key or None, monotonic expiry).
_caches: weakref.WeakKeyDictionary[Store, dict[str, tuple[ApiKey | None, float]]] = (
    weakref.WeakKeyDictionary()
)


def generate_key() -> str:
    """A new random key: `lt_` followed by 43 urlsafe characters (32 bytes)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key (what the store keeps)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_prefix(key: str) -> str:
    return key[:PREFIX_CHARS]


async def create_key(store: Store, tenant: str, name: str | None) -> tuple[ApiKey, str]:
    """Create a key for `tenant`; returns the stored key and the plaintext (shown once)."""
    if not tenant or not tenant.strip():
        raise ValueError("tenant must not be empty")
    plaintext = generate_key()
    key = await store.create_key(tenant, name, hash_key(plaintext), key_prefix(plaintext))
    _cache(store).pop(hash_key(plaintext), None)  # a cached "unknown" must not outlive creation
    return key, plaintext


async def list_keys(store: Store, tenant: str | None = None) -> list[ApiKey]:
    return await store.list_keys(tenant)


async def revoke_key(store: Store, key_id: str) -> bool:
    """Revoke by id; True when an active key was revoked. Effective at once in this process."""
    revoked = await store.revoke_key(key_id)
    for cache in list(_caches.values()):
        for h in [h for h, (k, _) in cache.items() if k is not None and k.id == key_id]:
            cache.pop(h, None)
    return revoked


def parse_bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


async def resolve_tenant(store: Store, bearer_header: str | None) -> str | None:
    """The tenant of an active key given as `Bearer <key>` (or the bare key); None otherwise."""
    token = parse_bearer(bearer_header)
    if token is None and bearer_header and " " not in bearer_header.strip():
        token = bearer_header.strip()
    if token is None or not token.startswith(KEY_PREFIX) or len(token) > 200:
        return None
    digest = hash_key(token)
    cache = _cache(store)
    now = time.monotonic()
    hit = cache.get(digest)
    if hit is not None and hit[1] > now:
        key = hit[0]
    else:
        key = await store.key_by_hash(digest)
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[digest] = (key, now + CACHE_TTL)
    if key is None or key.revoked_at is not None:
        return None
    return key.tenant


def clear_cache() -> None:
    """Forget every cached key (tests; after bulk changes)."""
    for cache in list(_caches.values()):
        cache.clear()


def _cache(store: Store) -> dict[str, tuple[ApiKey | None, float]]:
    cache = _caches.get(store)
    if cache is None:
        cache = _caches[store] = {}
    return cache
