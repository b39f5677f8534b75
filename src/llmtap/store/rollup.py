"""Rollups: per tenant x time bucket x one dimension, what `/api/v1/stats` sums, pre-added.

Why: stats over raw rows scan and sort every row of the range (~1 s per 1M rows on PostgreSQL);
a 30-day overview from day rollups reads a few hundred rows, whatever the volume.

Shape. A rollup row is keyed by (tenant, grain, bucket start, dimension, key) and holds count,
error count, the six token sums, cost (nanodollars), first/last `created_at` and two DDSketches
(latency, TTFT; `llmtap.store.sketch`). Each dimension is rolled up on its own — `""` (all
requests), `model`, `provider`, `status`, `property.<name>` for the names of
`LLMTAP_ROLLUP_PROPERTIES` — so the row count grows with the values of each dimension, not with
their product. Grains: minute, hour and day for `""`, model, provider and status; hour and day
for properties (see `rolled`). Users (`USER_DIM`) are rolled up per day only and without
sketches: per-user totals, what the top users and the Users view show (see `BASE_DIMS`). Keys
are text: `""` stands for NULL, anything else is `"="` followed by the value, so NULL and the
empty string stay apart and the key can be NOT NULL.

Consistency with at-least-once delivery: the stores add a record's contribution in the same
transaction as its row, and only when the row was newly inserted. Retention subtracts the
contributions of the rows it deletes (counts, sums and sketch bins subtract exactly), drops rollup
rows whose count reaches zero and recomputes first/last `created_at` of the rows left (see
`recompute_sql`).

Coverage: a dimension answers only for data written since it was rolled up (`rollup_dims`:
since 0 when the store had no requests at that time); an older range falls back to raw rows.
Every worker must run with the same `LLMTAP_ROLLUP_PROPERTIES`. The base dimensions and the
properties are registered at connect (`dims_for`); `USER_DIM` by its own migration, which is
when its rows began. A dimension's coverage starts at the next minute, or after the newest
row already stored if that is later (a gateway clock ahead of the worker's stamps rows in what
would otherwise be covered, yet they were never added to the new dimension's rollups).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from llmtap.store import sql
from llmtap.store.base import ListQuery, StatsQuery
from llmtap.store.query import BUCKET_MICROS, MAX_BUCKETS, MAX_GROUPS, UserTotals, from_micros, iso, to_micros
from llmtap.store.sketch import RELATIVE_ACCURACY, Sketch, key_of

GRAINS = ("minute", "hour", "day")
#: Dimensions rolled up with latency/TTFT sketches at every grain. `user_id` is not one of them:
#: with thousands of users a user's day holds a few requests, so rows with sketches were about
#: as many as raw rows and slower to merge (measured at 1M rows on PostgreSQL: top users over 30
#: days took 6.0 s from such day rollups, 1.9 s from raw rows). It is `USER_DIM` instead.
BASE_DIMS = ("", "model", "provider", "status")
#: Per-user totals: per UTC day and calendar month, no sketches (NULL), summed in SQL
#: (`group_sql`): narrow rows a database adds up fast. A range reads whole months from the month
#: rows, less the days outside it, and the rest from day rows (`user_parts`): 30 days of 10k
#: users are ~40k rows instead of ~300k. Per-user percentiles and first/last times come from the
#: raw rows of the users a stats answer lists (`sql.keyed_values_sql`), exactly.
USER_DIM = "user_id"
_DAY = "day"
_MONTH = "month"
#: Dimensions also rolled up per minute; properties (a few values each, e.g. feature, env) per
#: hour and day only; users per day and month only.
MINUTE_DIMS = frozenset(("", "model", "provider", "status"))


def rolled(grain: str, dim: str) -> bool:
    """Whether `dim` is rolled up at `grain`."""
    if dim == USER_DIM:
        return grain in (_DAY, _MONTH)
    return grain != _MONTH and (grain != "minute" or dim in MINUTE_DIMS)


def month_start(us: int) -> int:
    """The start of the UTC calendar month holding `us` (microseconds)."""
    t = from_micros(us)
    return to_micros(datetime(t.year, t.month, 1, tzinfo=UTC))


def bucket_end(grain: str, bucket: int) -> int:
    return _next_month(bucket) if grain == _MONTH else bucket + BUCKET_MICROS[grain]


def _next_month(us: int) -> int:
    t = from_micros(us)
    y, m = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return to_micros(datetime(y, m, 1, tzinfo=UTC))


_SUM_NAMES = (
    "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "cache_write_tokens",
    "reasoning_tokens",
)  # fmt: skip
#: Columns of `requests` a record contributes from, in this order (see `contribution`).
SOURCE_COLUMNS = (
    "tenant", "created_at", "provider", "model", "status", "outcome", "latency_ms", "ttft_ms",
    *_SUM_NAMES, "cost_nanos", "user_id", "properties",
)  # fmt: skip
_SRC_IX = tuple(sql.COLUMNS.index(c) for c in SOURCE_COLUMNS)
#: Rollup row columns, in the order they are written and read.
COLUMNS = (
    "tenant", "grain", "bucket", "dim", "key", "count", "error_count", *_SUM_NAMES, "cost_nanos",
    "unpriced_count", "first_at", "last_at", "latency", "ttft",
)  # fmt: skip
UNIQUE = ("tenant", "grain", "bucket", "dim", "key")


def encode_key(value: Any) -> str:
    return "" if value is None else "=" + str(value)


def decode_key(dim: str, key: str) -> Any:
    if key == "":
        return None
    return int(key[1:]) if dim == "status" else key[1:]


def dims_for(props: Sequence[str]) -> tuple[str, ...]:
    return (*BASE_DIMS, *(f"property.{sql.property_name(p)}" for p in props))


def registered_properties(registered: Iterable[str]) -> tuple[str, ...]:
    """The properties of registered `property.*` dimensions (an admin connection's, which must
    neither add nor drop any: `llmtap erase` with other settings than the server's took a
    user's rollup rows out of nothing and unregistered the server's dimensions)."""
    return tuple(d.removeprefix("property.") for d in registered if d.startswith("property."))


def coverage_start(now: int, newest: int | None) -> int:
    """Where a dimension registered now starts covering: the minute after `now`, or after the
    newest row already stored (`created_at` is the gateway's clock, not this process's)."""
    return (max(now, newest if newest is not None else now) // 60_000_000 + 1) * 60_000_000


def uncovered(registered: Iterable[str], props: Sequence[str]) -> list[str]:
    """Registered property dimensions this process will not roll up: their coverage ends now.

    Kept, a property taken out of `LLMTAP_ROLLUP_PROPERTIES` and put back later would claim to
    cover the records stored in between, which were never added to its rollups."""
    mine = set(dims_for(props))
    return [d for d in registered if d.startswith("property.") and d not in mine]


#: A rollup sum stops here (the columns are 64-bit): 13 records of 10^12 tokens each at o1-pro's
#: price took a day's cost past it, and the store refused the batch: the records were
#: dead-lettered. Sums that large are no real traffic; they saturate rather than cost a log.
INT64_MAX = 2**63 - 1


@dataclass(slots=True)
class Cell:
    """One rollup row's values (a delta while writing, a total while answering)."""

    count: int = 0
    error_count: int = 0
    sums: list[int] = field(default_factory=lambda: [0] * len(_SUM_NAMES))
    cost_nanos: int = 0
    unpriced_count: int = 0  # rows without a cost (NULL): shown as such, never as $0
    first_at: int | None = None
    last_at: int | None = None
    latency: Sketch = field(default_factory=Sketch)
    ttft: Sketch = field(default_factory=Sketch)

    def merge(self, o: Cell) -> None:
        self.count += o.count
        self.error_count += o.error_count
        self.sums = [a + b for a, b in zip(self.sums, o.sums, strict=True)]
        self.cost_nanos += o.cost_nanos
        self.unpriced_count += o.unpriced_count
        if o.first_at is not None and (self.first_at is None or o.first_at < self.first_at):
            self.first_at = o.first_at
        if o.last_at is not None and (self.last_at is None or o.last_at > self.last_at):
            self.last_at = o.last_at
        self.latency.merge(o.latency)
        self.ttft.merge(o.ttft)

    def row(self, key: tuple[str, str, int, str, str]) -> tuple[Any, ...]:
        sums, cost = self.sums, self.cost_nanos
        if cost > INT64_MAX or max(sums) > INT64_MAX:  # see INT64_MAX
            sums, cost = [min(v, INT64_MAX) for v in sums], min(cost, INT64_MAX)
        return (*key, self.count, self.error_count, *sums, cost, self.unpriced_count,
                self.first_at, self.last_at, _encode(self.latency), _encode(self.ttft))  # fmt: skip

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Cell:
        """From the columns after the key (`COLUMNS[5:]`)."""
        n = len(_SUM_NAMES)
        return cls(
            count=int(row[0]),
            error_count=int(row[1]),
            sums=[int(v) for v in row[2 : 2 + n]],
            cost_nanos=int(row[2 + n]),
            unpriced_count=int(row[3 + n]),
            first_at=None if row[4 + n] is None else int(row[4 + n]),
            last_at=None if row[5 + n] is None else int(row[5 + n]),
            latency=Sketch.decode(row[6 + n]),
            ttft=Sketch.decode(row[7 + n]),
        )

    def totals(self) -> dict[str, Any]:
        """In the shape of `sql.aggregate_row` (the raw path's totals)."""
        out: dict[str, Any] = {
            "count": self.count,
            "error_count": self.error_count,
            "error_rate": self.error_count / self.count if self.count else 0.0,
        }
        for name, v in zip(_SUM_NAMES, self.sums, strict=True):
            if name in sql.SUM_COLUMNS:
                out[name] = v
        out["cost_usd"] = self.cost_nanos / 1e9
        out["first_at"] = iso(self.first_at)
        out["last_at"] = iso(self.last_at)
        out["unpriced_count"] = self.unpriced_count
        out["latency_ms"] = sql.pcts(self.latency.quantiles(sql.PERCENTILES))
        out["time_to_first_token_ms"] = sql.pcts(self.ttft.quantiles(sql.PERCENTILES))
        return out


