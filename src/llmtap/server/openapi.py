"""The OpenAPI 3.1 description of the query API, written by hand to match `api.py`.

`tests/test_api.py` checks that every route the app serves is described here and that the
parameters listed are exactly those the handlers accept.
"""

from __future__ import annotations

from typing import Any

from llmtap import __version__
from llmtap.store.query import MAX_BUCKETS, MAX_GROUPS, MAX_SESSION_REQUESTS, STAT_GROUPS


def _q(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_STR = {"type": "string"}
_TIME = {"type": "string", "description": "ISO 8601 (naive means UTC) or epoch seconds"}
_FILTERS = [
    _q("user_id", "Only this user's requests (Llmtap-User-Id).", _STR),
    _q("session_id", "Only this session's requests (Llmtap-Session-Id).", _STR),
    _q("model", "Only this model.", _STR),
    _q("provider", "Only this provider (openai, anthropic).", _STR),
    _q("status", "Only this HTTP status.", {"type": "integer", "minimum": 100, "maximum": 599}),
    _q("status_class", "Only this class of HTTP status.", {"enum": ["1xx", "2xx", "3xx", "4xx", "5xx"]}),
    _q("min_cost_usd", "Only priced requests costing at least this (USD).", {"type": "number", "minimum": 0}),
    _q("max_cost_usd", "Only priced requests costing at most this (USD).", {"type": "number", "minimum": 0}),
    _q("min_latency_ms", "Only requests at least this slow (ms).", {"type": "number", "minimum": 0}),
    _q("max_latency_ms", "Only requests at most this slow (ms).", {"type": "number", "minimum": 0}),
    _q("since", "Requests started at or after this time.", _TIME),
    _q("until", "Requests started before this time (exclusive).", _TIME),
]
_PROPERTY = {
    "name": "property.<Name>",
    "in": "query",
    "required": False,
    "description": "Only requests whose property <Name> (Llmtap-Property-<Name>) equals the value.",
    "schema": _STR,
}
_ERR = {"$ref": "#/components/responses/Error"}
_AUTH_ERRORS = {"400": _ERR, "401": _ERR, "503": _ERR}

_PCT = {
    "type": "object",
    "properties": {k: {"type": ["number", "null"]} for k in ("p50", "p90", "p95", "p99")},
    "description": "Percentiles by linear interpolation (PostgreSQL percentile_cont); null without data.",
}


def _doc(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {**schema, "description": description}


_TOTALS = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "error_count": {"type": "integer", "description": "status >= 400 or outcome other than completed"},
        "error_rate": {"type": "number"},
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "cached_tokens": {"type": "integer"},
        "cache_write_tokens": {"type": "integer"},
        "reasoning_tokens": {"type": "integer"},
        "cost_usd": {"type": "number", "description": "summed exactly in nano-dollars, then divided"},
        "unpriced_count": {"type": "integer", "description": "requests without a price (cost_usd null)"},
        "first_at": {"type": ["string", "null"], "format": "date-time"},
        "last_at": {"type": ["string", "null"], "format": "date-time"},
        "latency_ms": _PCT,
        "time_to_first_token_ms": _PCT,
    },
}
_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}
_REQUEST_SUMMARY = {
    "type": "object",
    "properties": {
        "id": _STR,
        "tenant": _STR,
        "created_at": {"type": "string", "format": "date-time", "description": "request start, UTC"},
        "provider": _STR,
        "model": _NULLABLE_STR,
        "method": _STR,
        "path": _STR,
        "target_url": _STR,
        "status": _NULLABLE_INT,
        "outcome": {
            "enum": [
                "completed",
                "client_disconnected",
                "upstream_cut",
                "upstream_timeout",
                "upstream_unreachable",
            ]
        },
        "error": _NULLABLE_STR,
        "streamed": {"type": "boolean"},
        "latency_ms": {"type": "number"},
        "time_to_first_token_ms": {"type": ["number", "null"]},
        "prompt_tokens": _doc(
            _NULLABLE_INT, "all input tokens of every provider: uncached, cache reads and cache writes"
        ),
        "completion_tokens": _doc(_NULLABLE_INT, "all output tokens, reasoning included"),
        "total_tokens": _doc(_NULLABLE_INT, "prompt_tokens + completion_tokens (the provider's own total)"),
        "cached_tokens": _doc(_NULLABLE_INT, "the part of prompt_tokens read from the provider's cache"),
        "cache_write_tokens": _doc(_NULLABLE_INT, "the part of prompt_tokens written to the cache"),
        "reasoning_tokens": _doc(_NULLABLE_INT, "the part of completion_tokens spent thinking"),
        "usage_source": {
            "enum": ["provider", "partial", "estimated", "missing"],
            "description": "partial: a stream that ended before its end marker, counts seen so far",
        },
        "cost_usd": {"type": ["number", "null"]},
        "price_version": _NULLABLE_STR,
        "user_id": _NULLABLE_STR,
        "session_id": _NULLABLE_STR,
        "properties": {"type": "object", "additionalProperties": _STR},
        "request_headers": {"type": "object", "additionalProperties": _STR},
        "response_headers": {"type": "object", "additionalProperties": _STR},
        "route": {"enum": ["queue", "ingest", "spool"]},
        "first_byte_at": {"type": ["string", "null"], "format": "date-time"},
        "ended_at": {"type": ["string", "null"], "format": "date-time"},
        "gateway": _NULLABLE_STR,
        "truncated": {
            "type": "array",
            "items": _STR,
            "description": "metadata cut to the documented limits (e.g. properties, user_id)",
        },
    },
}
_BODY_INFO = {
    "type": ["object", "null"],
    "properties": {
        "content_type": _NULLABLE_STR,
        "size": {"type": "integer"},
        "truncated": {"type": "boolean"},
    },
}
_REQUEST = {
    "allOf": [
        {"$ref": "#/components/schemas/RequestSummary"},
        {
            "type": "object",
            "properties": {
                "request_body": {
                    "description": "JSON where the body was JSON, else text; null where omitted"
                },
                "response_body": {
                    "description": "JSON where the body was JSON, else text; null where omitted"
                },
                "response_events": {
                    "type": ["string", "null"],
                    "description": "raw SSE of a streamed response",
                },
                "bodies": {
                    "type": "object",
                    "properties": {
                        k: _BODY_INFO for k in ("request_body", "response_body", "response_events")
                    },
                },
            },
        },
    ]
}


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document() -> dict[str, Any]:
    groups = ", ".join(STAT_GROUPS)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llmtap query API",
            "version": __version__,
            "description": (
                "Query logged LLM requests. Unknown or repeated query parameters and bad values are "
                "answered 400 with the parameter named. In multi-tenant mode every call except "
                "/api/v1/ingest and this document needs 'Authorization: Bearer <key>' and sees only "
                "its tenant's data. Every route except /healthz and /metrics answers 421 to a Host "
                "not in LLMTAP_ALLOWED_HOSTS (a guard against DNS rebinding)."
            ),
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a key from `llmtap keys create`",
                },
                "ingestToken": {"type": "http", "scheme": "bearer", "description": "LLMTAP_INGEST_TOKEN"},
            },
            "responses": {
                "Error": _ok(
                    {
                        "type": "object",
                        "properties": {
                            "error": {
                                "type": "object",
                                "properties": {"message": _STR, "parameter": _STR},
                                "required": ["message"],
                            }
                        },
                    },
                    "An error; `parameter` names the offending query parameter for 400s.",
                )
            },
            "schemas": {"RequestSummary": _REQUEST_SUMMARY, "Request": _REQUEST, "Totals": _TOTALS},
        },
        "security": [{}, {"apiKey": []}],
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Readiness",
                    "security": [{}],
                    "responses": {"200": _ok({"type": "object"})},
                }
            },
            "/api/v1/requests": {
                "get": {
                    "summary": "List requests, newest first, with cursor pagination",
                    "parameters": [
                        _q(
                            "limit",
                            "Page size.",
                            {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                        ),
                        _q("cursor", "The next_cursor of the previous page (opaque).", _STR),
                        _q("order", "desc (newest first, default) or asc.", {"enum": ["desc", "asc"]}),
                        _q(
                            "sort",
                            "Keyset order: time (default), cost (unpriced after every priced request in"
                            " descending order) or latency; ties by time. A cursor is valid for its sort.",
                            {"enum": ["time", "cost", "latency"]},
                        ),
                        _q(
                            "q",
                            "Case-insensitive substring of the request/response text (string values of "
                            "JSON bodies, stream text; the first 32 KiB per request), 1-200 characters.",
                            _STR,
                        ),
                        *_FILTERS,
                        _PROPERTY,
                    ],
                    "responses": {
                        "200": _ok(
                            {
                                "type": "object",
                                "properties": {
                                    "items": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/RequestSummary"},
                                    },
                                    "next_cursor": _NULLABLE_STR,
                                },
                            }
                        ),
                        **_AUTH_ERRORS,
                    },
                }
            },
            "/api/v1/requests/{id}": {
                "get": {
                    "summary": "One request with its bodies",
                    "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STR}],
                    "responses": {
                        "200": _ok({"$ref": "#/components/schemas/Request"}),
                        "404": {**_ERR, "description": "not stored (yet)"},
                        **_AUTH_ERRORS,
                    },
                }
            },
            "/api/v1/stats": {
                "get": {
                    "summary": "Counts, tokens, cost, error rate and latency percentiles",
                    "description": (
                        f"Overall, per group (at most {MAX_GROUPS}, largest first) and per time bucket "
                        f"(at most {MAX_BUCKETS}, oldest first). The list filters apply too. "
                        "Answered from rollups (percentiles within `percentile_relative_error`, 1%, "
                        "of the exact ones; counts and sums exact) when there is no list filter, "
                        "group_by is rolled up and since/until fall on minute boundaries; else "
                        "from raw rows (`source` says which)."
                    ),
                    "parameters": [
                        _q("group_by", f"One of {groups} or property.<Name>.", _STR),
                        _q("bucket", "Time buckets (UTC).", {"enum": ["minute", "hour", "day"]}),
                        _q("exact", "true: answer from raw rows (exact percentiles).", {"type": "boolean"}),
                        *_FILTERS,
                        _PROPERTY,
                    ],
                    "responses": {
                        "200": _ok(
                            {
                                "type": "object",
                                "properties": {
                                    "overall": {"$ref": "#/components/schemas/Totals"},
                                    "groups": {
                                        "type": "array",
                                        "items": {
                                            "allOf": [
                                                {"type": "object", "properties": {"key": {}}},
                                                {"$ref": "#/components/schemas/Totals"},
                                            ]
                                        },
                                    },
                                    "buckets": {
                                        "type": "array",
                                        "items": {
                                            "allOf": [
                                                {
                                                    "type": "object",
                                                    "properties": {
                                                        "start": {"type": "string", "format": "date-time"}
                                                    },
                                                },
                                                {"$ref": "#/components/schemas/Totals"},
                                            ]
                                        },
                                    },
                                    "group_by": _NULLABLE_STR,
                                    "bucket": _NULLABLE_STR,
                                    "source": {"enum": ["rollups", "raw"]},
                                    "percentile_relative_error": {"type": "number"},
                                    "since": _NULLABLE_STR,
                                    "until": _NULLABLE_STR,
                                },
                            }
                        ),
                        **_AUTH_ERRORS,
                    },
                }
            },
            "/api/v1/sessions/{id}": {
                "get": {
                    "summary": f"A session's requests, oldest first (at most {MAX_SESSION_REQUESTS})",
                    "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STR}],
                    "responses": {
                        "200": _ok(
                            {
                                "type": "object",
                                "properties": {
                                    "session_id": _STR,
                                    "totals": {"$ref": "#/components/schemas/Totals"},
                                    "requests": {
                                        "type": "array",
                                        "items": {"$ref": "#/components/schemas/RequestSummary"},
                                    },
                                    "truncated": {"type": "boolean"},
                                },
                            }
                        ),
                        "404": _ERR,
                        **_AUTH_ERRORS,
                    },
                }
            },
            "/api/v1/users": {
                "get": {
                    "summary": "Per-user totals, most recently active first",
                    "parameters": [
                        _q(
                            "limit",
                            "How many users.",
                            {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        )
                    ],
                    "responses": {
                        "200": _ok({"type": "object", "properties": {"items": {"type": "array"}}}),
                        **_AUTH_ERRORS,
                    },
                }
            },
            "/api/v1/ingest": {
                "post": {
                    "summary": "Fallback path: hand log records to the server, which stores them",
                    "description": (
                        "Body (Content-Type: application/json): one log record (v1) or a JSON array of "
                        "them. Answers 200 once every accepted record is durable on the server (its "
                        "ingest queue, fsynced); the server stores them right after, and after a restart "
                        "if it crashed first. 503 with Retry-After when it cannot write them down (retry "
                        "later; writes are idempotent); 400 naming the problem for unreadable input "
                        "(nothing accepted) or for records that cannot be stored as posted (the others "
                        "are accepted; `accepted` and `rejected` say which); 403 when a tenant's key posts "
                        "another tenant's records or body references outside its own tenant's folder; "
                        "413 above the size limit; 415 for another Content-Type. Needs 'Authorization: "
                        "Bearer <LLMTAP_INGEST_TOKEN>' (any tenant's records), or in multi-tenant mode a "
                        "tenant's key (that tenant's records only); in single-tenant mode without a "
                        "configured token only loopback clients may post."
                    ),
                    "security": [{"ingestToken": []}, {"apiKey": []}],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
                    "responses": {
                        "200": _ok({"type": "object", "properties": {"accepted": {"type": "integer"}}}),
                        "400": _ERR,
                        "401": _ERR,
                        "403": _ERR,
                        "413": _ERR,
                        "415": _ERR,
                        "503": _ERR,
                    },
                }
            },
            "/api/v1/requests/export": {
                "get": {
                    "summary": "Every matching request (the list's fields, no bodies), streamed",
                    "description": (
                        "Reads the store page by page (keyset), so memory stays constant at any size."
                        " CSV: one header row, properties as a JSON object, values starting with"
                        " = + - @ prefixed with ' (no spreadsheet formulas). JSONL: one list item per line."
                    ),
                    "parameters": [
                        _q("format", "csv or jsonl (default).", {"enum": ["csv", "jsonl"]}),
                        _q("order", "desc (newest first, default) or asc.", {"enum": ["desc", "asc"]}),
                        _q("sort", "As on the list.", {"enum": ["time", "cost", "latency"]}),
                        *_FILTERS,
                        _PROPERTY,
                    ],
                    "responses": {
                        "200": {
                            "description": "the rows",
                            "content": {"text/csv": {}, "application/x-ndjson": {}},
                        },
                        **_AUTH_ERRORS,
                    },
                }
            },
            "/api/v1/requests/stream": {
                "get": {
                    "summary": "Live tail: server-sent events of newly stored requests",
                    "description": (
                        "An `event: ready` first, then one `event: request` (data: a list item) per"
                        " request stored after the stream opened that matches the filters;"
                        " `event: unavailable` while the store is down. Send the key as a header"
                        " (read the stream with fetch, not EventSource)."
                    ),
                    "parameters": [*_FILTERS, _PROPERTY],
                    "responses": {
                        "200": {"description": "text/event-stream", "content": {"text/event-stream": {}}},
                        **_AUTH_ERRORS,
                    },
                }
            },
            "/api/v1/pipeline": {
                "get": {
                    "summary": "Pipeline health: queue lag per partition, dead letters, spool, newest record",
                    "description": (
                        "Dead letters hold every tenant's records: in multi-tenant mode only their"
                        " count is given (`dead_letters` is null)."
                    ),
                    "responses": {"200": _ok({"type": "object"}), **_AUTH_ERRORS},
                }
            },
            "/api/v1/pipeline/dead-letters/replay": {
                "post": {
                    "summary": "Publish dead letters again (single-tenant mode only)",
                    "requestBody": {
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "ids": {"type": "array", "items": _STR},
                                        "all": {"type": "boolean"},
                                    },
                                }
                            }
                        }
                    },
                    "responses": {
                        "200": _ok({"type": "object", "properties": {"replayed": {"type": "integer"}}}),
                        "403": {**_ERR, "description": "multi-tenant mode: use `llmtap dlq replay`"},
                        "415": {**_ERR, "description": "the body is not application/json"},
                        **_AUTH_ERRORS,
                    },
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [{}],
                    "responses": {"200": _ok({"type": "object"})},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [{}],
                    "responses": {"200": {"description": "text exposition format"}},
                }
            },
            **_webhook_paths(),
        },
    }


