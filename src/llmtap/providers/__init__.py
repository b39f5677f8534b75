"""Providers and the one routing table the gateway uses.

A route is the first path segment: `/openai/v1/chat/completions` goes to the `openai` route,
whose provider says where upstream is and how to read its answers. Built-in routes are the
classes in `BUILTIN`; `LLMTAP_UPSTREAMS` adds named OpenAI-compatible ones. To add a provider,
write a `Provider` subclass in its own module and add it to `BUILTIN` (see the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmtap.providers.anthropic import Anthropic
from llmtap.providers.azure import Azure
from llmtap.providers.base import Provider, StreamFilter
from llmtap.providers.gemini import Gemini
from llmtap.providers.openai import OpenAI, OpenAICompatible, sends_stream_usage

if TYPE_CHECKING:
    from llmtap.config import Settings

__all__ = ["BUILTIN", "Provider", "Route", "StreamFilter", "pricing_id", "provider_for", "routes"]

#: Route name (= the record's `provider`) → provider class. A named upstream may not reuse these.
BUILTIN: dict[str, type[Provider]] = {
    "openai": OpenAI,
    "anthropic": Anthropic,
    "gemini": Gemini,
    "azure": Azure,
}


@dataclass(frozen=True, slots=True)
class Route:
    provider: Provider
    base: str  # upstream base URL, no trailing slash


def _asks_stream_usage(settings: Settings | None, name: str) -> bool:
    """Whether route `name`'s streams are rewritten to report usage (`openai.inject_stream_usage`)."""
    if settings is None:
        return True
    return settings.openai_stream_usage and name not in settings.stream_usage_routes_skipped


def _make(cls: type[Provider], settings: Settings | None, name: str) -> Provider:
    if issubclass(cls, (OpenAI, Gemini)):  # Gemini: its OpenAI-compatible endpoint's streams
        return cls(_asks_stream_usage(settings, name))
    return cls()


def routes(settings: Settings) -> dict[str, Route]:
    """Route name → route, for the proxy: built-ins whose upstream is configured, then
    `LLMTAP_UPSTREAMS` (config validation keeps their names off the built-ins')."""
    table: dict[str, Route] = {}
    for name, cls in BUILTIN.items():
        provider = _make(cls, settings, name)
        base = provider.base_url(settings)
        if base and isinstance(provider, OpenAI) and sends_stream_usage(base):
            provider.stream_usage = False  # `LLMTAP_OPENAI_BASE_URL=https://openrouter.ai/api`
        if base:
            table[name] = Route(provider, base)
    for name, url in settings.upstream_map.items():
        table[name] = Route(OpenAICompatible(name, url, _asks_stream_usage(settings, name)), url)
    return table


_formats: dict[str, Provider] = {}


def provider_for(name: str, path: str = "") -> Provider:
    """The provider that reads records of route `name` (off the latency path), in the wire
    format of `path` (`Provider.wire`). A name that is not built in is a named upstream:
    OpenAI's format, its own prices."""
    p = _formats.get(name)
    if p is None:
        cls = BUILTIN.get(name)
        p = _make(cls, None, name) if cls is not None else OpenAICompatible(name)
        if len(_formats) < 1024:  # names come from records: bound the cache
            _formats[name] = p
    return p.wire(path)


def pricing_id(name: str) -> str | None:
    """The price table's provider id for records of route `name` (None: never priced)."""
    return provider_for(name).pricing_id
