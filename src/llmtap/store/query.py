"""The store's query vocabulary: what a list or stats query may ask, and how it is spelled.

One home for the words the API, the dashboard, the OpenAPI document and both stores share:
the `ListQuery` and `StatsQuery` a caller builds, the group-by names and time buckets stats
know, the keyset cursor codec, the limits, and the parsing of query-string parameters into
those queries. The SQL that answers them lives in `llmtap.store.sql`; nothing here knows SQL,
so the server needs no SQL module.

Parsing is strict: an unknown or repeated parameter, a value out of range, a malformed cursor
or time raises `QueryError` naming the parameter (a typo like `?modle=x` must not return
unfiltered data). Text values are only checked to be text a database can hold (no NUL, valid
UTF-8, bounded length); the stores bind them as SQL parameters.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

import orjson

from llmtap.record import Outcome

# -- the queries ----------------------------------------------------------------------------------

Order = Literal["desc", "asc"]
Sort = Literal["time", "cost", "latency"]
Bucket = Literal["minute", "hour", "day"]

ORDERS: tuple[Order, ...] = ("desc", "asc")
#: Keyset sort keys of the list: request start, cost (unpriced rows sort below $0) or latency.
SORTS: tuple[Sort, ...] = ("time", "cost", "latency")


@dataclass(slots=True)
class ListQuery:
    """Filters of `GET /api/v1/requests`. `cursor` is opaque to clients (see `encode_cursor`)."""

    limit: int = 50
    cursor: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    model: str | None = None
    provider: str | None = None
    status: int | None = None
    #: Case-insensitive substring of the request/response text (`llmtap.store.search`).
    q: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    properties: dict[str, str] = field(default_factory=dict)
    order: Order = "desc"
    #: Keyset sort key: request start, cost (unpriced rows sort below $0) or latency.
    sort: Sort = "time"
    #: 2 → 2xx ... 5 → 5xx (the dashboard's status filter).
    status_class: int | None = None
    min_cost_usd: float | None = None
    max_cost_usd: float | None = None
    min_latency_ms: float | None = None
    max_latency_ms: float | None = None
    #: One `LogRecord.outcome` (`completed`, `upstream_cut` ...).
    outcome: str | None = None
    #: True: what stats count in `error_count` (status 400 or more, or an outcome other than
    #: `completed`: cut streams, error events, clients gone, upstreams unreachable); False: the rest.
    error: bool | None = None


GroupBy = str  # one of `STAT_GROUPS` or "property.<Name>" (see `is_group_by`)


@dataclass(slots=True)
class StatsQuery:
    since: datetime | None = None
    until: datetime | None = None
    group_by: GroupBy | None = None
    bucket: Bucket | None = None
    filters: ListQuery = field(default_factory=ListQuery)
    #: Answer from raw rows even where rollups could (exact percentiles, slower at volume).
    exact: bool = False


# -- group-by names, buckets, limits ----------------------------------------------------------------

#: Prefix of a property filter (`property.<Name>=value`) and of a property group-by.
PROPERTY = "property."
#: Columns `stats` can group by, besides `property.<Name>`.
STAT_GROUPS = ("model", "user_id", "session_id", "provider", "status")
#: Time buckets of `stats`, and their width.
BUCKETS: tuple[Bucket, ...] = ("minute", "hour", "day")
BUCKET_MICROS: dict[str, int] = {"minute": 60_000_000, "hour": 3_600_000_000, "day": 86_400_000_000}

#: At most this many groups are returned by `stats` (the largest by count).
MAX_GROUPS = 100
#: At most this many time buckets are returned by `stats` (the earliest first).
MAX_BUCKETS = 10_000
#: At most this many requests of a session are listed (totals cover all of them).
MAX_SESSION_REQUESTS = 1000
#: Largest page of a list (and of the users and webhook-delivery listings).
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
DEFAULT_USERS_LIMIT = 100
#: Longest text value of a parameter (characters).
MAX_TEXT = 4096
#: Longest `q=` search string (characters).
MAX_SEARCH = 200


def is_group_by(name: str) -> bool:
    """Whether `stats` can group by `name`: a `STAT_GROUPS` column or `property.<Name>`."""
    return name in STAT_GROUPS or (name.startswith(PROPERTY) and len(name) > len(PROPERTY))


def validate_stats(q: StatsQuery) -> None:
    """Raise `ValueError` for a group_by or bucket the stores do not know."""
    if q.group_by is not None and not is_group_by(q.group_by):
        raise ValueError(f"cannot group by {q.group_by!r}")
    if q.bucket is not None and q.bucket not in BUCKETS:
        raise ValueError(f"unknown bucket {q.bucket!r}")


# -- time -------------------------------------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def to_micros(dt: datetime) -> int:
    """Microseconds since the epoch; naive datetimes are taken as UTC."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - EPOCH) // _US


