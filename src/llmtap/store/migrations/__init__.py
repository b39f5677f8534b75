"""Schema migrations, versioned and forward-only: one `.sql` file per version and database.

`sqlite/0003_lowercase_properties.sql` is SQLite's version 3. A file's first line is
`-- <description>` (recorded by PostgreSQL in `llmtap_migrations`); full-line `--` comments
are notes for readers and are dropped when loading, so SQLite's statement split on `;` never
sees them. Append new versions; never edit an applied one. Version numbers are unique but may
have gaps: two branches can add migrations at once (one takes 9, the other 10) and land in either
order, because each database records *which* versions it applied (`llmtap_migrations`, in both
stores), not only the highest, so a version that lands after a higher one is still applied.
Every migration is plain SQL; the
steps that need Python (PostgreSQL's monthly partitions, the rollup coverage of a new
property) are the stores' own, at connect and on write.

Both schemas have the same columns. PostgreSQL differences:

- `requests` and `request_properties` are range-partitioned by `created_at` (one partition per
  month, created on demand by the writer) so that list queries on recent data touch small indexes
  and retention drops whole partitions instead of deleting rows one by one.
- A unique index on a partitioned table must include the partition key, so `(tenant, id)`
  uniqueness — one row per request id — lives in the small unpartitioned `request_keys` table;
  the writer inserts there first and only rows whose key was new reach `requests`.
- Text columns that are sorted or grouped use the "C" collation so ordering is bytewise, exactly
  as SQLite's BINARY collation (the two stores must give the same answers).
- Since version 2, client-chosen text (request id, user and session id, model, property names
  and values) is indexed by `llmtap_hash(value)`, never by the value itself: a B-tree entry is
  limited to ~2.7 KB, and a longer value failed the insert, sending its record to the dead-letter
  queue for good. Queries compare the hash (index) *and* the value (exactness). SQLite has no
  such limit (long keys overflow to other pages), so its indexes keep the values.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib.resources import files

from llmtap.errors import ConfigError

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def load(database: str) -> list[tuple[int, str, str]]:
    """`(version, description, sql)` of every migration of `database` (`sqlite`, `postgres`)."""
    found: list[tuple[int, str, str]] = []
    for entry in files(__name__).joinpath(database).iterdir():
        m = _NAME.match(entry.name)
        if m is None:
            continue
        text = entry.read_text("utf-8")
        first, _, _ = text.partition("\n")
        if not first.startswith("-- "):
            raise ValueError(f"migration {database}/{entry.name} does not start with '-- <description>'")
        sql = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
        found.append((int(m[1]), first[3:].strip(), sql.strip() + "\n"))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise ValueError(f"{database} migrations need unique versions from 1 up: {versions}")
    return found


POSTGRES = load("postgres")
SQLITE = load("sqlite")


def refuse_newer(migrations: list[tuple[int, str, str]], applied: Iterable[int], where: str) -> None:
    """Stop before touching a store a newer llmtap migrated: this code would write rows without
    what the newer schema keeps for them (rollups, search), and the newer code, back again,
    would give stats that no longer add up."""
    known = {v for v, _, _ in migrations}
    unknown = sorted(set(applied) - known)
    if unknown:
        raise ConfigError(
            f"invalid setting LLMTAP_STORE: the store at {where} was migrated by a newer llmtap"
            f" (schema version {', '.join(map(str, unknown[:5]))}; this llmtap knows up to {max(known)}):"
            " upgrade llmtap here too, or point LLMTAP_STORE at another store"
        )
