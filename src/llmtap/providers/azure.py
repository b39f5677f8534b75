"""Azure OpenAI: OpenAI's wire format under Azure's URLs, at `/azure/...`.

Both URL styles pass through unchanged: `/openai/deployments/{deployment}/chat/completions
?api-version=...` and the v1 API, `/openai/v1/chat/completions`. The client's `model` is a
*deployment* name there (any name the resource owner chose), so the record's model is the one
the response says served the request; a response without one (an error) leaves it unknown
rather than pricing a deployment name. The `api-key` header is a credential like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from llmtap.providers.base import StreamFilter, response_model
from llmtap.providers.openai import OpenAI

if TYPE_CHECKING:
    from llmtap.config import Settings

__all__ = ["Azure"]


class Azure(OpenAI):
    """`/azure/...` → `LLMTAP_AZURE_BASE_URL`; off until that is set."""

    name = "azure"
    pricing_id: str | None = "azure"

    def rewrite_scope(self, base: str, query: str) -> str:
        # API versions differ in what they take: one refusal speaks for its version only.
        return f"{base}?{query}" if query else base

    def base_url(self, settings: Settings) -> str | None:
        return settings.azure_base_url

    def model(self, path: str, request: Any, response: Any) -> str | None:
        return response_model(response, "model")

    def rewrite_request(
        self, method: str, path: str, body: bytes, query: str = ""
    ) -> tuple[bytes, StreamFilter] | None:
        """Ask for the stream's usage only where Azure takes `stream_options`: the v1 API (no
        `api-version`) and API versions from 2024-08-01 on. Older ones answer 400 to it, and
        the client's call must not fail for our logging; their streams carry no usage anyway."""
        if "api-version=" in query.lower() and not _takes_stream_options(query):
            return None
        return super().rewrite_request(method, path, body, query)


#: The first Azure OpenAI API version that takes `stream_options` (2024-08-01-preview).
_STREAM_OPTIONS_SINCE = "2024-08-01"


def _takes_stream_options(query: str) -> bool:
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name.lower() == "api-version":
            # `YYYY-MM-DD` or `YYYY-MM-DD-preview`: the date compares as text; the v1 API's
            # `preview` / `latest` labels are newer than any dated version.
            return not value[:4].isdigit() or value[:10] >= _STREAM_OPTIONS_SINCE
    return True