def from_micros(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


#: The microseconds a `datetime` (and so every store) can hold: years 1 to 9999.
MICROS_RANGE = (to_micros(datetime.min), to_micros(datetime.max))


def iso(us: int | None) -> str | None:
    """ISO 8601 UTC with microseconds and a `Z`, e.g. `2025-01-31T12:00:00.123456Z` (the year
    in four digits even before 1000, which `strftime("%Y")` does not pad)."""
    if us is None:
        return None
    return from_micros(us).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


# -- cursors ----------------------------------------------------------------------------------------


def encode_cursor(created_us: int, request_id: str) -> str:
    """Opaque keyset cursor: urlsafe base64 of `[created_at_us, id]`."""
    return base64.urlsafe_b64encode(orjson.dumps([created_us, request_id])).decode().rstrip("=")


def encode_sort_cursor(created_us: int, request_id: str, sort: str, value: float | int) -> str:
    """Keyset cursor of a cost or latency sort: `[created_at_us, id, sort, sort value]`."""
    raw = orjson.dumps([created_us, request_id, sort, value])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor_value(cursor: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError, UnicodeEncodeError):
        raise ValueError("malformed cursor") from None


def decode_sort_cursor(
    cursor: str, sort: str, cost_bound: int = 2**62
) -> tuple[int, str, float | int | None]:
    """(created_us, id, sort value); `ValueError` unless the cursor was made for this `sort`.
    A request's cost in nanodollars stays below `cost_bound`; a user's total may reach int64's."""
    value = _cursor_value(cursor)
    if sort == "time":
        us, rid = decode_cursor(cursor)
        return us, rid, None
    if (
        not isinstance(value, list)
        or len(value) != 4
        or value[2] != sort
        or type(value[0]) is not int
        or not MICROS_RANGE[0] <= value[0] <= MICROS_RANGE[1]
        or not isinstance(value[1], str)
        or "\x00" in value[1]
        or type(value[3]) is not (int if sort == "cost" else float)
        or not math.isfinite(value[3])
        or (sort == "cost" and not -cost_bound <= value[3] < cost_bound)
    ):
        raise ValueError("malformed cursor")
    return value[0], value[1], value[3]


def encode_walk_cursor(created_us: int, request_id: str, held_us: int) -> str:
    """A cursor of a list whose rows move while it is walked (sessions: a session's place is its
    newest request): `encode_cursor`'s, plus the walk's bound, the newest time its first page
    saw, which holds every later page to the list as it was then."""
    raw = orjson.dumps([created_us, request_id, held_us])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_walk_cursor(cursor: str) -> tuple[int, str, int | None]:
    """(created_us, id, the walk's bound); a cursor of `encode_cursor` has no bound."""
    value = _cursor_value(cursor)
    if isinstance(value, list) and len(value) == 3:
        held = value.pop()
        if type(held) is not int or not MICROS_RANGE[0] <= held <= MICROS_RANGE[1]:
            raise ValueError("malformed cursor")
        return (*_plain_cursor(value), held)
    return (*_plain_cursor(value), None)


def decode_cursor(cursor: str) -> tuple[int, str]:
    """Raises `ValueError` for anything `encode_cursor` did not produce."""
    return _plain_cursor(_cursor_value(cursor))


def _plain_cursor(value: Any) -> tuple[int, str]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or type(value[0]) is not int
        or not isinstance(value[1], str)
        or not MICROS_RANGE[0] <= value[0] <= MICROS_RANGE[1]
        or "\x00" in value[1]
    ):
        raise ValueError("malformed cursor")
    return value[0], value[1]


