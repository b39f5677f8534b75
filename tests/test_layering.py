"""Who may import whom: the server speaks the store's interface and query vocabulary, no SQL.

Read from the source (the AST of every module), so a function-level import counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import llmtap

SRC = Path(llmtap.__file__).parent
#: The only `llmtap.store` modules the server may import: the interface and the vocabulary.
SERVER_MAY_IMPORT = {"llmtap.store", "llmtap.store.base", "llmtap.store.query"}


def imported_modules(source: str, package: str) -> set[str]:
    """Every name the module imports: `from a import b` gives `a` and `a.b`."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def store_modules(names: set[str]) -> set[str]:
    """The `llmtap.store` modules among `names` (attributes like `llmtap.store.base.Store` dropped)."""
    modules = {p.stem for p in (SRC / "store").glob("*.py")} | {"migrations"}
    out = set()
    for name in names:
        parts = name.split(".")
        if parts[:2] == ["llmtap", "store"]:
            sub = parts[2] if len(parts) > 2 and parts[2] in modules else None
            out.add("llmtap.store" if sub is None else f"llmtap.store.{sub}")
    return out


def test_the_server_imports_no_sql_module() -> None:
    server = sorted((SRC / "server").rglob("*.py"))
    assert len(server) >= 5  # the walk found the package
    for path in server:
        package = ".".join(path.relative_to(SRC.parent).parts[:-1])
        used = store_modules(imported_modules(path.read_text(), package))
        assert used <= SERVER_MAY_IMPORT, f"{path.name} imports {sorted(used - SERVER_MAY_IMPORT)}"


def test_the_walk_sees_each_way_of_importing() -> None:
    """The checker itself: plain, from-, function-level and relative imports are all seen."""
    source = (
        "import llmtap.store.sqlite\n"
        "from llmtap.store import sql\n"
        "def f():\n    from llmtap.store.postgres import PostgresStore\n"
        "from ..store import rollup\n"
        "from llmtap.store.base import Store\n"
    )
    found = store_modules(imported_modules(source, "llmtap.server"))
    assert found == {
        "llmtap.store",
        "llmtap.store.sqlite",
        "llmtap.store.sql",
        "llmtap.store.postgres",
        "llmtap.store.rollup",
        "llmtap.store.base",
    }
