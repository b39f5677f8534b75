"""What a provider is to llmtap: one class, one entry in the routing table (`llmtap.providers`).

The proxy and the record builder know providers only through this interface, so adding one is
a file with a `Provider` subclass plus an entry in `llmtap.providers.BUILTIN`. Two methods run
on the latency path and must stay cheap (`rewrite_request`, and the `StreamFilter` it may
return); everything else runs in the publisher's background task on bytes already relayed.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol

from llmtap.providers.common import error_message as _common_error_message
from llmtap.record import Usage

if TYPE_CHECKING:
    from llmtap.config import Settings
    from llmtap.providers.sse import StreamResult


class StreamFilter(Protocol):
    """Removes from a relayed stream what a request rewrite added (hot path)."""

    def feed(self, chunk: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


_DECODER = json.JSONDecoder()


#: Path ends of POST calls that are never billed (cancelling, counting tokens, moderations).
_FREE = (
    "/cancel", "/count_tokens", ":countTokens", "/moderations",
    # Uploads, and batches or fine-tuning jobs created (billed when they run, where llmtap
    # never sees it): OpenAI, Anthropic (`/v1/messages/batches`) and Gemini.
    # (Not "/complete": Anthropic's legacy text completions are `POST /v1/complete`.)
    "/files", "/uploads", "/batches", "/jobs", ":batchGenerateContent",
)  # fmt: skip


class Provider(ABC):
    """One wire format reachable under a route prefix.

    `name` is the record's `provider`; `pricing_id` the price table's provider id (None: never
    priced, e.g. a self-hosted server whose prices nobody publishes).
    """

    name: str
    pricing_id: str | None

    @abstractmethod
    def base_url(self, settings: Settings) -> str | None:
        """The upstream for this route, or None while the route is off (not configured)."""

    def rewrite_request(
        self, method: str, path: str, body: bytes, query: str = ""
    ) -> tuple[bytes, StreamFilter] | None:
        """Hot path: a changed request body and the filter that hides the change from the
        client's stream, or None to send the request unchanged (the default). `path` is the
        upstream path without its query; `query` is the query string as sent, without `?`."""
        return None

    def refuses_rewrite(self, status: int, body: bytes) -> bool:
        """Whether an error answer (read whole, small) refuses what `rewrite_request` added:
        the gateway then sends the client's own request instead, and no rewrite again to the
        same upstream (`rewrite_scope`)."""
        return False

    def rewrite_scope(self, base: str, query: str) -> str:
        """What one refusal of a rewrite speaks for: the upstream, by default."""
        return base

    #: The member of a non-stream answer that holds its usage (every provider sends it last).
    usage_member = "usage"
    #: Answer headers (lower case) whose URL at the upstream is rewritten to the gateway's own
    #: route, so the client's next call comes through it (a redirect's `Location`).
    relocated_headers: frozenset[str] = frozenset({"location"})

    def wire(self, path: str) -> Provider:
        """The provider that speaks `path`'s wire format: this one, but for an API that also
        answers in another's (Gemini's OpenAI-compatible endpoint under `/v1beta/openai/`).
        Every reader of a request or its answer asks this first (`provider_for(name, path)`)."""
        return self

    def bills(self, method: str, path: str) -> bool:
        """Whether this call's answer is billed: a POST that generates. Looking up an earlier
        answer (`GET /v1/responses/{id}`, a stored chat completion) or cancelling one echoes
        the usage it was billed for once already; counted again, a client polling a
        background response would pay once per poll. Token counting (`count_tokens`,
        `:countTokens`) and OpenAI's moderations are free, and an upload or a batch created
        generates nothing yet: their records cost $0."""
        if method != "POST" or path.endswith(_FREE):
            return False
        # An upload's parts and its completion (`/v1/uploads/{id}/parts`, `/complete`): not
        # Anthropic's billed `POST /v1/complete`, so matched under `/uploads/` only.
        return not ("/uploads/" in path and path.endswith(("/parts", "/complete")))

    @abstractmethod
    def usage_from_body(self, body: Any) -> Usage:
        """Usage of a parsed non-stream response body."""

    def usage_from_tail(self, tail: bytes) -> Usage:
        """Usage of a non-stream answer too big to keep (a 60 MB embeddings list), from the
        last bytes the capture kept: its last `"usage": {...}` member."""
        value = tail_member(tail, self.usage_member)
        return Usage() if value is None else self.usage_from_body({self.usage_member: value})

    def response_from_tail(self, tail: bytes) -> dict[str, Any]:
        """What `model` may read of such an answer: its last `"model"` member, which the
        embeddings answers of OpenAI and its kind put beside their usage (the request, cut
        too, named it after the inputs)."""
        value = tail_member(tail, "model")
        return {"model": value} if isinstance(value, str) else {}

    @abstractmethod
    def reassemble_stream(self, raw: bytes) -> StreamResult | None:
        """The non-stream response a captured stream stands for; None if it holds no events."""

    def stream_summary(self, raw: bytes) -> StreamResult | None:
        """A captured stream's usage, model, error and completeness without its message, when
        they can be had far cheaper than by `reassemble_stream` (the message field is None);
        None to have the gateway reassemble it. The worker reassembles the message later."""
        return None

    def turn(self, request: Any) -> Any:
        """What a parsed request body adds to its conversation (`LLMTAP_SEARCH_SCOPE=turn`).

        Chat APIs resend every earlier message with each turn; indexing them again each time
        makes a conversation's search cost grow with the square of its length. The default,
        for APIs without history, is the whole request.
        """
        return request

    def usage_from_request(self, path: str, request: Any) -> Usage | None:
        """What a billed call's parsed request says it uses, for an answer that reports no
        usage (source "estimated"); None: nothing (the default)."""
        return None

    def usage_from_text(self, path: str, request: Any, answer: bytes) -> Usage | None:
        """What a billed call's answer that is no JSON says it used (subtitles: the audio's
        length, source "estimated"); None: nothing (the default)."""
        return None

    def end_user(self, request: Any) -> str | None:
        """The end user a parsed request body names, for a client that sent no `Llmtap-User-Id`.

        Apps already tell the provider who asks (OpenAI's `user`, Anthropic's
        `metadata.user_id`); asking them to say it again in a header lost it wherever they
        did not. None by default: the API has no such field.
        """
        return None

    def error_message(self, body: Any) -> str | None:
        """The human-readable message of a parsed error body."""
        return _common_error_message(body)

    def token_marker(self, path: str) -> re.Pattern[bytes] | None:
        """What only a stream's chunks of generated output hold, for its time to first token;
        None: the first chunk is one (Gemini). Where a stream opens with events sent before the
        model produced anything (OpenAI chat's `"role":"assistant","content":""`, Responses'
        `response.created`, Anthropic's `message_start`), its first byte said nothing about
        when the first token came (a reasoning model: seconds before it)."""
        return None

    def model(self, path: str, request: Any, response: Any) -> str | None:
        """The record's model: by default the one the client asked for, else the response's.

        `path` is the upstream path without query, `request` the parsed request body, `response`
        the parsed response body (for streams: the reassembled message).
        """
        model = request.get("model") if isinstance(request, dict) else None
        if isinstance(model, str):
            return model
        return response_model(response, "model")


def tail_member(tail: bytes, name: str) -> Any:
    """The value of the last `"name": ...` member in the kept end of a JSON text, or None.
    Outside strings, where every quote is escaped, that text can only be a member name."""
    key = f'"{name}"'.encode()
    at = tail.rfind(key)
    if at < 0:
        return None
    text = tail[at + len(key) :].decode("utf-8", "replace").lstrip()
    if not text.startswith(":"):
        return None
    try:
        value, _ = _DECODER.raw_decode(text[1:].lstrip())
    except ValueError:
        return None
    return value


def text_member(obj: Any, *path: str) -> str | None:
    """The string at `obj[path[0]][path[1]]...` that is not blank, or None."""
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj if isinstance(obj, str) and obj.strip() else None


def response_model(response: Any, key: str) -> str | None:
    """`response[key]` when it is a non-empty string."""
    value = response.get(key) if isinstance(response, dict) else None
    return value if isinstance(value, str) and value else None
