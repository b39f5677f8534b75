"""SQL shared by the SQLite and PostgreSQL stores, so their answers cannot drift.

Everything a query means — which rows a filter selects, the keyset order, what an error is,
how tokens and cost add up, which groups come first, how a row becomes the API's dict — is
written once here. The stores differ only through a small `Dialect`: placeholders, how a
timestamp is bound and read back, the time-bucket expression, and how percentiles are computed.

Percentiles are defined as PostgreSQL's `percentile_cont` (linear interpolation between the two
nearest ranks, `pos = p * (n - 1)`); PostgreSQL computes them natively, SQLite (which has no
percentile aggregate) streams the filtered latencies to Python, where `percentiles_of` sorts them
and does the same float arithmetic PostgreSQL does, so both return identical numbers. (Window
functions in SQLite were measured ~15x slower than Python's sort for this.)

Timestamps are handled as integer microseconds since the epoch (UTC) in Python; SQLite stores
exactly that, PostgreSQL a `timestamptz` (microsecond precision), so ordering is exact on both.

What a query may ask (group-by names, buckets, cursors, limits) is `llmtap.store.query`'s.
"""

from __future__ import annotations

import hmac
import math
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import orjson

from llmtap.limits import MAX_NARROW_COUNT
from llmtap.store.query import (
    MAX_SESSION_REQUESTS,
    MICROS_RANGE,
    PROPERTY,
    ListQuery,
    StatsQuery,
    UserTotals,
    decode_sort_cursor,
    decode_walk_cursor,
    encode_cursor,
    encode_sort_cursor,
    encode_walk_cursor,
    from_micros,
    is_group_by,
    iso,
    to_micros,
)

if TYPE_CHECKING:
    from llmtap.record import Body, LogRecord

#: Columns of `requests`, in the order rows are written and read.
COLUMNS: tuple[str, ...] = (
    "tenant", "id", "created_at", "provider", "model", "method", "path", "target_url", "status",
    "outcome", "error", "streamed", "latency_ms", "ttft_ms", "prompt_tokens", "completion_tokens",
    "total_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens", "usage_source",
    "cost_nanos", "price_version", "user_id", "session_id", "properties", "request_headers",
    "response_headers", "request_body", "response_body", "response_events", "route",
    "first_byte_at", "ended_at", "gateway", "cache_write_1h_tokens", "input_audio_tokens",
    "output_audio_tokens", "service_tier", "web_search_requests", "audio_seconds", "input_characters",
)  # fmt: skip


def written_columns(present: set[str]) -> tuple[str, ...] | None:
    """The `COLUMNS` a schema stopped at an older migration has, or None when it has them all
    (only tests stop migrations early: a store migrates itself at start)."""
    cols = tuple(c for c in COLUMNS if c in present)
    return None if len(cols) == len(COLUMNS) else cols


#: Positions of the timestamp columns (bound as datetimes on PostgreSQL).
TS_POSITIONS = tuple(COLUMNS.index(c) for c in ("created_at", "first_byte_at", "ended_at"))
_IX = {c: i for i, c in enumerate(COLUMNS)}
SELECT_COLUMNS = ", ".join(f"r.{c}" for c in COLUMNS)
BODY_COLUMNS = ("request_body", "response_body", "response_events")

#: Stats percentiles (fractions), the same on both stores.
PERCENTILES = (0.5, 0.9, 0.95, 0.99)
ERROR = "(r.status >= 400 OR r.outcome <> 'completed')"
#: The largest integer a store column holds (both stores: 64-bit signed).
_INT64_MAX = 2**63 - 1


# -- writing -------------------------------------------------------------------------------------


def clean(s: str) -> str:
    """Text both stores can hold: NUL becomes U+FFFD, and so do lone surrogates.

    PostgreSQL text and jsonb cannot hold NUL; neither store (nor JSON) can hold a surrogate
    code point (aiohttp decodes a header's non-UTF-8 bytes to them). A surrogate *pair* split
    into two code points is joined into its character. Replaced alike on both stores.
    """
    if "\x00" in s:
        s = s.replace("\x00", "\ufffd")
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            s = s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return s


def _clean_opt(s: str | None) -> str | None:
    return None if s is None else clean(s)


def _clean_map(m: dict[str, str]) -> dict[str, str]:
    return {clean(k): clean(v) for k, v in m.items()}


_body_json = msgspec.json.Encoder()


def _body(body: Body | None) -> str | None:
    """The body as a reference (inline data dropped when a body-store ref exists).

    A body that still holds inline data and no reference keeps its data (base64) rather than
    silently losing it; the body handler normally moved it to the body store already.
    """
    if body is None:
        return None
    if body.ref is not None and body.data is not None:
        body = msgspec.structs.replace(body, data=None)
    try:
        out = _body_json.encode(body).decode()
    except UnicodeEncodeError:  # a content type or ref carrying a surrogate
        body = msgspec.structs.replace(
            body, content_type=_clean_opt(body.content_type), ref=_clean_opt(body.ref)
        )
        out = _body_json.encode(body).decode()
    if "\\u0000" in out:
        body = msgspec.structs.replace(
            body, content_type=_clean_opt(body.content_type), ref=_clean_opt(body.ref)
        )
        out = _body_json.encode(body).decode()
    return out


def _json(m: dict[str, str]) -> str:
    try:
        out = orjson.dumps(m)
    except orjson.JSONEncodeError:  # a lone surrogate (orjson refuses them)
        return orjson.dumps(_clean_map(m)).decode()
    if b"\\u0000" in out:  # rare: NUL is not storable in PostgreSQL text/jsonb
        out = orjson.dumps(_clean_map(m))
    return out.decode()