def item_cursor(item: Mapping[str, Any], sort: str) -> str:
    """The cursor after an API item (a row as the store returned it) in this sort's keyset."""
    us = to_micros(datetime.fromisoformat(str(item["created_at"]).replace("Z", "+00:00")))
    if sort == "cost":
        cost = item["cost_usd"]
        return encode_sort_cursor(us, item["id"], sort, -1 if cost is None else round(cost * 1e9))
    if sort == "latency":
        return encode_sort_cursor(us, item["id"], sort, float(item["latency_ms"]))
    return encode_cursor(us, item["id"])


# -- query-string parameters ------------------------------------------------------------------------

#: Filters every list-like endpoint and `stats` take (besides `property.<Name>`).
FILTERS = ("user_id", "session_id", "model", "provider", "status", "status_class", "outcome", "error",
           "min_cost_usd", "max_cost_usd", "min_latency_ms", "max_latency_ms", "since", "until")  # fmt: skip
#: Parameters of each query endpoint (list-like ones take `property.<Name>` too).
LIST_PARAMS = frozenset({"limit", "cursor", "order", "sort", "q", *FILTERS})
STATS_PARAMS = frozenset({"group_by", "bucket", "exact", *FILTERS})
USERS_PARAMS = frozenset({"limit", "cursor", "sort"})
#: `GET /api/v1/users` orders: most recently active first, or highest cost first.
USERS_SORTS = ("time", "cost")
#: `GET /api/v1/sessions`: the list's parameters but sort and order (most recently active first).
SESSIONS_PARAMS = LIST_PARAMS - {"sort", "order"}
#: The export pages through everything itself: no limit or cursor; `format` picks csv or jsonl.
EXPORT_FORMATS = ("csv", "jsonl")
EXPORT_PARAMS = (LIST_PARAMS - {"limit", "cursor"}) | {"format"}
#: The live tail: the list's parameters but cursor and sort (limit and order are accepted and
#: have no effect: the tail sends every new matching record, newest first).
TAIL_PARAMS = LIST_PARAMS - {"cursor", "sort"}
#: `GET /api/v1/webhooks/deliveries` (checked by `llmtap.server.webhooks_api`).
DELIVERY_PARAMS = frozenset({"endpoint", "status", "limit"})

_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
OUTCOMES: tuple[str, ...] = get_args(Outcome)
_BOOLS = {"true": True, "false": False}
_EPOCH_RE = re.compile(r"^-?\d{1,12}(\.\d{1,9})?$")
#: A time zone offset whose `+` a query string turned into a space.
_SPACED_OFFSET = re.compile(r"\d \d\d(:?\d\d)?$")


