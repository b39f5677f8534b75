"""Realistic records for the dashboard's browser tests, screenshots and benchmark.

Each record carries real request and response bodies in the wire formats the dashboard
renders as conversations (OpenAI chat, OpenAI Responses, Anthropic messages, Gemini
generateContent), with tools, images, reasoning and streams, and embeddings (OpenAI
`/embeddings`, Gemini `batchEmbedContents`);
`hostile_record` puts markup and `javascript:` URLs in every text field a page shows. Bodies
are inline (identity): the server's handler chain moves them to the body store and prices the
usage, as it does for a gateway's records.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from llmtap.providers.gemini import reassemble_stream
from llmtap.record import Body, LogRecord, Usage

SCRIPT = "<script>window.__pwned = (window.__pwned || 0) + 1; alert('xss')</script>"
IMG = "<img src=x onerror=\"window.__pwned = (window.__pwned || 0) + 1; alert('img')\">"
JS_URL = "javascript:window.__pwned=(window.__pwned||0)+1;alert('url')"
HOSTILE = f"{SCRIPT}{IMG}"


def _body(value: Any, content_type: str = "application/json") -> Body:
    raw = value if isinstance(value, bytes) else orjson.dumps(value)
    return Body(content_type=content_type, size=len(raw), data=raw)


def openai_chat(model: str, question: str, answer: str, *, tools: bool = False) -> tuple[Any, Any]:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a concise assistant for an online bookshop."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": "https://img.example.com/cover-1984.jpg"}},
            ],
        },
    ]
    if tools:
        messages += [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_stock_1",
                        "type": "function",
                        "function": {"name": "check_stock", "arguments": '{"isbn": "9780451524935"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_stock_1", "content": '{"in_stock": 3, "price": 9.99}'},
        ]
    request = {"model": model, "messages": messages, "temperature": 0.2}
    response = {
        "id": "chatcmpl-" + uuid.uuid4().hex[:12],
        "object": "chat.completion",
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
        ],
    }
    return request, response


def openai_responses(model: str, question: str, answer: str) -> tuple[Any, Any]:
    request = {
        "model": model,
        "instructions": "Answer as a travel agent. Prefer trains over planes.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": question}]}],
        "reasoning": {"effort": "medium", "summary": "auto"},
    }
    response = {
        "id": "resp_" + uuid.uuid4().hex[:12],
        "object": "response",
        "model": model,
        "output": [
            {
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": "Compare the routes by time."}],
            },
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": answer}]},
        ],
    }
    return request, response


#: What the embeddings calls index (for search): catalogue entries and policy paragraphs.
DOCUMENTS = (
    "1984, George Orwell. Penguin Modern Classics paperback, 336 pages. ISBN 9780451524935.",
    "Refunds: within 30 days of purchase, with a receipt, to the original payment method.",
    "Animal Farm, George Orwell. Hardback, illustrated edition, 144 pages.",
    "Store credit: after 30 days, or without a receipt, at the current shelf price.",
    "Homage to Catalonia, George Orwell. Paperback, 256 pages. Ships in 2 days.",
)
#: The tool a question calls (Anthropic's turns): name, input, result; by QUESTIONS' index.
TOOLS = (
    ("check_stock", {"isbn": "9780451524935"}, '{"in_stock": 3, "price": 9.99}'),
    (
        "search_trains",
        {"from": "Paris", "to": "Milan"},
        '[{"train": "TGV 9241", "to": "Turin"}, {"train": "FR 9531"}]',
    ),
    ("read_file", {"path": "src/app.py"}, "def main(): ..."),
    ("get_policy", {"name": "refunds"}, "Refunds: 30 days, with a receipt. After that: store credit."),
)


def anthropic_messages(
    model: str, question: str, answer: str, *, tool: tuple[str, Any, str] = TOOLS[2]
) -> tuple[Any, Any]:
    name, tool_input, result = tool
    request = {
        "model": model,
        "max_tokens": 1024,
        "system": "You help the staff of an online bookshop. Use the tools; be specific.",
        "messages": [
            {"role": "user", "content": question},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_01", "name": name, "input": tool_input}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": result}],
            },
        ],
    }
    response = {
        "id": "msg_" + uuid.uuid4().hex[:12],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [
            {"type": "thinking", "thinking": "The function has no error handling."},
            {"type": "text", "text": answer},
        ],
    }
    return request, response


WEATHER = {"forecast": "sunny, 24 C"}


def gemini_generate(model: str, question: str, answer: str, *, city: str = "Milan") -> tuple[Any, Any]:
    """A `generateContent` call as the Gemini API takes and answers it (camelCase JSON): a system
    instruction, a function call and its response, then the reply with a thought part."""
    request = {
        "systemInstruction": {"parts": [{"text": "You plan city trips. Use the weather tool."}]},
        "contents": [
            {"role": "user", "parts": [{"text": question}]},
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": city}}}]},
            {
                "role": "user",
                "parts": [{"functionResponse": {"name": "get_weather", "response": WEATHER}}],
            },
        ],
        "tools": [{"functionDeclarations": [{"name": "get_weather", "parameters": {"type": "object"}}]}],
        "generationConfig": {"temperature": 0.4, "thinkingConfig": {"includeThoughts": True}},
    }
    response = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [{"text": "Weather first, then the route.", "thought": True}, {"text": answer}],
                },
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {"promptTokenCount": 61, "candidatesTokenCount": 18, "totalTokenCount": 79},
        "modelVersion": model,
        "responseId": "gem-" + uuid.uuid4().hex[:12],
    }
    return request, response


def gemini_stream_events(response: dict[str, Any]) -> bytes:
    """`streamGenerateContent?alt=sse` events for a response: one chunk per part, each a partial
    response, the last with the finish reason and usage (the Gemini API's CRLF separators)."""
    cand = response["candidates"][0]
    parts = cand["content"]["parts"]
    chunks = []
    for i, part in enumerate(parts):
        c: dict[str, Any] = {"content": {"role": "model", "parts": [part]}, "index": 0}
        chunk: dict[str, Any] = {"candidates": [c], "modelVersion": response["modelVersion"]}
        if i == len(parts) - 1:
            c["finishReason"] = cand["finishReason"]
            chunk["usageMetadata"] = response["usageMetadata"]
        chunks.append(b"data: " + orjson.dumps(chunk) + b"\r\n\r\n")
    return b"".join(chunks)


def openai_embeddings(model: str, question: str, answer: str, *, dims: int = 8) -> tuple[Any, Any]:
    """An embeddings call with two inputs (a real model answers 1536 floats each: 8 by default)."""
    request = {"model": model, "input": [question, answer]}
    vector = [round(0.1 * i - 0.35, 3) for i in range(dims)]
    response = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(2)],
        "model": model,
        "usage": {"prompt_tokens": 24, "total_tokens": 24},
    }
    return request, response