def property_name(name: str) -> str:
    """The stored form of a property name: names are case-insensitive (the gateway lowercases
    them at capture; filters, group_by and records ingested with another case go through here).
    """
    return clean(name).lower()


def _properties(m: dict[str, str]) -> str:
    """Properties as JSON with lowercase names; of two names differing only in case, the first."""
    if not m:
        return "{}"
    if all(k == k.lower() for k in m):
        return _json(m)
    lowered: dict[str, str] = {}
    for k, v in m.items():
        lowered.setdefault(property_name(k), v)
    return _json(lowered)


def cost_nanos(record: LogRecord) -> int | None:
    if record.cost_nanos is not None:
        return record.cost_nanos
    if record.cost_usd is not None:
        return round(record.cost_usd * 1e9)
    return None


def _narrow(count: int | None) -> int | None:
    return count if count is None or count <= MAX_NARROW_COUNT else None  # `limits.NARROW_USAGE`


def record_values(r: LogRecord) -> tuple[Any, ...]:
    """A record as the `COLUMNS` tuple: timestamps in microseconds, JSON columns as text."""
    u = r.usage
    return (
        clean(r.tenant),
        clean(r.id),
        to_micros(r.started_at),
        clean(r.provider),
        _clean_opt(r.model),
        clean(r.method),
        clean(r.path),
        clean(r.target_url),
        r.status,
        r.outcome,
        _clean_opt(r.error),
        r.streamed,
        float(r.latency_ms),
        None if r.time_to_first_token_ms is None else float(r.time_to_first_token_ms),
        u.prompt_tokens,
        u.completion_tokens,
        u.total_tokens,
        u.cached_tokens,
        u.cache_write_tokens,
        u.reasoning_tokens,
        u.source,
        cost_nanos(r),
        _clean_opt(r.price_version),
        _clean_opt(r.user_id),
        _clean_opt(r.session_id),
        _properties(r.properties),
        _json(
            {**r.request_headers, TRUNCATED_KEY: ",".join(r.truncated)} if r.truncated else r.request_headers
        ),
        _json(r.response_headers),
        _body(r.request_body),
        _body(r.response_body),
        _body(r.response_events),
        r.route,
        None if r.first_byte_at is None else to_micros(r.first_byte_at),
        to_micros(r.ended_at),
        _clean_opt(r.gateway),
        _narrow(u.cache_write_1h_tokens),
        _narrow(u.input_audio_tokens),
        _narrow(u.output_audio_tokens),
        _clean_opt(u.service_tier),
        _narrow(u.web_search_requests),
        _narrow(u.audio_seconds),
        _narrow(u.input_characters),
    )


def dedupe(records: Sequence[LogRecord]) -> list[LogRecord]:
    """First record per (tenant, id): a batch may carry the same message twice."""
    seen: set[tuple[str, str]] = set()
    out = []
    for r in records:
        key = (clean(r.tenant), clean(r.id))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def property_rows(
    values: Sequence[Any], positions: tuple[int, int, int, int] = (0, 1, 2, _IX["properties"])
) -> list[tuple[str, str, int, str, str]]:
    """`(tenant, request_id, created_us, name, value)` rows for the properties side table.

    `positions` are those of tenant, id, created_at and properties (JSON) in `values`.
    """
    t, i, c, p = positions
    props: dict[str, str] = orjson.loads(values[p])
    return [(values[t], values[i], values[c], k, v) for k, v in props.items()]


#: What `Store.erase` deletes a tenant's rows by (columns: never from input unchecked).
ERASE_BY = ("user_id", "session_id", "id")


def body_refs(values: Sequence[Any]) -> list[str]:
    """Body-store keys referenced by the body columns (JSON text) of a row."""
    refs = []
    for raw in values:
        if raw:
            ref = orjson.loads(raw).get("ref")
            if ref:
                refs.append(ref)
    return refs


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the SQL of the two stores."""

    name: Literal["sqlite", "postgresql"]
    placeholder: Callable[[int], str]  # 1-based parameter number -> its placeholder
    ts_param: Callable[[int], Any]  # microseconds -> a value to bind against created_at
    ts_value: Callable[[Any], int]  # a timestamp read back -> microseconds
    bucket: Callable[[str], str]  # minute|hour|day -> expression of the bucket start
    json_value: Callable[[Any], Any]  # a JSON column read back -> Python value
    prop_value: Callable[[str], str]  # placeholder of a property name -> its value in r.properties
    #: An expression's indexed hash (PostgreSQL: values of any length are indexed by hash), or
    #: None when the store indexes the values themselves (SQLite).
    hashed: Callable[[str], str] | None = None
    #: The condition selecting rows whose searchable text contains `q` (`ListQuery.q`).
    search: Callable[[Params, str], str] | None = None
    #: The same condition checked on each row, without the text index (`search_scan_sql`).
    search_row: Callable[[Params, str], str] | None = None
    #: A query counting the text index's matches for `q`, up to a bound (`search_scan_sql`).
    search_count: Callable[[Params, str, int], str] | None = None
    #: A column as an expression the planner will not answer from an index (see `list_sql`).
    unindexed: Callable[[str], str] = str
    #: The sum of a column, 0 when no row: SQLite's `sum` of integers fails past 2^63 (a 503 for
    #: good), its `total` is a float (exact to 2^53: $9M in nanodollars; the API's `cost_usd`
    #: is a float anyway); PostgreSQL's sum of bigints is a numeric.
    add_up: Callable[[str], str] = lambda column: f"coalesce(sum({column}), 0)"


#: Columns of `requests` with an index on (tenant, column, created_at), by hash on PostgreSQL.
HASH_INDEXED = frozenset(("user_id", "session_id", "model"))


def equals(d: Dialect, column: str, placeholder: str) -> str:
    """`column = value`, through the hash index where the store has one (then the value)."""
    if d.hashed is None:
        return f"{column} = {placeholder}"
    return f"{d.hashed(column)} = {d.hashed(placeholder)} AND {column} = {placeholder}"


class Params:
    """Collects bind values; calling it with a value returns the value's placeholder."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return self.dialect.placeholder(len(self.values))


