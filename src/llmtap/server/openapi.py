"""The OpenAPI 3.1 description of the query API, kept as data in `openapi.json` (package data).

A document is easier to read and review as the JSON clients receive than as nested Python
dicts. `tests/test_openapi.py` keeps it honest: every route the server app registers is
described and nothing else is, each endpoint documents exactly the query parameters the
vocabulary (`llmtap.store.query`) accepts, and the limits, enums and row fields it states are
the vocabulary's and the store's.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib.resources import files
from typing import Any

from llmtap import __version__


@functools.cache
def _spec() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(files("llmtap.server").joinpath("openapi.json").read_text("utf-8"))
    doc["info"]["version"] = __version__
    return doc


def document() -> dict[str, Any]:
    """The document as served at `GET /api/v1/openapi.json` (a copy: callers may change it)."""
    return copy.deepcopy(_spec())