def gemini_embed(model: str, texts: list[str], *, dims: int = 768) -> tuple[Any, Any]:
    """A `batchEmbedContents` call: one request per text, vectors cut to `dims` (the API's
    `outputDimensionality`; gemini-embedding-001 answers 3072 floats without it)."""
    request = {
        "requests": [
            {
                "model": f"models/{model}",
                "content": {"parts": [{"text": t}]},
                "taskType": "RETRIEVAL_DOCUMENT",
                "outputDimensionality": dims,
            }
            for t in texts
        ]
    }
    vector = [round(0.001 * (i % 97) - 0.048, 4) for i in range(dims)]
    return request, {"embeddings": [{"values": vector} for _ in texts]}


QUESTIONS = (
    ("Is 1984 by George Orwell in stock?", "Yes, 3 copies of 1984 are in stock at $9.99."),
    ("How do I get from Paris to Milan?", "Take the TGV to Turin, then a Frecciarossa to Milan (about 7 h)."),
    ("Review this change to src/app.py", "main() swallows exceptions; log them and exit non-zero."),
    ("Summarise our refund policy", "Refunds within 30 days with a receipt; store credit after."),
)
MODELS = (
    ("openai", "gpt-4o-mini", "chat"),
    ("openai", "gpt-4o", "chat"),
    ("openai", "o4-mini", "responses"),
    ("anthropic", "claude-sonnet-4-20250514", "messages"),
    ("anthropic", "claude-3-5-haiku-20241022", "messages"),
    ("openai", "acme-finetune-7b", "chat"),  # no price known: an unpriced request
    ("gemini", "gemini-2.5-flash", "gemini"),
    ("openai", "text-embedding-3-small", "embeddings"),
    ("gemini", "gemini-embedding-001", "gemini-embed"),
)
#: The kinds a record draws at random by default: the first six (the seeded datasets the tests
#: read keep their mix); Gemini (6) and the embeddings (7, 8) are asked for by `kind`, or drawn
#: too with `kinds=len(MODELS)` (the README's screenshots).
RANDOM_KINDS = 6
#: Gemini's questions are trips (its tool is the weather): city, question, answer.
TRIPS = (
    ("Milan", "Plan a day in Milan", "Start at the Duomo at 9, then the Brera district; sunny, 24 C."),
    ("Lisbon", "What should I pack for Lisbon this weekend?", "Light layers and walking shoes: sunny, 24 C."),
    (
        "Kyoto",
        "Two days in Kyoto: temples or food?",
        "Both: Fushimi Inari at dawn, Nishiki Market for lunch.",
    ),
)
HOSTS = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}
USERS = ("alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com", None)
FEATURES = ("search", "chat", "review", "checkout")