def where_sql(p: Params, tenant: str, f: ListQuery, since: datetime | None = None,
              until: datetime | None = None, *, time_indexed: bool = True) -> str:  # fmt: skip
    """The WHERE clause of a filter; every query is tenant-scoped here, in SQL.

    `time_indexed=False` writes the time bounds so that the planner does not pick the
    (tenant, created_at) index for them (see `list_sql`).
    """
    d = p.dialect
    created = "r.created_at" if time_indexed else d.unindexed("r.created_at")
    conds = [f"r.tenant = {p(tenant)}"]
    for col, val in (
        ("user_id", f.user_id),
        ("session_id", f.session_id),
        ("model", f.model),
        ("provider", f.provider),
    ):
        if val is not None:
            conds.append(equals(d, f"r.{col}", p(val)))
    if f.status is not None:
        conds.append(f"r.status = {p(int(f.status))}")
    if f.status_class is not None:
        lo = int(f.status_class) * 100
        conds.append(f"r.status >= {p(lo)} AND r.status < {p(lo + 100)}")
    if f.outcome is not None:
        conds.append(f"r.outcome = {p(f.outcome)}")
    if f.error is not None:  # what stats count in error_count
        conds.append(ERROR if f.error else "(coalesce(r.status, 0) < 400 AND r.outcome = 'completed')")
    # Nanodollars past 64 bits (a bound above $9.2B, which the API takes: fuzz2's 500) are
    # the largest a column holds: no cost is above it.
    if f.min_cost_usd is not None:
        conds.append(f"r.cost_nanos >= {p(min(round(f.min_cost_usd * 1e9), _INT64_MAX))}")
    if f.max_cost_usd is not None:
        conds.append(f"r.cost_nanos <= {p(min(round(f.max_cost_usd * 1e9), _INT64_MAX))}")
    if f.min_latency_ms is not None:
        conds.append(f"r.latency_ms >= {p(float(f.min_latency_ms))}")
    if f.max_latency_ms is not None:
        conds.append(f"r.latency_ms <= {p(float(f.max_latency_ms))}")
    if f.q:
        if d.search is None:
            raise ValueError("this store cannot search")
        conds.append(d.search(p, f.q))
    for s in (f.since, since):
        if s is not None:
            conds.append(f"{created} >= {p(d.ts_param(to_micros(s)))}")
    for u in (f.until, until):
        if u is not None:
            conds.append(f"{created} < {p(d.ts_param(to_micros(u)))}")
    for name, value in sorted(f.properties.items()):
        conds.append(
            "EXISTS (SELECT 1 FROM request_properties rp"
            f" WHERE rp.tenant = {p(tenant)} AND {equals(d, 'rp.name', p(property_name(name)))}"
            f" AND {equals(d, 'rp.value', p(value))}"
            " AND rp.created_at = r.created_at AND rp.request_id = r.id)"
        )
    return " AND ".join(conds)


#: Sort key expressions of `ListQuery.sort` other than time (unpriced sorts below any cost).
SORT_KEYS = {"cost": "coalesce(r.cost_nanos, -1)", "latency": "r.latency_ms"}


def list_sql(
    d: Dialect,
    tenant: str,
    q: ListQuery,
    *,
    sort_index: bool = False,
    hit: str | None = None,
    through: str | None = None,
) -> tuple[str, list[Any]]:
    """Newest (or oldest) first, keyset-paginated on (created_at, id); fetches limit + 1.

    With `sort` cost or latency the keyset is (sort key, created_at, id), same direction.
    `sort_index` keeps the time bounds away from the planner's index choice, so that a page
    walks the sort key's index until it has `limit` rows of the range. (SQLite's planner, which
    has no statistics, takes the time range from its index and sorts the range: 1.4 s for one
    day, 8.7 s for 30 at 1M rows, against ms. That is right only for a range of few rows: see
    `range_rows_sql`. PostgreSQL weighs both plans with its statistics.)

    `through` (a time-sorted page's filter property) walks that property value's rows of
    `request_properties` in page order and looks each request up: a value few requests have is
    found without walking the range (see `property_walk`).
    """
    p = Params(d)
    key = SORT_KEYS.get(q.sort)
    assert through is None or key is None
    source = from_sql(p, tenant, q, time_indexed=not (sort_index and key is not None), through=through)
    # The keyset and order are on the walked table's own columns, so that its index serves both.
    created, rid_col = ("r.created_at", "r.id") if through is None else ("rp.created_at", "rp.request_id")
    where = ""
    desc = q.order != "asc"
    if q.cursor:
        us, rid, value = decode_sort_cursor(q.cursor, q.sort)
        op = "<" if desc else ">"
        if key is None:
            ts = p(d.ts_param(us))
            # The bare created_at bound lets an index on (tenant, created_at) start at the cursor.
            where += f" AND {created} {op}= {ts} AND ({created}, {rid_col}) {op} ({ts}, {p(rid)})"
        else:
            v, ts = p(value), p(d.ts_param(us))  # a bare bound on the key, likewise for its index
            where += f" AND {key} {op}= {v} AND ({key}, r.created_at, r.id) {op} ({v}, {ts}, {p(rid)})"
    columns = SELECT_COLUMNS
    if hit is not None:  # see search_scan_sql
        assert d.search_row is not None
        columns += f", ({d.search_row(p, hit)})"
    order = "DESC" if desc else "ASC"
    by = (
        f"{created} {order}, {rid_col} {order}"
        if key is None
        else f"{key} {order}, r.created_at {order}, r.id {order}"
    )
    sql = f"SELECT {columns} {source}{where} ORDER BY {by} LIMIT {p(q.limit + 1)}"
    return sql, p.values


