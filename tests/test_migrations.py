"""Migration numbering with gaps: two branches add versions at once (one takes 9, the other 10)
and land in either order; a database that already has the higher one still gets the lower one."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from llmtap.store import migrations
from store_helpers import pg_database, pg_url

GAP_A = "CREATE TABLE gap_a (x integer)"
GAP_B = "CREATE TABLE gap_b (x integer)"


def test_versions_may_have_gaps_but_not_repeats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [v for v, _, _ in migrations.SQLITE] == sorted({v for v, _, _ in migrations.SQLITE})
    root = tmp_path / "pkg"
    for name, body in (("0001_a.sql", "-- a\nSELECT 1"), ("0003_c.sql", "-- c\nSELECT 3")):
        (root / "db").mkdir(parents=True, exist_ok=True)
        (root / "db" / name).write_text(body)
    monkeypatch.setattr(migrations, "files", lambda _name: root)
    assert [v for v, _, _ in migrations.load("db")] == [1, 3]
    (root / "db" / "0003_d.sql").write_text("-- d\nSELECT 4")
    with pytest.raises(ValueError, match="unique versions"):
        migrations.load("db")


async def test_sqlite_applies_a_lower_version_that_lands_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmtap.store.sqlite as lite

    top = lite.MIGRATIONS[-1][0]
    path = tmp_path / "gap.db"
    monkeypatch.setattr(lite, "MIGRATIONS", [*lite.MIGRATIONS, (top + 2, "b", GAP_B)])
    store = lite.SQLiteStore(path)
    await store.connect()
    await store.close()
    later = [*lite.MIGRATIONS[:-1], (top + 1, "a", GAP_A), (top + 2, "b", GAP_B)]
    monkeypatch.setattr(lite, "MIGRATIONS", later)
    store = lite.SQLiteStore(path)
    await store.connect()  # applies top + 1 only: top + 2 ran already
    await store.close()
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"gap_a", "gap_b"} <= tables
        versions = [r[0] for r in db.execute("SELECT version FROM llmtap_migrations ORDER BY 1")]
        assert versions == [v for v, _, _ in lite.MIGRATIONS]
        assert db.execute("PRAGMA user_version").fetchone()[0] == top + 2


async def test_sqlite_file_from_before_the_version_table_keeps_its_versions(tmp_path: Path) -> None:
    """A file migrated by `user_version` alone (no `llmtap_migrations` yet) is not migrated twice."""
    import llmtap.store.sqlite as lite

    path = tmp_path / "old.db"
    store = lite.SQLiteStore(path)
    await store.connect()
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE llmtap_migrations")
    store = lite.SQLiteStore(path)
    await store.connect()  # would fail re-running version 1's CREATE TABLE
    await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM llmtap_migrations").fetchone()[0] == len(lite.MIGRATIONS)


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_applies_a_lower_version_that_lands_later(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncpg

    import llmtap.store.postgres as pg

    top = pg.MIGRATIONS[-1][0]
    async with pg_database() as url:
        monkeypatch.setattr(pg, "MIGRATIONS", [*pg.MIGRATIONS, (top + 2, "b", GAP_B)])
        store = pg.PostgresStore(url)
        await store.connect()
        await store.close()
        later = [*pg.MIGRATIONS[:-1], (top + 1, "a", GAP_A), (top + 2, "b", GAP_B)]
        monkeypatch.setattr(pg, "MIGRATIONS", later)
        store = pg.PostgresStore(url)
        await store.connect()
        await store.close()
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT to_regclass('gap_a') IS NOT NULL")
            versions = [r[0] for r in await conn.fetch("SELECT version FROM llmtap_migrations ORDER BY 1")]
            assert versions == [v for v, _, _ in pg.MIGRATIONS]
        finally:
            await conn.close()


def _mark_newer(db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        top = db.execute("SELECT max(version) FROM llmtap_migrations").fetchone()[0]
        db.execute(
            "INSERT INTO llmtap_migrations (version, description, applied_at) VALUES (?, 'newer', 0)",
            (top + 1,),
        )


async def test_a_store_a_newer_llmtap_migrated_stops_start_up_with_one_sentence(tmp_path: Path) -> None:
    """An older llmtap on newer data wrote rows without the newer schema's rollups and search,
    and the newer one, back again, gave stats that did not add up: it must not start there."""
    import subprocess
    import sys

    import llmtap.store.sqlite as lite
    from procs import llmtap_env

    env = llmtap_env(tmp_path / "data")
    store = lite.SQLiteStore(tmp_path / "data" / "store.db")
    await store.connect()
    await store.close()
    _mark_newer(tmp_path / "data" / "store.db")
    for command in ("worker", "server", "up"):
        r = subprocess.run(
            [sys.executable, "-m", "llmtap.cli", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2, (command, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, (command, r.stderr)
        assert lines[0].startswith("llmtap: invalid setting LLMTAP_STORE: the store at"), lines
        assert f"schema version {lite.MIGRATIONS[-1][0] + 1}; this llmtap knows up to" in lines[0], lines
    with sqlite3.connect(tmp_path / "data" / "store.db") as db:
        assert db.execute("SELECT count(*) FROM requests").fetchone()[0] == 0


@pytest.mark.postgres
@pytest.mark.skipif(pg_url() is None, reason="LLMTAP_TEST_POSTGRES_URL is not set")
async def test_postgres_a_newer_llmtap_migrated_is_refused() -> None:
    import asyncpg

    import llmtap.store.postgres as pg
    from llmtap.errors import ConfigError

    async with pg_database() as url:
        store = pg.PostgresStore(url)
        await store.connect()
        await store.close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "INSERT INTO llmtap_migrations (version, description) VALUES ($1, 'newer')",
                pg.MIGRATIONS[-1][0] + 7,
            )
        finally:
            await conn.close()
        with pytest.raises(
            ConfigError, match=r"migrated by a newer llmtap \(schema version \d+; this llmtap"
        ):
            await pg.PostgresStore(url).connect()
