-- request_text: FTS5 trigram index of the searchable text of bodies
--
-- Searchable text of bodies (llmtap.store.search), case-folded at write: a trigram index.
-- case_sensitive 1: folding is done once, in Python, the same way for both stores.
-- detail none: ~30% cheaper to write, and GLOB, which the index answers, re-checks each
-- candidate's text. A document is tied to its request through `request_search.docid`, an
-- INTEGER PRIMARY KEY (VACUUM keeps those, it may renumber the implicit rowids of `requests`).

CREATE TABLE request_search (
    docid   INTEGER PRIMARY KEY,
    tenant  TEXT NOT NULL,
    id      TEXT NOT NULL,
    UNIQUE (tenant, id)
);
CREATE VIRTUAL TABLE request_text USING fts5(text, tokenize = 'trigram case_sensitive 1', detail = none)