def from_sql(
    p: Params,
    tenant: str,
    f: ListQuery,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    time_indexed: bool = True,
    through: str | None = None,
) -> str:
    """`FROM ... WHERE ...` of the requests a filter selects (see `where_sql`), from `requests`
    alone or, `through` one of its properties, from that value's `request_properties` rows in
    their (created_at, request_id) order, each request looked up by its key (`property_walk`).
    """
    if through is None:
        return f"FROM requests r WHERE {where_sql(p, tenant, f, since, until, time_indexed=time_indexed)}"
    rest = replace(f, properties={k: v for k, v in f.properties.items() if k != through})
    walked = _property_rows(p, tenant, f, through, since, until)
    return (
        f"FROM request_properties rp CROSS JOIN requests r WHERE {walked}"
        " AND r.tenant = rp.tenant AND r.id = rp.request_id AND r.created_at = rp.created_at"
        f" AND {where_sql(p, tenant, rest, since, until, time_indexed=time_indexed)}"
    )


def _property_rows(p: Params, tenant: str, f: ListQuery, name: str, *bounds: datetime | None) -> str:
    """The `request_properties` rows of `f`'s filter property `name` in `f`'s time range, within
    `bounds` (pairs of since and until, None for open) too."""
    d = p.dialect
    conds = [
        f"rp.tenant = {p(tenant)}",
        equals(d, "rp.name", p(property_name(name))),
        equals(d, "rp.value", p(f.properties[name])),
    ]
    # One bound each way: SQLite ranges its index on one and checks each row against the others.
    times = (f.since, f.until, *bounds)
    lo = max((t for t in times[0::2] if t is not None), default=None)
    hi = min((t for t in times[1::2] if t is not None), default=None)
    if lo is not None:
        conds.append(f"rp.created_at >= {p(d.ts_param(to_micros(lo)))}")
    if hi is not None:
        conds.append(f"rp.created_at < {p(d.ts_param(to_micros(hi)))}")
    return " AND ".join(conds)


def _count_sql(p: Params, inner: str, cap: int) -> tuple[str, list[Any]]:
    return f"SELECT count(*) FROM (SELECT 1 {inner} LIMIT {p(cap)}) AS c", p.values


#: Rows a page's candidate walks are counted up to when choosing one (`property_walk`).
WALK_COUNT_CAP = 1000
#: Filters on a request's own columns: the time walk checks them before any property.
_NARROWING = (
    "provider", "status", "status_class", "outcome", "error",
    "min_cost_usd", "max_cost_usd", "min_latency_ms", "max_latency_ms",
)  # fmt: skip


def property_walk(
    d: Dialect,
    tenant: str,
    f: ListQuery,
    fetch: Callable[[str, list[Any]], Sequence[Sequence[Any]]],
    since: datetime | None = None,
    until: datetime | None = None,
) -> str | None:
    """The filter property whose `request_properties` rows a list page or a raw stats read walks
    (see `from_sql`), or None for the requests' own indexes; `fetch` runs a query.

    A value few requests have is found without walking the range: one no request has took
    0.8 s at 1M rows, seconds with another filter that needs each row, and stats over a 6%
    value's rows 4.8 s instead of 0.65 s. But a step of the property walk costs about twice a
    step of the time walk, which checks a request's own columns (`_NARROWING`) before any
    property: with such a filter, a value on a third of the requests or more is left to the
    time walk. The shares are those of the `WALK_COUNT_CAP` requests the page would walk
    first (the newest, or the oldest), so two common values are told apart. An equality on an
    indexed column (a user's or a session's requests) keeps its index unless the property has
    fewer rows in the range, both counted up to the cap. SQLite's choice: PostgreSQL plans the
    EXISTS of `where_sql` as a join by its statistics (the same figures either way).
    """
    if f.sort != "time" or not f.properties or f.q:
        return None
    indexed = [c for c in sorted(HASH_INDEXED) if getattr(f, c) is not None]
    narrowed = any(getattr(f, c) is not None for c in _NARROWING)
    if len(f.properties) == 1 and not indexed and not narrowed:
        return next(iter(f.properties))  # nothing else to weigh it against

    def rows(name: str, a: datetime | None = None, b: datetime | None = None) -> int:
        p = Params(d)
        walked = _property_rows(p, tenant, f, name, since, until, a, b)
        found = fetch(*_count_sql(p, f"FROM request_properties rp WHERE {walked}", WALK_COUNT_CAP))
        return int(found[0][0])

    # The first WALK_COUNT_CAP requests of the range in page order end at `edge`.
    p = Params(d)
    bounds = ListQuery(since=f.since, until=f.until)
    order = "ASC" if f.order == "asc" else "DESC"
    edge_rows = fetch(
        f"SELECT r.created_at {from_sql(p, tenant, bounds, since, until)}"
        f" ORDER BY r.created_at {order} LIMIT 1 OFFSET {p(WALK_COUNT_CAP - 1)}",
        p.values,
    )
    if edge_rows:
        edge = from_micros(d.ts_value(edge_rows[0][0]))
        window = (edge, None) if order == "DESC" else (None, edge + timedelta(microseconds=1))
        shares = {name: rows(name, *window) for name in sorted(f.properties)}
    else:  # a range of fewer requests than that: any walk is short
        shares = {name: rows(name) for name in sorted(f.properties)}
    name = min(shares, key=shares.__getitem__)
    if edge_rows and narrowed and 3 * shares[name] >= WALK_COUNT_CAP:
        return None
    if indexed:
        fewest = rows(name)
        for column in indexed:
            p = Params(d)
            only = ListQuery(since=f.since, until=f.until, **{column: getattr(f, column)})
            if (
                int(fetch(*_count_sql(p, from_sql(p, tenant, only, since, until), WALK_COUNT_CAP))[0][0])
                <= fewest
            ):
                return None
    return name