def _encode(s: Sketch) -> bytes | None:
    """An empty sketch (a `USER_DIM` row's, or TTFT with no streamed request) is NULL."""
    return s.encode() if s.bins or s.zeros else None


RollupKey = tuple[str, str, int, str, str]


def source_values(values: Sequence[Any]) -> tuple[Any, ...]:
    """The `SOURCE_COLUMNS` of a `sql.record_values` tuple."""
    return tuple(values[i] for i in _SRC_IX)


def _finest(dim: str) -> str:
    """The finest grain `dim` is rolled up at: coarser cells are merged from those."""
    if dim == USER_DIM:
        return _DAY
    return "minute" if dim in MINUTE_DIMS else "hour"


def contributions(
    srcs: Iterable[Sequence[Any]], props: Sequence[str], sign: int = 1
) -> dict[RollupKey, Cell]:
    """The rollup deltas of some rows: added (sign 1) or subtracted (-1, retention); each row in
    `SOURCE_COLUMNS` order, created_at in microseconds, properties as JSON text or a dict.

    Rows alike in every sketched dimension (tenant, minute, model, provider, status, the
    property values) are summed first, then each sum goes into its dimensions' finest cells;
    the coarser ones are merged from those. A batch's rows mostly share a minute and a model:
    two cell updates per row (that group and the user's day) instead of one per dimension.
    """
    n = len(_SUM_NAMES)
    minute, hour, day = BUCKET_MICROS["minute"], BUCKET_MICROS["hour"], BUCKET_MICROS[_DAY]
    prop_dims = [(p, f"property.{p}") for p in props]
    groups: dict[tuple[Any, ...], Cell] = {}
    out: dict[RollupKey, Cell] = {}
    for src in srcs:
        tenant, created, provider, model, status, outcome, lat, ttft = src[:8]
        sums = [sign * int(v or 0) for v in src[8 : 8 + n]]
        cost = sign * int(src[8 + n] or 0)
        unpriced = sign if src[8 + n] is None else 0
        error = sign if (status is not None and status >= 400) or outcome != "completed" else 0
        if prop_dims:
            raw_props = src[10 + n]
            properties = orjson.loads(raw_props) if isinstance(raw_props, str | bytes) else raw_props
            values = tuple(encode_key(properties.get(p)) for p, _ in prop_dims)
        else:
            values = ()
        sig = (tenant, created // minute * minute, model, provider, status, values)
        user = (tenant, _DAY, created // day * day, USER_DIM, encode_key(src[9 + n]))
        group = groups.get(sig)
        if group is None:
            group = groups[sig] = Cell()
        totals = out.get(user)
        if totals is None:
            totals = out[user] = Cell()  # USER_DIM: totals only, no sketches
        for cell in (group, totals):
            cell.count += sign
            cell.error_count += error
            s = cell.sums
            for j in range(n):
                s[j] += sums[j]
            cell.cost_nanos += cost
            cell.unpriced_count += unpriced
            if sign > 0:
                if cell.first_at is None or created < cell.first_at:
                    cell.first_at = created
                if cell.last_at is None or created > cell.last_at:
                    cell.last_at = created
        lat_v = float(lat)
        group.latency.add(lat_v, sign, key_of(lat_v))
        if ttft is not None:
            ttft_v = float(ttft)
            group.ttft.add(ttft_v, sign, key_of(ttft_v))
    for (tenant, m, model, provider, status, values), group in groups.items():
        h = m // hour * hour
        keys = [
            (tenant, "minute", m, "", ""),
            (tenant, "minute", m, "model", encode_key(model)),
            (tenant, "minute", m, "provider", encode_key(provider)),
            (tenant, "minute", m, "status", encode_key(status)),
            *((tenant, "hour", h, dim, v) for (_, dim), v in zip(prop_dims, values, strict=True)),
        ]
        for key in keys:
            target = out.get(key)
            if target is None:
                target = out[key] = Cell()
            target.merge(group)
    for coarse, width in (("hour", hour), (_DAY, day)):
        finer = "minute" if coarse == "hour" else "hour"
        for (tenant, grain, bucket, dim, k), cell in list(out.items()):
            if grain != finer:
                continue
            key = (tenant, coarse, bucket // width * width, dim, k)
            acc = out.get(key)
            if acc is None:
                acc = out[key] = Cell()
            acc.merge(cell)
    for (tenant, grain, bucket, dim, k), cell in list(out.items()):
        if dim == USER_DIM and grain == _DAY:
            key = (tenant, _MONTH, month_start(bucket), dim, k)
            acc = out.get(key)
            if acc is None:
                acc = out[key] = Cell()
            acc.merge(cell)
    return out


def split_totals(deltas: dict[RollupKey, Cell]) -> tuple[dict[RollupKey, Cell], list[tuple[Any, ...]]]:
    """(the cells with sketches, the rows of `USER_DIM`'s) of positive deltas (a write, not
    retention): the latter the database adds up itself (`add_totals_sql`), without reading them
    first. They are most of a batch's cells (a user's day each) and read one by one they were
    a third of SQLite's write cost."""
    sketched: dict[RollupKey, Cell] = {}
    totals = []
    for key, cell in deltas.items():
        if key[3] == USER_DIM:
            totals.append(cell.row(key))
        else:
            sketched[key] = cell
    return sketched, totals


def add_totals_sql(placeholders: Sequence[str]) -> str:
    """Insert a rollup row without sketches (`split_totals`), or add it to the row there."""
    cols = ", ".join(COLUMNS)
    # min(): SQLite makes an overflowing integer sum a REAL; it is held at INT64_MAX, as `Cell.row`.
    added = ", ".join(f"{c} = min(rollups.{c} + excluded.{c}, {INT64_MAX})" for c in COLUMNS[5:-4])
    return (
        f"INSERT INTO rollups ({cols}) VALUES ({', '.join(placeholders)})"
        f" ON CONFLICT ({', '.join(UNIQUE)}) DO UPDATE SET {added},"
        " first_at = CASE WHEN rollups.first_at IS NULL OR excluded.first_at < rollups.first_at"
        " THEN excluded.first_at ELSE rollups.first_at END,"
        " last_at = CASE WHEN rollups.last_at IS NULL OR excluded.last_at > rollups.last_at"
        " THEN excluded.last_at ELSE rollups.last_at END"
    )


def apply(
    existing: dict[RollupKey, Cell], deltas: dict[RollupKey, Cell]
) -> tuple[list[tuple[Any, ...]], list[RollupKey]]:
    """(rows to upsert, keys to delete) once `deltas` are added to the `existing` cells.

    `existing` is updated in place: afterwards it holds every cell as written (a deleted one
    with a count of zero or less), which a store may keep for its next batch."""
    upsert, delete = [], []
    for key, delta in deltas.items():
        cell = existing.get(key)
        if cell is None:
            cell = existing[key] = Cell()
        cell.merge(delta)
        if cell.count <= 0:
            delete.append(key)
        else:
            upsert.append(cell.row(key))
    return upsert, delete


# -- answering -----------------------------------------------------------------------------------


def _plain(f: ListQuery) -> bool:
    return (
        f.user_id is None
        and f.session_id is None
        and f.model is None
        and f.provider is None
        and f.status is None
        and not f.q
        and f.status_class is None
        and f.outcome is None
        and f.error is None
        and f.min_cost_usd is None
        and f.max_cost_usd is None
        and f.min_latency_ms is None
        and f.max_latency_ms is None
        and f.since is None
        and f.until is None
        and not f.properties
    )


def _where(f: ListQuery, props: Sequence[str]) -> tuple[str, str] | None:
    """The rollup rows standing for all of a filter's requests: ("", "") with no filter, (dim,
    encoded key) for one equality on a rolled-up dimension (`model=`, `provider=`, `status=`,
    `property.<rolled up>=`: the cost of one model per day, the Overview of one feature);
    None when rollups cannot answer it."""
    eq: list[tuple[str, Any]] = [("model", f.model), ("provider", f.provider), ("status", f.status)]
    eq += [(f"property.{sql.property_name(k)}", v) for k, v in f.properties.items()]
    given = [(d, v) for d, v in eq if v is not None]
    if len(given) > 1 or not _plain(replace(f, model=None, provider=None, status=None, properties={})):
        return None
    if not given:
        return ("", "")
    dim, value = given[0]
    if dim.startswith("property.") and dim not in dims_for(props):
        return None
    return dim, encode_key(value)


Span = tuple[str, int | None, int | None]  # (grain, from, to): rollup rows with from <= bucket < to


@dataclass(frozen=True, slots=True)
class Plan:
    dim: str | None  # the group_by dimension
    since: int | None
    until: int | None
    #: Rollup rows to read; their buckets tile the range but for the `edges`.
    spans: tuple[Span, ...] = ()
    #: [from, to) ranges off the finest grain's boundaries (at the range's ends): raw rows,
    #: read as the raw path reads a range (`edge_reads`, `Edges`).
    edges: tuple[tuple[int, int], ...] = ()
    #: The group dimension's rows to read: the same range as `spans`, at the coarsest grains
    #: (groups are totals over the range, whatever the bucket): 30 days of a model are 30 day
    #: rows, not 720 hour rows, when the Overview asks for hour buckets.
    group_spans: tuple[Span, ...] = ()
    #: The rows of the totals and buckets (`_where`): ("", "") all requests, else a filter's
    #: (dim, key). Grouped by that same dimension, they are the only group too.
    where: tuple[str, str] = ("", "")
    filters: ListQuery = field(default_factory=ListQuery)
    one_group: bool = False  # grouped by the filter's dimension: its value is the only group
    #: `USER_DIM`: the whole UTC days [from, to) its day and month rows sum (None: open; from >= to:
    #: none), and the raw ranges at the ends (`users_edges`) summed beside them per user.
    user_days: tuple[int | None, int | None] = (None, None)
    user_edges: tuple[tuple[int, int], ...] = ()


def plan(q: StatsQuery, props: Sequence[str], covered_since: dict[str, int]) -> Plan | None:
    """The rollup reading that answers `q`, or None (then raw rows answer).

    Needs: no list filter but one `_where` takes; group_by among the rolled-up dimensions (the
    filter's own, if any); a bucket no finer than the grain; the range inside the dimensions'
    coverage. A range on the grains' boundaries reads
    rollup rows alone, coarsest first. One off them (`since=` to the second, as an API client
    asks for "the last 24 hours") reads the whole minutes, hours and days inside it from rollups
    and only the partial minutes at its ends (hours for a property) from raw rows: without
    that, a range one second off the minute scanned every raw row in it. Users (day rows only)
    still need whole days.
    """
    where = None if q.exact else _where(q.filters, props)
    if where is None:
        return None
    dim = q.group_by
    if dim is not None:
        if dim.startswith("property."):
            dim = "property." + sql.property_name(dim[len("property.") :])
        if dim == "" or (dim not in dims_for(props) and dim != USER_DIM):
            return None
        if where[0] and dim != where[0]:
            return None  # no rollup holds one dimension's groups within another's value
    since = None if q.since is None else to_micros(q.since)
    until = None if q.until is None else to_micros(q.until)
    for d in ("", dim, where[0]):
        if d is None:
            continue
        start = covered_since.get(d)
        if start is None or (start > 0 and (since is None or since < start)):
            return None
    widest = BUCKET_MICROS[q.bucket or _DAY]  # a grain no coarser than the bucket asked for
    sketched = tuple(d for d in (dim, where[0]) if d and d != USER_DIM)  # users: `user_days` below
    usable = [g for g in GRAINS if BUCKET_MICROS[g] <= widest and all(rolled(g, d) for d in sketched)]
    one_group = bool(where[0]) and dim == where[0]
    dim = None if one_group else dim
    made = functools.partial(Plan, where=where, filters=q.filters, one_group=one_group)
    if dim == USER_DIM:  # whole days from the user rows, the rest of the range from raw rows
        day = BUCKET_MICROS[_DAY]
        lo = None if since is None else -(-since // day) * day
        hi = None if until is None else until // day * day
        if lo is not None and hi is not None and lo > hi:
            lo = hi = since  # inside one day: all of it raw
        raw = ((since, lo), (hi, until))
        made = functools.partial(
            made,
            user_days=(lo, hi),
            user_edges=tuple((a, b) for a, b in raw if a is not None and b is not None and a < b),
        )
    for grain in reversed(usable):  # coarsest first: fewest rows to read
        width = BUCKET_MICROS[grain]
        if (since is None or since % width == 0) and (until is None or until % width == 0):
            return made(dim, since, until, ((grain, since, until),), (), _group_spans(dim, since, until))
    if not usable:
        return None
    width = BUCKET_MICROS[usable[0]]
    lo = None if since is None else -(-since // width) * width
    hi = None if until is None else until // width * width
    if lo is not None and hi is not None and lo >= hi:
        return None  # under one bucket of the finest grain: few raw rows, answered exactly
    spans = _tile(lo, hi, usable)
    edges = tuple((a, b) for a, b in ((since, lo), (hi, until)) if a is not None and b is not None and a < b)
    return made(dim, since, until, spans, edges, _group_spans(dim, lo, hi))


def _group_spans(dim: str | None, lo: int | None, hi: int | None) -> tuple[Span, ...]:
    """`Plan.group_spans` of [lo, hi) (on the boundaries of a grain `dim` is rolled up at)."""
    if dim is None or dim == USER_DIM:
        return ()
    grains = [g for g in GRAINS if rolled(g, dim)]
    return _tile(lo, hi, grains) or ((grains[0], lo, hi),)  # an empty range: a span of no rows


def _tile(lo: int | None, hi: int | None, grains: Sequence[str]) -> tuple[Span, ...]:
    """[lo, hi) (on the finest grain's boundaries; None: open) as the fewest rollup spans: the
    coarsest grain's whole buckets in the middle, finer ones towards the ends."""
    for grain in reversed(grains):
        w = BUCKET_MICROS[grain]
        a = None if lo is None else -(-lo // w) * w
        b = None if hi is None else hi // w * w
        if a is None or b is None or a < b:
            left = _tile(lo, a, grains) if lo is not None and a is not None and lo < a else ()
            right = _tile(b, hi, grains) if hi is not None and b is not None and b < hi else ()
            return (*left, (grain, a, b), *right)
    return ()


def _span_conds(params: sql.Params, tenant: str, span: Span) -> list[str]:
    grain, since, until = span
    conds = [f"tenant = {params(tenant)}", f"grain = {params(grain)}"]
    if since is not None:
        conds.append(f"bucket >= {params(since)}")
    if until is not None:
        conds.append(f"bucket < {params(until)}")
    return conds


def read_sql(
    d: sql.Dialect, tenant: str, p: Plan, keys: Sequence[str] | None = None
) -> tuple[str, list[Any]]:
    """Rollup rows of the plan: dimension "" (overall, buckets) and the group dimension (not
    `USER_DIM`'s: `group_sql` sums those), only its `keys` (encoded) when given (`chosen`)."""
    params = sql.Params(d)
    cols = ", ".join(c for c in COLUMNS[2:])
    selects = []
    for span in p.spans:
        conds = [
            *_span_conds(params, tenant, span),
            f"dim = {params(p.where[0])}",
            f"key = {params(p.where[1])}",
        ]
        selects.append(f"SELECT {cols} FROM rollups WHERE {' AND '.join(conds)}")
    if p.dim is not None and p.dim != USER_DIM and (keys is None or keys):
        for span in p.group_spans:
            conds = [*_span_conds(params, tenant, span), f"dim = {params(p.dim)}"]
            if keys is not None:
                conds.append(f"key IN ({', '.join(params(k) for k in keys)})")
            selects.append(f"SELECT {cols} FROM rollups WHERE {' AND '.join(conds)}")
    return " UNION ALL ".join(selects), params.values


def top_sql(d: sql.Dialect, tenant: str, p: Plan) -> tuple[str, list[Any]]:
    """The `MAX_GROUPS` keys (encoded) of the group dimension with the most requests in the
    plan's range, counted by the database from the rollup rows and the raw rows of the edges.

    Why: a dimension with a value per request (a rolled-up request id) has as many rollup rows
    as requests, and reading them all with their sketches to keep 100 took seconds and hundreds
    of MB; the counts alone are narrow, and then only the listed keys' rows are read (`read_sql`).
    Ordered as `answer` orders groups: a status's digits by length first (numeric order), NULL
    (`""`) last."""
    params = sql.Params(d)
    assert p.dim is not None
    selects = []
    for span in p.group_spans:
        conds = [*_span_conds(params, tenant, span), f"dim = {params(p.dim)}"]
        selects.append(f"SELECT key, count AS n FROM rollups WHERE {' AND '.join(conds)}")
    for a, b in p.edges:
        g = sql.group_key(params, p.dim)
        where = sql.where_sql(params, tenant, ListQuery(), from_micros(a), from_micros(b))
        key = "CASE WHEN g IS NULL THEN '' ELSE '=' || CAST(g AS TEXT) END"
        if d.name == "postgresql":  # ordered bytewise, as the rollups' keys
            key = f'({key}) COLLATE "C"'
        rows = f"SELECT {g} AS g FROM requests r WHERE {where}"
        selects.append(f"SELECT {key} AS key, count(*) AS n FROM ({rows}) AS e GROUP BY g")
    union = " UNION ALL ".join(selects)
    by_key = "length(key), key" if p.dim == "status" else "key"
    return (
        f"SELECT key FROM ({union}) AS t GROUP BY key HAVING sum(n) > 0"
        f" ORDER BY sum(n) DESC, key = '', {by_key} LIMIT {params(MAX_GROUPS)}",
        params.values,
    )


def _rank(item: tuple[int, Any]) -> tuple[int, bool, Any]:
    """`answer`'s order of groups: largest first, then by key (code-point order is the stores'
    bytewise UTF-8 order), NULL last."""
    n, value = item
    return (-n, value is None, "" if value is None else value)


def grouped(p: Plan) -> bool:
    """Whether the plan's groups are rollup keys to choose from (`top_sql`)."""
    return p.dim is not None and p.dim != USER_DIM


def listed(top: Sequence[Sequence[Any]]) -> list[str] | None:
    """The keys of `top_sql` an answer lists, or None: the top holds every key (fewer than
    `MAX_GROUPS`), all are read."""
    return [row[0] for row in top] if len(top) >= MAX_GROUPS else None


def edge_reads(d: sql.Dialect, tenant: str, q: StatsQuery, p: Plan) -> list[tuple[str, str, list[Any]]]:
    """(kind, SQL, params) that read the plan's edges as the raw path reads a range: the totals
    summed by the database (overall, per group, per bucket; kinds of `sql.aggregate_sql`) and
    one scan of the latencies ("values", `sql.values_sql`); `Edges.add` takes each answer. Per
    row that costs what the raw path pays, for a minute (an hour) at each end instead of all."""
    out: list[tuple[str, str, list[Any]]] = []
    for a, b in p.edges:
        e = StatsQuery(
            since=from_micros(a),
            until=from_micros(b),
            group_by=q.group_by,
            bucket=q.bucket,
            filters=p.filters,
        )
        kinds: list[sql.Kind] = ["overall"]
        kinds += ["group"] if p.dim not in (None, USER_DIM) else []  # users: `group_sql`
        kinds += ["bucket"] if q.bucket else []
        for kind in kinds:
            out.append((kind, *sql.aggregate_sql(d, tenant, e, kind, percentiles=False)))
        out.append(("values", *sql.values_sql(d, tenant, e)))
    return out


@dataclass(slots=True)
class Edges:
    """The raw rows at a plan's ends in `answer`'s terms: cells overall, by the API's group value
    and by bucket start (microseconds)."""

    overall: Cell = field(default_factory=Cell)
    groups: dict[Any, Cell] = field(default_factory=dict)
    buckets: dict[int, Cell] = field(default_factory=dict)

    def add(self, d: sql.Dialect, q: StatsQuery, kind: str, rows: Iterable[Sequence[Any]]) -> None:
        """One answer of `edge_reads` (its `kind`)."""
        if kind == "values":
            self._add_values(d, q, rows)
            return
        n = len(_SUM_NAMES)
        for row in rows:
            cell = Cell(
                count=int(row[1]),
                error_count=int(row[2]),
                sums=[int(v) for v in row[3 : 3 + n]],
                cost_nanos=int(row[3 + n]),
                first_at=None if row[4 + n] is None else d.ts_value(row[4 + n]),
                last_at=None if row[5 + n] is None else d.ts_value(row[5 + n]),
                unpriced_count=int(row[6 + n]),
            )
            if kind == "overall":
                if cell.count:
                    self.overall.merge(cell)
            elif kind == "group":
                _merge(self.groups, sql.group_value(d, q.group_by or "", row[0]), cell)
            else:
                _merge(self.buckets, d.ts_value(row[0]), cell)

    def _add_values(self, d: sql.Dialect, q: StatsQuery, rows: Iterable[Sequence[Any]]) -> None:
        # Values gathered per (group, bucket) as the raw path gathers them, then binned a list at
        # a time (`Sketch.add_all`): a sort and a key per bin, not a key per value.
        lat: dict[tuple[Any, Any], list[float]] = {}
        first: dict[tuple[Any, Any], list[float]] = {}
        for g, b, latency, ttft in rows:
            k = (g, b)
            acc = lat.get(k)
            if acc is None:
                acc = lat[k] = []
                first[k] = []
            acc.append(latency)
            if ttft is not None:
                first[k].append(ttft)
        for k, values in lat.items():
            g, b = k
            cells = [self.overall]
            if q.group_by:
                cells.append(self.groups.setdefault(sql.group_value(d, q.group_by, g), Cell()))
            if q.bucket:
                cells.append(self.buckets.setdefault(d.ts_value(b), Cell()))
            latency, ttft = Sketch(), Sketch()
            latency.add_all([float(v) for v in values])
            ttft.add_all([float(v) for v in first[k]])
            for cell in cells:
                cell.latency.merge(latency)
                cell.ttft.merge(ttft)


def _summed(d: sql.Dialect) -> str:
    """The `USER_DIM` rows' columns summed (tokens and cost as `Dialect.add_up`: SQLite's `sum`
    of integers fails past 2^63, a 503 for good), first and last, no sketches."""
    cols = [d.add_up(c) if c in _SUM_NAMES or c == "cost_nanos" else f"sum({c})" for c in COLUMNS[5:-4]]
    return ", ".join([*cols, "min(first_at)", "max(last_at)", "NULL", "NULL"])


#: Longest key (bytes) the PostgreSQL index `rollups_users` holds (see its migration).
USERS_INDEX_MAX_KEY = 1024


Part = tuple[str, int | None, int | None, int]


def user_parts(since: int | None, until: int | None, subtract: bool) -> list[Part]:
    """(grain, from, to, sign) of the `USER_DIM` rows whose signed sum is the range [since,
    until) (whole UTC days; None: open): whole months from month rows, a partial month from its
    day rows or, with `subtract` and when fewer, its month row less the days outside the range
    (sums subtract exactly; first and last times do not, see `user_groups`)."""
    day = BUCKET_MICROS[_DAY]

    def partial(m: int, lo: int, hi: int) -> list[Part]:
        """[lo, hi) within month m (not all of it)."""
        end = _next_month(m)
        inside, outside = (hi - lo) // day, (end - m - (hi - lo)) // day
        if subtract and outside < inside:
            out: list[Part] = [(_MONTH, m, end, 1)]
            if lo > m:
                out.append((_DAY, m, lo, -1))
            if hi < end:
                out.append((_DAY, hi, end, -1))
            return out
        return [(_DAY, lo, hi, 1)]

    parts: list[Part] = []
    first = None if since is None else month_start(since)
    if first is not None and since != first:  # a head inside a month
        assert since is not None
        end = _next_month(first)
        if until is not None and until <= end:
            return partial(first, since, until)
        if until is None and subtract and (since - first) < (end - since):
            return [(_MONTH, first, None, 1), (_DAY, first, since, -1)]
        parts += partial(first, since, end)
        first = end
    if until is None:
        return [*parts, (_MONTH, first, None, 1)]
    last = month_start(until)
    if first is None or first < last:
        parts.append((_MONTH, first, last, 1))
    if until != last:
        parts += partial(last, max(last, since or last), until)
    # An empty range on a month's first instant has no part: one that reads nothing, not `FROM ()`.
    return parts or [(_DAY, until, until, 1)]


def _user_sums(
    params: sql.Params,
    tenant: str,
    since: int | None,
    until: int | None,
    *,
    named: bool = False,
    subtract: bool = False,
    edges: Sequence[tuple[int, int]] = (),
) -> str:
    """`SELECT key, <the columns of Cell.from_row>` of the `USER_DIM` rows of a range, summed
    per user (`named`: not the NULL user), from the parts of `user_parts`, and the raw rows
    of the `edges` (ranges off whole days) summed alike (`_raw_user_sums`).

    Read through the partial indexes `rollups_users` (day rows) and `rollups_user_months`, which
    hold these rows' values in (tenant, bucket) order, so no other rollup row is read. Grain,
    dimension and the key-length bound are literals: that is what lets the planners (SQLite's,
    PostgreSQL's generic plans) prove an index's condition. SQLite's planner, which has no
    statistics, prefers the primary key (three equalities) and is told. PostgreSQL's indexes
    hold keys up to `USERS_INDEX_MAX_KEY` bytes (an entry is limited to ~2.7 KB); the rare
    longer ones are read through `rollups_users_long` / `rollups_user_months_long`.
    """
    values = COLUMNS[5:-4]
    selects = []
    # No whole day (`Plan.user_days` empty): the edges hold the range, if it has any.
    parts = [] if edges and since is not None and since == until else user_parts(since, until, subtract)
    for grain, lo, hi, sign in parts:
        conds = [f"tenant = {params(tenant)}", f"grain = '{grain}'", f"dim = '{USER_DIM}'"]
        if named:
            conds.append(f"key <> {params('')}")
        if lo is not None:
            conds.append(f"bucket >= {params(lo)}")
        if hi is not None:
            conds.append(f"bucket < {params(hi)}")
        where = " AND ".join(conds)
        cols = ", ".join(
            ["key", *(values if sign > 0 else [f"-{c} AS {c}" for c in values])]
            + (["first_at", "last_at"] if sign > 0 else ["NULL AS first_at", "NULL AS last_at"])
        )
        if params.dialect.hashed is None:
            index = "rollups_users" if grain == _DAY else "rollups_user_months"
            selects.append(f"SELECT {cols} FROM rollups INDEXED BY {index} WHERE {where}")
        else:
            n = USERS_INDEX_MAX_KEY
            rows = f"SELECT {cols} FROM rollups WHERE {where}"
            short, long = f"{rows} AND octet_length(key) <= {n}", f"{rows} AND octet_length(key) > {n}"
            selects.append(f"{short} UNION ALL {long}")
    selects += [_raw_user_sums(params, tenant, a, b) for a, b in edges]
    union = " UNION ALL ".join(selects)
    return f"SELECT key, {_summed(params.dialect)} FROM ({union}) AS u GROUP BY key HAVING sum(count) > 0"


def _raw_user_sums(params: sql.Params, tenant: str, since: int, until: int) -> str:
    """The `_user_sums` columns of the raw rows of [since, until), per user: what
    `contributions` adds to a user's day (first and last times are read later, exactly)."""
    d = params.dialect
    key = "CASE WHEN r.user_id IS NULL THEN '' ELSE '=' || r.user_id END"
    if d.name == "postgresql":  # ordered bytewise, as the rollups' keys
        key = f'({key}) COLLATE "C"'
    cols = [
        f"{key} AS key",
        "count(*) AS count",
        f"coalesce(sum(CASE WHEN {sql.ERROR} THEN 1 ELSE 0 END), 0) AS error_count",
        *(f"{d.add_up(f'r.{c}')} AS {c}" for c in (*_SUM_NAMES, "cost_nanos")),
        "coalesce(sum(CASE WHEN r.cost_nanos IS NULL THEN 1 ELSE 0 END), 0) AS unpriced_count",
        "NULL AS first_at",
        "NULL AS last_at",
    ]
    where = sql.where_sql(params, tenant, ListQuery(), from_micros(since), from_micros(until))
    return f"SELECT {', '.join(cols)} FROM requests r WHERE {where} GROUP BY r.user_id"


def group_sql(d: sql.Dialect, tenant: str, p: Plan) -> tuple[str, list[Any]]:
    """The `MAX_GROUPS` largest users of a `USER_DIM` plan, summed by the database (a 30-day
    range of thousands of users is hundreds of thousands of rows: too many to merge in Python):
    the whole days from the user rows, the partial days at the ends (an API client's "the last
    30 days" to the second) from raw rows. Order as the raw path's: largest first, then by key
    (bytewise, `"="` + value), NULL last."""
    params = sql.Params(d)
    lo, hi = p.user_days
    q = _user_sums(params, tenant, lo, hi, subtract=True, edges=p.user_edges)
    return f"{q} ORDER BY sum(count) DESC, key = '', key LIMIT {params(MAX_GROUPS)}", params.values


def users_start(covered_since: dict[str, int]) -> int | None:
    """The first day the `USER_DIM` rows hold whole (None: none). Of the day coverage began in,
    the requests stored before were never added, and retention subtracts them all the same."""
    since = covered_since.get(USER_DIM)
    if since is None:
        return None
    day = BUCKET_MICROS[_DAY]
    return -(-since // day) * day


def users_older_sql(d: sql.Dialect, tenant: str, start: int) -> tuple[str, list[Any]]:
    """Whether the tenant has requests before `start` (`users_start`, > 0). `GET /api/v1/users`
    is all-time: the user rows answer it once there are none (after an upgrade, once retention
    has removed them)."""
    p = sql.Params(d)
    cond = f"r.tenant = {p(tenant)} AND r.created_at < {p(d.ts_param(start))}"
    return f"SELECT EXISTS (SELECT 1 FROM requests r WHERE {cond})", p.values


def users_sql(
    d: sql.Dialect,
    tenant: str,
    limit: int,
    start: int = 0,
    after: tuple[int, str] | None = None,
    sort: str = "time",
) -> tuple[str, list[Any]]:
    """`GET /api/v1/users` from the `USER_DIM` rows from day `start` on: users (not NULL) most
    recently active first or highest cost first, as the raw path (`sql.aggregate_sql`) orders
    them, after `after` (a page's last)."""
    params = sql.Params(d)
    q = _user_sums(params, tenant, start or None, None, named=True)
    by = d.add_up("cost_nanos") if sort == "cost" else "max(last_at)"
    if after is not None:
        last, key = params(after[0]), params(encode_key(after[1]))
        q += f" AND ({by} < {last} OR ({by} = {last} AND key > {key}))"
    return f"{q} ORDER BY {by} DESC, key LIMIT {params(limit)}", params.values


def user_result(row: Sequence[Any]) -> UserTotals:
    """One row of `users_sql` in the shape of `sql.user_result` (the raw path's)."""
    cell = Cell.from_row(row[1:])
    totals = cell.totals()
    del totals["latency_ms"], totals["time_to_first_token_ms"]
    return UserTotals({"user_id": decode_key(USER_DIM, row[0]), **totals}, cell.cost_nanos)


def user_groups(
    rows: Iterable[Sequence[Any]], values: Iterable[Sequence[Any]], ts: Callable[[Any], int]
) -> list[dict[str, Any]]:
    """`stats` groups from the rows of `group_sql`, with exact percentiles and first and last
    times from the raw rows of those users (`sql.keyed_values_sql`: user, latency_ms, ttft_ms,
    created_at as the store reads it, `ts` making it microseconds): a month row less some days
    has the month's first and last times, not the range's."""
    acc: dict[Any, tuple[list[float], list[float], list[int]]] = {}
    for key, lat, ttft, created in values:
        lats, ttfts, times = acc.setdefault(key, ([], [], []))
        lats.append(lat)
        if ttft is not None:
            ttfts.append(ttft)
        times.append(ts(created))
    out = []
    for row in rows:
        key = decode_key(USER_DIM, row[0])
        totals = Cell.from_row(row[1:]).totals()
        lats, ttfts, times = acc.get(key, ([], [], []))
        totals["latency_ms"] = sql.percentiles_of(lats)
        totals["time_to_first_token_ms"] = sql.percentiles_of(ttfts)
        if times:
            totals["first_at"], totals["last_at"] = iso(min(times)), iso(max(times))
        out.append({"key": key, **totals})
    return out


def answer(
    q: StatsQuery,
    p: Plan,
    rows: Iterable[Sequence[Any]],
    groups_of_users: list[dict[str, Any]] | None = None,
    edges: Edges | None = None,
    keys: Sequence[str] | None = None,
) -> dict[str, Any]:
    """`stats` from the rollup rows of `read_sql` (bucket, dim, key, then the values) and the
    plan's `Edges`; for a `USER_DIM` plan, its groups are `user_groups`'. `keys`: the groups
    `chosen` (None: all)."""
    overall = Cell()
    groups: dict[Any, Cell] = {}
    buckets: dict[int, Cell] = {}
    width = BUCKET_MICROS[q.bucket] if q.bucket else 0

    def add(bucket: int, dim: str, key: str, cell: Cell) -> None:
        if (dim, key) == p.where:
            overall.merge(cell)
            if width:
                _merge(buckets, bucket // width * width, cell)
        elif dim == p.dim:
            _merge(groups, decode_key(dim, key), cell)

    for row in rows:
        add(int(row[0]), row[1], row[2], Cell.from_row(row[3:]))
    if edges is not None:
        overall.merge(edges.overall)
        listed = None if keys is None else {decode_key(p.dim or "", k) for k in keys}
        for k, cell in edges.groups.items():
            if listed is None or k in listed:
                _merge(groups, k, cell)
        for b, cell in edges.buckets.items():
            _merge(buckets, b // width * width, cell)
    result: dict[str, Any] = {"overall": overall.totals() if overall.count else sql.empty_totals()}
    ordered = sorted(groups.items(), key=lambda kv: _rank((kv[1].count, kv[0])))
    result["groups"] = [{"key": k, **c.totals()} for k, c in ordered[:MAX_GROUPS] if c.count]
    if p.one_group and overall.count:
        result["groups"] = [{"key": decode_key(p.where[0], p.where[1]), **result["overall"]}]
    if p.dim == USER_DIM:
        result["groups"] = groups_of_users or []
    result["buckets"] = [{"start": iso(b), **buckets[b].totals()} for b in sorted(buckets)[:MAX_BUCKETS]]
    result["source"] = "rollups"
    result["percentile_relative_error"] = RELATIVE_ACCURACY
    return result


def _merge(into: dict[Any, Cell], k: Any, cell: Cell) -> None:
    acc = into.get(k)
    if acc is None:
        into[k] = cell  # each cell is merged into at most one: taken, not copied
    else:
        acc.merge(cell)


RAW_SOURCE = {"source": "raw", "percentile_relative_error": 0.0}


def recompute_sql(d: sql.Dialect, key: RollupKey) -> tuple[str, list[Any]]:
    """min and max `created_at` of the raw rows a rollup row covers (after retention)."""
    tenant, grain, bucket, dim, k = key
    p = sql.Params(d)
    conds = [
        f"r.tenant = {p(tenant)}",
        f"r.created_at >= {p(d.ts_param(bucket))}",
        f"r.created_at < {p(d.ts_param(bucket_end(grain, bucket)))}",
    ]
    if dim:
        expr = sql.group_key(p, dim)
        value = decode_key(dim, k)
        if value is None:
            conds.append(f"({expr}) IS NULL")
        elif dim in sql.HASH_INDEXED:  # through the index (by hash on PostgreSQL)
            conds.append(sql.equals(d, expr, p(value)))
        else:
            conds.append(f"({expr}) = {p(value)}")
    where = " AND ".join(conds)
    return f"SELECT min(r.created_at), max(r.created_at) FROM requests r WHERE {where}", p.values


def retention_deltas(
    rows: Iterable[Sequence[Any]], props: Sequence[str], ts: Callable[[Any], int]
) -> dict[RollupKey, Cell]:
    """Negative contributions of deleted rows (`SOURCE_COLUMNS`, created_at as the store reads it)."""
    srcs = []
    for row in rows:
        src = list(row)
        src[1] = ts(src[1])
        srcs.append(src)
    return contributions(srcs, props, sign=-1)
