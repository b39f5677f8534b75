"""Azure OpenAI: OpenAI's wire format under Azure's URLs, at `/azure/...`.

Both URL styles pass through unchanged: `/openai/deployments/{deployment}/chat/completions
?api-version=...` and the v1 API, `/openai/v1/chat/completions`. The client's `model` is a
*deployment* name there (any name the resource owner chose), so the record's model is the one
the response says served the request; a response without one (an error) leaves it unknown
rather than pricing a deployment name. The `api-key` header is a credential like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmtap.providers.base import response_model
from llmtap.providers.openai import OpenAI

if TYPE_CHECKING:
    from llmtap.config import Settings

__all__ = ["Azure"]


class Azure(OpenAI):
    """`/azure/...` → `LLMTAP_AZURE_BASE_URL`; off until that is set."""

    name = "azure"
    pricing_id: str | None = "azure"

    def base_url(self, settings: Settings) -> str | None:
        return settings.azure_base_url

    def model(self, path: str, request: Any, response: Any) -> str | None:
        return response_model(response, "model")