#: A `q=` page is looked for row by row, in the page's order, among this many rows of the
#: other filters when the text index holds at least `SEARCH_INDEX_MAX` matches (see
#: `search_scan_sql`).
SEARCH_SCAN_ROWS = 20_000
SEARCH_INDEX_MAX = 1_000
#: Rows walked after which a walk checks its pace (`walk_is_hopeless`).
SEARCH_PACE_AT = frozenset({2_000, 5_000, 10_000})


def walk_is_hopeless(hits: int, walked: int, n: int) -> bool:
    """Whether a walk that found `hits` in `walked` rows is on course for less than half of its
    `n` in `SEARCH_SCAN_ROWS` rows, even with one hit more: it gives up and the index answers.

    A word in 0.06% of 10M rows has ~6k matches (cheap through the index) but ~13 in the walk's
    20k rows: walking them all first cost 300 ms of its 600 ms page on SQLite. Half the pace
    needed, not the pace itself, so that a word just common enough to fill a page (whose ~25k
    matches are dear through the index) is seldom sent there by chance.
    """
    return 2 * (hits + 1) * SEARCH_SCAN_ROWS < n * walked


def search_count_sql(d: Dialect, q: str) -> tuple[str, list[Any]]:
    """How many matches the text index has for `q` (all tenants: it only picks the plan), up to
    `SEARCH_INDEX_MAX`."""
    assert d.search_count is not None
    p = Params(d)
    return d.search_count(p, q, SEARCH_INDEX_MAX), p.values


def search_scan_sql(
    d: Dialect, tenant: str, q: ListQuery, *, sort_index: bool = False
) -> tuple[str, list[Any]]:
    """The first `SEARCH_SCAN_ROWS` rows of `q`'s other filters in page order, each with a last
    column saying whether its text holds `q.q`: read them lazily with `first_hits`.

    Through the text index a page costs every match (all are found, then sorted): a common word
    in 10M rows is a million matches, tens of seconds. Walking the page's order and checking
    each row's text stops at `limit` matches instead. The answer is exact whenever it is a full
    page (it comes from a prefix of the same order); otherwise the caller asks the index (then
    the matches are few). The check is a column, not a filter, so that neither store can turn
    it back into an index scan or sort the rows it would not need.
    """
    assert q.q is not None
    return list_sql(d, tenant, replace(q, q=None, limit=SEARCH_SCAN_ROWS - 1), sort_index=sort_index, hit=q.q)


def first_hits(rows: Iterable[Sequence[Any]], n: int) -> list[Sequence[Any]]:
    """The first `n` rows of a `search_scan_sql` result whose text matched, without the mark;
    fewer when the walk gives up early (`walk_is_hopeless`)."""
    out = []
    for walked, row in enumerate(rows, 1):
        if row[-1]:
            out.append(row[:-1])
            if len(out) >= n:
                break
        if walked in SEARCH_PACE_AT and walk_is_hopeless(len(out), walked, n):
            break
    return out


def range_rows_sql(d: Dialect, tenant: str, q: ListQuery, cap: int) -> tuple[str, list[Any]]:
    """How many rows match `q` (its time range through the time index), counted up to `cap`."""
    p = Params(d)
    return _count_sql(p, from_sql(p, tenant, q), cap)


def page_from_rows(
    d: Dialect, rows: Sequence[Sequence[Any]], limit: int, sort: str = "time"
) -> tuple[list[dict[str, Any]], str | None]:
    items = [row_to_dict(d, row) for row in rows[:limit]]
    if len(rows) > limit:
        last = rows[limit - 1]
        us, rid = d.ts_value(last[_IX["created_at"]]), last[_IX["id"]]
        if sort == "cost":
            nanos = last[_IX["cost_nanos"]]
            return items, encode_sort_cursor(us, rid, sort, -1 if nanos is None else int(nanos))
        if sort == "latency":
            return items, encode_sort_cursor(us, rid, sort, float(last[_IX["latency_ms"]]))
        return items, encode_cursor(us, rid)
    return items, None


#: `record.truncated` is kept in the request headers' JSON under this name (a `Llmtap-*` name,
#: which no recorded header can have), so it needs no column of its own.
TRUNCATED_KEY = "llmtap-truncated"