class QueryError(Exception):
    """A query parameter the API must refuse (400), with the parameter's name."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter[:100]
        self.message = message


def text(name: str, value: str, max_len: int = MAX_TEXT) -> str:
    """`value` if a database can hold it and it is at most `max_len` characters."""
    if len(value) > max_len:
        raise QueryError(name, f"invalid parameter {name!r}: longer than {max_len} characters")
    if "\x00" in value:
        raise QueryError(name, f"invalid parameter {name!r}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise QueryError(name, f"invalid parameter {name!r}: not valid UTF-8") from None
    return value


def split_params(
    items: Iterable[tuple[str, str]], allowed: Iterable[str], properties: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """(plain parameters, `property.<Name>` filters); `QueryError` for unknown or repeated ones."""
    allowed = frozenset(allowed)
    plain: dict[str, str] = {}
    props: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in items:
        shown = key[:100]
        try:
            text(shown, key, 300)
        except QueryError as e:
            raise QueryError(
                shown, e.message.replace("invalid parameter", "invalid parameter name", 1)
            ) from None
        if key in seen:
            raise QueryError(shown, f"invalid parameter {shown!r}: given more than once")
        seen.add(key)
        if properties and key.startswith(PROPERTY):
            name = key[len(PROPERTY) :]
            if not name:
                raise QueryError(shown, "invalid parameter 'property.': a property name is required")
            props[name] = text(key, value)
        elif key in allowed:
            plain[key] = text(key, value)
        else:
            known = sorted(allowed) + ([f"{PROPERTY}<Name>"] if properties else [])
            raise QueryError(shown, f"unknown parameter {shown!r} (known: {', '.join(known)})")
    return plain, props


def integer(params: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise QueryError(name, f"invalid parameter {name!r}: must be an integer, got {raw[:50]!r}") from None
    if not lo <= value <= hi:
        raise QueryError(name, f"invalid parameter {name!r}: must be between {lo} and {hi}, got {value}")
    return value


def _number(params: Mapping[str, str], name: str) -> float:
    raw = params[name]
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= 1e12:
        why = f"invalid parameter {name!r}: must be a number from 0 to 1e12, got {raw[:50]!r}"
        raise QueryError(name, why)
    return value


#: The times a query may name: a month short of `datetime`'s own end, which the answer's month
#: and day steps go past.
TIME_RANGE = (datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))


def parse_time(name: str, raw: str) -> datetime:
    """ISO 8601 (naive means UTC) or epoch seconds. Four digits are a year and eight a date
    (`2026`, `20261120`: ISO's own forms), never seconds after 1970."""
    try:
        if len(raw) == 4 and raw.isdigit():
            dt = datetime(int(raw), 1, 1, tzinfo=UTC)
        elif _EPOCH_RE.match(raw) and not (len(raw) == 8 and raw.isdigit()):
            dt = datetime.fromtimestamp(float(raw), UTC)
        else:
            dt = datetime.fromisoformat(raw)
    except (ValueError, OverflowError, OSError):
        hint = " (send a '+' in a URL as %2B)" if _SPACED_OFFSET.search(raw) else ""
        raise QueryError(
            name,
            f"invalid parameter {name!r}: expected ISO 8601 (2025-01-31T12:00:00Z) or epoch seconds{hint}",
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        dt = dt.astimezone(UTC)
    except (ValueError, OverflowError):
        raise QueryError(name, f"invalid parameter {name!r}: out of range") from None
    if not TIME_RANGE[0] <= dt <= TIME_RANGE[1]:  # rollups reach a month past their range's end
        raise QueryError(name, f"invalid parameter {name!r}: out of range (years 1 to 9998)")
    return dt


def _filters(params: Mapping[str, str], props: dict[str, str]) -> ListQuery:
    q = ListQuery(properties=props)
    for name in ("user_id", "session_id", "model", "provider"):
        if name in params:
            setattr(q, name, params[name])
    if "status" in params:
        q.status = integer(params, "status", 0, 100, 599)
    if "status_class" in params:
        raw = params["status_class"]
        if raw not in _STATUS_CLASSES:
            raise QueryError("status_class", "invalid parameter 'status_class': must be 1xx ... 5xx")
        q.status_class = int(raw[0])
    if "outcome" in params:
        if params["outcome"] not in OUTCOMES:
            raise QueryError("outcome", f"invalid parameter 'outcome': must be one of {', '.join(OUTCOMES)}")
        q.outcome = params["outcome"]
    if "error" in params:
        if params["error"] not in _BOOLS:
            raise QueryError("error", "invalid parameter 'error': must be true or false")
        q.error = _BOOLS[params["error"]]
    for name in ("min_cost_usd", "max_cost_usd", "min_latency_ms", "max_latency_ms"):
        if name in params:
            setattr(q, name, _number(params, name))
    for name in ("since", "until"):
        if name in params:
            setattr(q, name, parse_time(name, params[name]))
    if q.since is not None and q.until is not None and q.until < q.since:
        raise QueryError("until", "invalid parameter 'until': earlier than 'since'")
    return q


def parse_list(
    items: Iterable[tuple[str, str]], allowed: Iterable[str] = LIST_PARAMS, *, walk: bool = False
) -> ListQuery:
    """A `ListQuery` from query-string pairs (`allowed`: the endpoint's parameters; `walk`:
    its cursors are `encode_walk_cursor`'s, the sessions list's)."""
    params, props = split_params(items, allowed, properties=True)
    q = _filters(params, props)
    q.limit = integer(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    order = params.get("order", "desc")
    if order not in ORDERS:
        raise QueryError("order", "invalid parameter 'order': must be 'asc' or 'desc'")
    q.order = "asc" if order == "asc" else "desc"
    sort = params.get("sort", "time")
    if sort not in SORTS:
        raise QueryError("sort", "invalid parameter 'sort': must be time, cost or latency")
    q.sort = sort
    if "q" in params:
        if not 0 < len(params["q"]) <= MAX_SEARCH:
            raise QueryError("q", f"invalid parameter 'q': 1 to {MAX_SEARCH} characters")
        q.q = params["q"]
    if "cursor" in params:
        try:
            if walk:
                decode_walk_cursor(params["cursor"])
            else:
                decode_sort_cursor(params["cursor"], sort)
        except ValueError:
            raise QueryError("cursor", "invalid parameter 'cursor': not a cursor this API returned") from None
        q.cursor = params["cursor"]
    return q


def parse_stats(items: Iterable[tuple[str, str]]) -> StatsQuery:
    """A `StatsQuery` from query-string pairs."""
    params, props = split_params(items, STATS_PARAMS, properties=True)
    filters = _filters(params, props)
    q = StatsQuery(since=filters.since, until=filters.until, filters=filters)
    filters.since = filters.until = None
    exact = params.get("exact")
    if exact is not None:
        if exact not in ("true", "false"):
            raise QueryError("exact", "invalid parameter 'exact': must be true or false")
        q.exact = exact == "true"
    group_by = params.get("group_by")
    if group_by is not None:
        if not is_group_by(group_by):
            choices = ", ".join(STAT_GROUPS)
            raise QueryError(
                "group_by", f"invalid parameter 'group_by': must be one of {choices} or {PROPERTY}<Name>"
            )
        q.group_by = group_by
    bucket = params.get("bucket")
    if bucket is not None:
        if bucket not in BUCKETS:
            raise QueryError("bucket", "invalid parameter 'bucket': must be minute, hour or day")
        q.bucket = bucket
        if q.since:  # open-ended: up to now (the buckets kept would be the oldest)
            until = q.until or datetime.now(UTC)
            n = (to_micros(until) - to_micros(q.since)) // BUCKET_MICROS[bucket]
            if n > MAX_BUCKETS:
                raise QueryError(
                    "bucket", f"invalid parameter 'bucket': {n} {bucket}s is more than {MAX_BUCKETS} buckets"
                )
    return q


def parse_users(items: Iterable[tuple[str, str]]) -> tuple[int, tuple[int, str] | None, str]:
    """The `limit` of `GET /api/v1/users`, what its `cursor` continues after (the sort's value:
    last_at in microseconds or cost in nanodollars, and the user id), and its `sort`."""
    params, _ = split_params(items, USERS_PARAMS, properties=False)
    sort = params.get("sort", "time")
    if sort not in USERS_SORTS:
        raise QueryError("sort", "invalid parameter 'sort': must be time or cost")
    after = None
    if "cursor" in params:
        try:
            if sort == "time":
                after = decode_cursor(params["cursor"])
            else:
                # A user's total is a sum: past 2**62 (~$4.6B) its cursor was refused (review).
                _, user, nanos = decode_sort_cursor(params["cursor"], sort, cost_bound=2**63)
                assert isinstance(nanos, int)
                after = nanos, user
        except ValueError:
            raise QueryError("cursor", "invalid parameter 'cursor': not a cursor this API returned") from None
    return integer(params, "limit", DEFAULT_USERS_LIMIT, 1, MAX_LIMIT), after, sort


class UserTotals(dict[str, Any]):
    """One item of `Store.users`: the API's dict, carrying the exact cost in nanodollars
    beside it for the cost sort's cursor (a float `cost_usd` is exact only to about $2M)."""

    __slots__ = ("cost_nanos",)

    def __init__(self, items: dict[str, Any], cost_nanos: int) -> None:
        super().__init__(items)
        self.cost_nanos = cost_nanos


def users_cursor(item: UserTotals, sort: str = "time") -> str:
    """The cursor of the page after a users item (`parse_users`)."""
    if sort == "cost":
        return encode_sort_cursor(0, item["user_id"], "cost", item.cost_nanos)
    return encode_cursor(to_micros(datetime.fromisoformat(item["last_at"])), item["user_id"])