def _webhook_paths() -> dict[str, Any]:
    """`/api/v1/webhooks`: endpoints and the delivery log of the caller's tenant."""
    from llmtap.webhooks.outbox import EVENTS

    obj = {"type": "object"}
    items = _ok({"type": "object", "properties": {"items": {"type": "array", "items": obj}}})
    not_found = {**_AUTH_ERRORS, "404": _ERR}
    add_body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["url"],
                    "additionalProperties": False,
                    "properties": {
                        "url": {"type": "string", "description": "http(s); private addresses refused "
                                "unless LLMTAP_WEBHOOK_ALLOW_PRIVATE=true"},
                        "events": {"type": "array", "items": {"enum": list(EVENTS)}},
                        "filters": {"description": "['model=NAME', 'property.NAME=VALUE'] or an object"},
                        "sample": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                        "include_bodies": {"type": "boolean"},
                        "secret": {"type": "string", "description": "whsec_...; generated when absent"},
                    },
                }
            }
        },
    }  # fmt: skip
    return {
        "/api/v1/webhooks": {
            "get": {
                "summary": "Webhook endpoints (never their secrets)",
                "responses": {"200": items, **_AUTH_ERRORS},
            },
            "post": {
                "summary": "Add an endpoint; the answer holds its signing secret, shown this once",
                "requestBody": add_body,
                "responses": {"201": _ok(obj, "Created"), **_AUTH_ERRORS},
            },
        },
        "/api/v1/webhooks/deliveries": {
            "get": {
                "summary": "The delivery log, newest first: status, attempts, last answer",
                "parameters": [
                    _q("endpoint", "Only this endpoint's deliveries.", _STR),
                    _q("status", "Only pending or delivered ones.", {"enum": ["pending", "delivered"]}),
                    _q("limit", "How many.", {"type": "integer", "minimum": 1, "maximum": 1000}),
                ],
                "responses": {"200": items, **_AUTH_ERRORS},
            }
        },
        "/api/v1/webhooks/deliveries/{id}/redeliver": {
            "post": {
                "summary": "Send a delivery again, under its same webhook-id",
                "responses": {"202": _ok(obj, "Queued"), **not_found},
            }
        },
        "/api/v1/webhooks/{id}": {
            "delete": {
                "summary": "Remove an endpoint and its pending deliveries",
                "responses": {"204": {"description": "Removed"}, **not_found},
            }
        },
        "/api/v1/webhooks/{id}/test": {
            "post": {
                "summary": "Send a signed sample event now; the receiver's answer",
                "responses": {"200": _ok(obj), **not_found},
            }
        },
        "/api/v1/webhooks/{id}/enable": {
            "post": {
                "summary": "Enable a disabled endpoint; its pending deliveries are sent",
                "responses": {"200": _ok(obj), **not_found},
            }
        },
    }