def row_to_dict(d: Dialect, row: Sequence[Any]) -> dict[str, Any]:
    """A `requests` row (in `COLUMNS` order) as the API's dict (`ROW_FIELDS`)."""

    def ts(v: Any) -> str | None:
        return None if v is None else iso(d.ts_value(v))

    nanos = row[_IX["cost_nanos"]]
    return {
        "id": row[1],
        "tenant": row[0],
        "created_at": ts(row[2]),
        "provider": row[3],
        "model": row[4],
        "method": row[5],
        "path": row[6],
        "target_url": row[7],
        "status": row[8],
        "outcome": row[9],
        "error": row[10],
        "streamed": bool(row[11]),
        "latency_ms": row[12],
        "time_to_first_token_ms": row[13],
        "prompt_tokens": row[14],
        "completion_tokens": row[15],
        "total_tokens": row[16],
        "cached_tokens": row[17],
        "cache_write_tokens": row[18],
        "reasoning_tokens": row[19],
        "usage_source": row[20],
        "cost_usd": None if nanos is None else int(nanos) / 1e9,
        "price_version": row[22],
        "user_id": row[23],
        "session_id": row[24],
        "properties": d.json_value(row[25]),
        "request_headers": (request_headers := d.json_value(row[26])),
        "response_headers": d.json_value(row[27]),
        "request_body": d.json_value(row[28]),
        "response_body": d.json_value(row[29]),
        "response_events": d.json_value(row[30]),
        "route": row[31],
        "first_byte_at": ts(row[32]),
        "ended_at": ts(row[33]),
        "gateway": row[34],
        "cache_write_1h_tokens": row[35],
        "input_audio_tokens": row[36],
        "output_audio_tokens": row[37],
        "service_tier": row[38],
        "web_search_requests": row[39],
        "audio_seconds": row[40],
        "input_characters": row[41],
        "truncated": _truncated(request_headers),
    }


def _truncated(headers: Any) -> list[str]:
    if isinstance(headers, dict):
        flags = headers.pop(TRUNCATED_KEY, None)
        if isinstance(flags, str) and flags:
            return flags.split(",")
    return []


# -- aggregates ----------------------------------------------------------------------------------

Kind = Literal["overall", "group", "bucket", "users"]

_SUMS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


def group_key(p: Params, group_by: str) -> str:
    """The key expression of a `group_by` (`query.is_group_by` decides which are valid)."""
    if not is_group_by(group_by):
        raise ValueError(f"cannot group by {group_by!r}")
    if group_by.startswith(PROPERTY):
        return p.dialect.prop_value(p(property_name(group_by[len(PROPERTY) :])))
    return f"r.{group_by}"


def _key(p: Params, q: StatsQuery, kind: Kind) -> str:
    if kind == "group":
        assert q.group_by is not None
        return group_key(p, q.group_by)
    if kind == "bucket":
        assert q.bucket is not None
        return p.dialect.bucket(q.bucket)
    if kind == "users":
        return "r.user_id"
    return "NULL"


def _totals(d: Dialect) -> str:
    """The totals columns of `aggregate_sql` (and `sessions_sql`), read back by `aggregate_row`."""
    return (
        f"count(*), coalesce(sum(CASE WHEN {ERROR} THEN 1 ELSE 0 END), 0),"
        f" {', '.join(d.add_up(f'r.{c}') for c in _SUMS)},"
        f" {d.add_up('r.cost_nanos')}, min(r.created_at), max(r.created_at),"
        " coalesce(sum(CASE WHEN r.cost_nanos IS NULL THEN 1 ELSE 0 END), 0)"
    )


def aggregate_sql(
    d: Dialect,
    tenant: str,
    q: StatsQuery,
    kind: Kind,
    *,
    limit: int | None = None,
    percentiles: bool = True,
    after: tuple[int, str] | None = None,
    through: str | None = None,
    users_by: str = "time",
) -> tuple[str, list[Any]]:
    """One aggregate query: overall, per group, per time bucket, or per user (a page of
    `GET /api/v1/users`: most recently active first, or `users_by="cost"` highest cost first;
    those after `after`, the sort's value and the user id).

    Result columns: key, count, error_count, the `_SUMS`, cost_nanos, first and last created_at,
    the count of unpriced rows (cost NULL: shown as such, never as $0), then (PostgreSQL,
    `percentiles=True`) the latency and TTFT `percentile_cont` arrays. SQLite has no percentile
    aggregate: it asks with `percentiles=False` and computes them from `values_sql` (see
    `percentiles_of`). `through`: see `property_walk`.
    """
    p = Params(d)
    key = _key(p, q, kind)
    source = from_sql(p, tenant, q.filters, q.since, q.until, through=through)
    if kind == "users":
        source += " AND r.user_id IS NOT NULL"
    cols = _totals(d)
    if percentiles:
        if d.name != "postgresql":
            raise ValueError("percentiles in SQL need PostgreSQL's percentile_cont")
        arr = "ARRAY[" + ",".join(repr(x) for x in PERCENTILES) + "]::float8[]"
        cols += (
            f", percentile_cont({arr}) WITHIN GROUP (ORDER BY r.latency_ms),"
            f" percentile_cont({arr}) WITHIN GROUP (ORDER BY r.ttft_ms)"
        )
    if kind == "overall":
        group = order = ""
    elif kind == "group":  # largest first, then by key, NULL last
        group, order = f" GROUP BY {key}", f" ORDER BY count(*) DESC, ({key}) IS NULL, {key}"
    elif kind == "bucket":  # oldest first
        group, order = f" GROUP BY {key}", f" ORDER BY {key}"
    else:  # users: most recently active first, or highest cost first
        by = d.add_up("r.cost_nanos") if users_by == "cost" else "max(r.created_at)"
        group, order = f" GROUP BY {key}", f" ORDER BY {by} DESC, {key}"
        if after is not None:
            last = p(after[0] if users_by == "cost" else d.ts_param(after[0]))
            user = p(after[1])
            group += f" HAVING {by} < {last} OR ({by} = {last} AND {key} > {user})"
    lim = f" LIMIT {p(limit)}" if limit is not None else ""
    return f"SELECT {key}, {cols} {source}{group}{order}{lim}", p.values


