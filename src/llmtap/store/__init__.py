"""Analytics stores (SQLite, PostgreSQL), all behind one interface (`base.Store`)."""

from llmtap.store.base import ApiKey, ListQuery, Page, StatsQuery, Store, open_store

__all__ = ["ApiKey", "ListQuery", "Page", "StatsQuery", "Store", "open_store"]