def record(
    n: int,
    *,
    at: datetime,
    rng: random.Random,
    tenant: str = "default",
    session: str | None = None,
    user: str | None = None,
    kind: int | None = None,
    kinds: int = RANDOM_KINDS,
) -> LogRecord:
    """One realistic record (bodies inline, cost left to the server's price table); `kind`
    picks its model in MODELS, else one of the first `kinds` is drawn."""
    provider, model, wire = MODELS[kind if kind is not None else rng.randrange(kinds)]
    embeds = wire in ("embeddings", "gemini-embed")
    question, answer = QUESTIONS[n % len(QUESTIONS)]
    streamed = rng.random() < 0.4
    if wire == "chat":
        req, resp = openai_chat(model, question, answer, tools=n % 3 == 0)
        path = "/v1/chat/completions"
    elif wire == "responses":
        req, resp = openai_responses(model, question, answer)
        path = "/v1/responses"
    elif wire == "gemini":
        city, trip, plan = TRIPS[n % len(TRIPS)]
        req, resp = gemini_generate(model, trip, plan, city=city)
        path = f"/v1beta/models/{model}:" + ("streamGenerateContent" if streamed else "generateContent")
    elif wire == "embeddings":
        docs = (DOCUMENTS[n % len(DOCUMENTS)], DOCUMENTS[(n + 1) % len(DOCUMENTS)])
        req, resp = openai_embeddings(model, *docs, dims=1536)
        path = "/v1/embeddings"
        streamed = False
    elif wire == "gemini-embed":
        req, resp = gemini_embed(model, [DOCUMENTS[n % len(DOCUMENTS)], DOCUMENTS[(n + 1) % len(DOCUMENTS)]])
        path = f"/v1beta/models/{model}:batchEmbedContents"
        streamed = False
    else:
        req, resp = anthropic_messages(model, question, answer, tool=TOOLS[n % len(TOOLS)])
        path = "/v1/messages"
    status = rng.choices((200, 429, 500, 400), weights=(90, 4, 3, 3))[0]
    # An embeddings call: two sentences in, no output, fast (the same draws, other bounds).
    latency = rng.lognormvariate(5.0 if embeds else 6.6, 0.5)
    ttft = latency * rng.uniform(0.1, 0.4) if streamed else None
    prompt = rng.randrange(12, 60) if embeds else rng.randrange(200, 4000)
    completion = rng.randrange(20, 800) if status == 200 and not embeds else 0
    # An embeddings call has no output: its usage has no completion tokens (a dash, not 0).
    cached = rng.choice((None, None, prompt // 2))
    cached = None if embeds else cached
    usage = Usage(
        source="provider" if status == 200 else "missing",
        prompt_tokens=prompt if status == 200 else None,
        completion_tokens=completion if status == 200 and not embeds else None,
        total_tokens=prompt + completion if status == 200 else None,
        cached_tokens=cached if status == 200 else None,
        cache_write_tokens=rng.choice((None, 128)) if provider == "anthropic" and status == 200 else None,
        reasoning_tokens=rng.randrange(50, 300) if wire == "responses" and status == 200 else None,
    )
    events = None
    if streamed and status == 200:
        if provider == "gemini":
            # What the store holds for a Gemini stream: the events, and the response the worker
            # reassembles from them (`handlers.streams`).
            raw = gemini_stream_events(resp)
            resp = reassemble_stream(raw).message  # type: ignore[union-attr]
            events = _body(raw, "text/event-stream")
        elif provider == "anthropic":
            lines = [
                "event: message_start\ndata: " + orjson.dumps({"type": "message_start"}).decode(),
                "event: content_block_delta\ndata: "
                + orjson.dumps(
                    {"type": "content_block_delta", "delta": {"type": "text_delta", "text": answer}}
                ).decode(),
                'event: message_stop\ndata: {"type": "message_stop"}',
            ]
            events = _body(("\n\n".join(lines) + "\n\n").encode(), "text/event-stream")
        else:
            lines = [
                "data: " + orjson.dumps({"choices": [{"delta": {"content": answer}}]}).decode(),
                "data: [DONE]",
            ]
            events = _body(("\n\n".join(lines) + "\n\n").encode(), "text/event-stream")
    error = None
    if status != 200:
        resp = {
            "error": {"message": "Rate limit reached" if status == 429 else "upstream error", "type": "error"}
        }
        error = f"upstream answered {status}"
    started = at
    return LogRecord(
        id=str(uuid.UUID(int=rng.getrandbits(128))),
        tenant=tenant,
        user_id=user if user is not None else rng.choice(USERS),
        session_id=session,
        properties={"feature": FEATURES[n % len(FEATURES)], "env": rng.choice(("prod", "prod", "staging"))},
        provider=provider,
        target_url=HOSTS[provider] + path,
        method="POST",
        path=path,
        model=model,
        streamed=streamed,
        started_at=started,
        first_byte_at=started + timedelta(milliseconds=ttft or latency * 0.9),
        ended_at=started + timedelta(milliseconds=latency),
        latency_ms=round(latency, 3),
        time_to_first_token_ms=None if ttft is None else round(ttft, 3),
        status=status,
        error=error,
        usage=usage,
        request_headers={"content-type": "application/json", "user-agent": "OpenAI/Python 1.99.0"},
        response_headers={"content-type": "application/json", "x-request-id": "req_" + uuid.uuid4().hex[:10]},
        request_body=_body(req),
        response_body=_body(resp),
        response_events=events,
        route="ingest",
        gateway="gw-1:4242",
    )


def dataset(
    count: int,
    *,
    tenant: str = "default",
    seed: int = 1,
    now: datetime | None = None,
    span: timedelta | None = None,
    kinds: int = RANDOM_KINDS,
) -> list[LogRecord]:
    """`count` records spread over `span` (default one day) before `now`, some in sessions,
    drawn from the first `kinds` of MODELS."""
    rng = random.Random(seed)
    end = now or datetime.now(UTC)
    span = span or timedelta(days=1)
    out = []
    for n in range(count):
        at = end - timedelta(seconds=rng.uniform(5, span.total_seconds()))
        session = f"sess-{n % 40:03d}" if n % 2 == 0 else None
        user = USERS[n % 40 % 4] if session else None  # a session belongs to one user
        out.append(record(n, at=at, rng=rng, tenant=tenant, session=session, user=user, kinds=kinds))
    return out


def hostile_record(*, tenant: str = "default", at: datetime | None = None) -> LogRecord:
    """Markup and `javascript:` URLs in every field the dashboard shows."""
    at = at or datetime.now(UTC) - timedelta(seconds=30)
    req = {
        "model": JS_URL,
        "messages": [
            {"role": "system", "content": HOSTILE},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": HOSTILE},
                    {"type": "image_url", "image_url": {"url": JS_URL}},
                    {"type": "image_url", "image_url": {"url": "data:text/html,<script>alert(1)</script>"}},
                ],
            },
            {
                "role": HOSTILE,
                "content": HOSTILE,
                "tool_calls": [{"id": HOSTILE, "function": {"name": HOSTILE, "arguments": HOSTILE}}],
            },
        ],
    }
    resp = {"choices": [{"message": {"role": "assistant", "content": HOSTILE}}]}
    return LogRecord(
        id="hostile-" + uuid.uuid4().hex[:12],  # ids name bodies: the gateway makes them, plain
        tenant=tenant,
        user_id=SCRIPT,
        session_id=IMG,
        properties={IMG: SCRIPT, "link": JS_URL},
        provider="openai",
        target_url=JS_URL,
        method="POST",
        path="/v1/chat/completions",
        model=JS_URL,
        streamed=True,
        started_at=at,
        first_byte_at=at + timedelta(milliseconds=50),
        ended_at=at + timedelta(milliseconds=120),
        latency_ms=120.0,
        time_to_first_token_ms=50.0,
        status=500,
        error=HOSTILE,
        usage=Usage(source="provider", prompt_tokens=5, completion_tokens=5, total_tokens=10),
        request_headers={HOSTILE: JS_URL},
        response_headers={"x-evil": HOSTILE},
        request_body=_body(req),
        response_body=_body(resp),
        response_events=_body(HOSTILE.encode(), "text/event-stream"),
        price_version=HOSTILE,
        route="ingest",
        gateway=HOSTILE,
    )