def values_sql(d: Dialect, tenant: str, q: StatsQuery, through: str | None = None) -> tuple[str, list[Any]]:
    """(group key, bucket key, latency_ms, ttft_ms) of every row `stats` covers, in one scan.

    A key column is NULL when the query has no group_by / bucket.
    """
    p = Params(d)
    g = _key(p, q, "group") if q.group_by else "NULL"
    b = _key(p, q, "bucket") if q.bucket else "NULL"
    source = from_sql(p, tenant, q.filters, q.since, q.until, through=through)
    return f"SELECT {g}, {b}, r.latency_ms, r.ttft_ms {source}", p.values


def keyed_values_sql(
    d: Dialect, tenant: str, q: StatsQuery, column: str, keys: Sequence[Any]
) -> tuple[str, list[Any]]:
    """(key, latency_ms, ttft_ms, created_at) of the rows `stats` covers whose `column` (of `HASH_INDEXED`)
    is one of `keys` (None: NULL), through the column's index: the raw rows of a few groups."""
    if column not in HASH_INDEXED:
        raise ValueError(f"no index on {column!r}")
    p = Params(d)
    where = where_sql(p, tenant, q.filters, q.since, q.until)
    col = f"r.{column}"
    either = []
    marks = [p(k) for k in keys if k is not None]
    if marks:
        cond = f"{col} IN ({', '.join(marks)})"
        if d.hashed is not None:  # through the hash index, as `equals`
            cond = f"{d.hashed(col)} IN ({', '.join(d.hashed(m) for m in marks)}) AND {cond}"
        either.append(f"({cond})")
    if any(k is None for k in keys):
        either.append(f"{col} IS NULL")
    if not either:
        either.append("1 = 0")
    where += f" AND ({' OR '.join(either)})"
    return f"SELECT {col}, r.latency_ms, r.ttft_ms, r.created_at FROM requests r WHERE {where}", p.values


def percentiles_of(values: list[float]) -> dict[str, float | None]:
    """`PERCENTILES` of the values exactly as PostgreSQL's percentile_cont computes them.

    Sorts `values` in place.
    """
    values.sort()
    n = len(values)
    out: list[float | None] = []
    for frac in PERCENTILES:
        if not n:
            out.append(None)
            continue
        lo = math.floor(frac * (n - 1))
        out.append(interpolate(frac, n, values[lo], values[lo + 1] if lo + 1 < n else None))
    return _pcts(out)


def interpolate(frac: float, n: int, lo: float | None, hi: float | None) -> float | None:
    """PostgreSQL's `percentile_cont` from the values at ranks floor(pos) and floor(pos) + 1."""
    if n <= 0 or lo is None:
        return None
    pos = frac * (n - 1)
    first = math.floor(pos)
    if math.ceil(pos) == first or hi is None:
        return float(lo)
    return float(lo) + (float(hi) - float(lo)) * (pos - first)


def aggregate_row(d: Dialect, row: Sequence[Any], *, percentiles: bool = True) -> tuple[Any, dict[str, Any]]:
    """(key, totals dict) from one row of `aggregate_sql`."""
    count = int(row[1])
    errors = int(row[2])
    out: dict[str, Any] = {
        "count": count,
        "error_count": errors,
        "error_rate": errors / count if count else 0.0,
    }
    for i, name in enumerate(_SUMS):
        out[name] = int(row[3 + i])
    base = 3 + len(_SUMS)
    out["cost_usd"] = float(row[base]) / 1e9
    out["first_at"] = None if row[base + 1] is None else iso(d.ts_value(row[base + 1]))
    out["last_at"] = None if row[base + 2] is None else iso(d.ts_value(row[base + 2]))
    out["unpriced_count"] = int(row[base + 3])
    if percentiles:
        rest = row[base + 4 :]
        out["latency_ms"] = _pcts(list(rest[0] or [None] * len(PERCENTILES)))
        out["time_to_first_token_ms"] = _pcts(list(rest[1] or [None] * len(PERCENTILES)))
    return row[0], out


def _pcts(values: Sequence[float | None]) -> dict[str, float | None]:
    return {
        f"p{round(f * 100)}": (None if v is None else float(v))
        for f, v in zip(PERCENTILES, values, strict=True)
    }


SUM_COLUMNS = _SUMS
pcts = _pcts


def empty_totals() -> dict[str, Any]:
    out: dict[str, Any] = {"count": 0, "error_count": 0, "error_rate": 0.0}
    out.update(dict.fromkeys(_SUMS, 0))
    out.update({"cost_usd": 0.0, "first_at": None, "last_at": None, "unpriced_count": 0})
    out["latency_ms"] = _pcts([None] * len(PERCENTILES))
    out["time_to_first_token_ms"] = _pcts([None] * len(PERCENTILES))
    return out


def group_value(d: Dialect, group_by: str, key: Any) -> Any:
    if key is None:
        return None
    if group_by == "status":
        return int(key)
    return str(key)


def sessions_sql(d: Dialect, tenant: str, q: ListQuery, through: str | None = None) -> tuple[str, list[Any]]:
    """The newest matching request of each of the next `q.limit + 1` sessions, newest first.

    A session's place is its newest request matching the filters (most recently active first;
    ties by that request's id), so a page is found by walking the (tenant, created_at) index
    from the cursor and keeping the rows no newer matching row of their session follows (an
    index probe each). That stops after a page of sessions; grouping every request of the range
    to sort sessions by their last one (measured: 3.6 s for 7 days of 1M rows on PostgreSQL)
    does not. Rows: (session id, created_at, id). The cursor is `encode_cursor` of the last.
    `through`: the walk is a filter property's rows instead (see `property_walk`).
    """
    p = Params(d)
    source = from_sql(p, tenant, q, through=through) + " AND r.session_id IS NOT NULL"
    created, rid_col = ("r.created_at", "r.id") if through is None else ("rp.created_at", "rp.request_id")
    if q.cursor:
        us, rid, _ = decode_walk_cursor(q.cursor)
        ts = p(d.ts_param(us))
        source += f" AND {created} <= {ts} AND ({created}, {rid_col}) < ({ts}, {p(rid)})"
    inner = re.sub(r"\br\.", "n.", where_sql(p, tenant, q))  # the same filters, on `n`
    newer = (
        f"SELECT 1 FROM requests n WHERE {inner} AND {equals(d, 'n.session_id', 'r.session_id')}"
        " AND n.created_at >= r.created_at AND (n.created_at, n.id) > (r.created_at, r.id)"
    )
    return (
        f"SELECT r.session_id, r.created_at, r.id {source} AND NOT EXISTS ({newer})"
        f" ORDER BY {created} DESC, {rid_col} DESC LIMIT {p(q.limit + 1)}"
    ), p.values


def session_totals_sql(d: Dialect, tenant: str, q: ListQuery, ids: Sequence[str]) -> tuple[str, list[Any]]:
    """Totals (no percentiles) of the matching requests of the sessions `ids`, one row each."""
    p = Params(d)
    where = where_sql(p, tenant, q)
    marks = [p(i) for i in ids]
    where += f" AND r.session_id IN ({', '.join(marks)})"
    if d.hashed is not None:  # through the hash index, as `equals`
        where += f" AND {d.hashed('r.session_id')} IN ({', '.join(d.hashed(m) for m in marks)})"
    return f"SELECT r.session_id, {_totals(d)} FROM requests r WHERE {where} GROUP BY r.session_id", p.values


def sessions_walk(q: ListQuery) -> tuple[ListQuery, int | None]:
    """A sessions page's query, and the bound of its walk (`encode_walk_cursor`).

    A session's place is its newest request: one active again after the first page left its
    place below the cursor for one above it, and no page showed it (an outside check: 7 of 100
    sessions skipped under traffic). So every later page sees the list as the first one did:
    up to the newest request that page saw, totals included."""
    if not q.cursor:
        return q, None
    held = decode_walk_cursor(q.cursor)[2]
    if held is None:
        return q, None
    if held == MICROS_RANGE[1]:  # nothing is later than the last microsecond a store holds
        return q, held
    bound = from_micros(held + 1)  # `until` is exclusive
    return replace(q, until=bound if q.until is None or bound < q.until else q.until), held


def sessions_page(
    d: Dialect,
    newest: Sequence[Sequence[Any]],
    totals: Sequence[Sequence[Any]],
    limit: int,
    held: int | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """(items, next cursor) from the rows of `sessions_sql` and `session_totals_sql`; `held`
    is the walk's bound (`sessions_walk`), None on its first page."""
    by_id = {}
    for row in totals:
        key, t = aggregate_row(d, row, percentiles=False)
        by_id[key] = t
    items = [{"session_id": row[0], **by_id[row[0]]} for row in newest[:limit] if row[0] in by_id]
    if len(newest) <= limit:
        return items, None
    last = newest[limit - 1]
    if held is None:
        held = d.ts_value(newest[0][1])
    return items, encode_walk_cursor(d.ts_value(last[1]), last[2], held)


def session_result(
    d: Dialect, session_id: str, totals: dict[str, Any], rows: Sequence[Sequence[Any]]
) -> dict[str, Any]:
    """A session: its requests oldest first (at most `MAX_SESSION_REQUESTS`) and its totals."""
    items = [row_to_dict(d, row) for row in rows[:MAX_SESSION_REQUESTS]]
    return {
        "session_id": session_id,
        "totals": totals,
        "requests": items,
        "truncated": len(rows) > MAX_SESSION_REQUESTS,
    }


def user_result(d: Dialect, row: Sequence[Any]) -> UserTotals:
    """One row of a `users` aggregate (no percentiles) as the API's dict."""
    key, totals = aggregate_row(d, row, percentiles=False)
    return UserTotals({"user_id": key, **totals}, int(row[3 + len(_SUMS)]))


def now() -> datetime:
    return datetime.now(UTC)


# -- API keys ------------------------------------------------------------------------------------


def new_key_id() -> str:
    """Short public id of an API key (what `llmtap keys revoke` takes)."""
    return "key_" + secrets.token_hex(8)


def keys_match(stored_hash: str, key_hash: str) -> bool:
    """Constant-time confirmation of an index lookup by hash."""
    return hmac.compare_digest(stored_hash.encode(), key_hash.encode())
