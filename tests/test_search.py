"""`q=` search over request/response text on both stores: case-insensitive substrings in any
script, through the body handler (inline bodies and bodies already in the body store), LIKE
metacharacters taken literally, the 32 KiB bound (shared by request and response), retention and
the API parameter."""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard

from llmtap.bodies.file import FileBodyStore
from llmtap.handlers.base import Item
from llmtap.handlers.bodies import BodyHandler
from llmtap.record import Body, LogRecord
from llmtap.store import sql
from llmtap.store.base import ListQuery, Store
from llmtap.store.search import SEARCH_BYTES
from store_helpers import T0, open_store, rec, store_params


def jbody(obj: Any, *, ascii_only: bool = False, zstd: bool = True) -> Body:
    raw = json.dumps(obj, ensure_ascii=ascii_only).encode()
    data = zstandard.ZstdCompressor().compress(raw) if zstd else raw
    return Body(
        content_type="application/json", size=len(raw), encoding="zstd" if zstd else "identity", data=data
    )


def sse(*pieces: str) -> Body:
    lines = [
        b"data: " + json.dumps({"id": "c1", "choices": [{"delta": {"content": p}}]}).encode() + b"\n\n"
        for p in pieces
    ]
    raw = b"".join(lines) + b"data: [DONE]\n\n"
    return Body(content_type="text/event-stream", size=len(raw), encoding="identity", data=raw)


def chat(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


def corpus() -> dict[str, LogRecord]:
    """Records by name; each name's text is known here, not computed by the code under test."""
    at = T0 - timedelta(hours=1)
    out = {
        "german": rec(1, id="german", at=at, request_body=jbody(chat("Grüße aus MÜNCHEN"))),
        "japanese": rec(2, id="japanese", at=at, request_body=jbody(chat("日本語テキスト"), ascii_only=True)),
        "russian": rec(3, id="russian", at=at, response_body=jbody({"c": "ПРИВЕТ, мир"}, zstd=False)),
        "stream": rec(4, id="stream", at=at, streamed=True, response_events=sse("The qu", "ick br", "own")),
        "meta": rec(5, id="meta", at=at, request_body=jbody(chat('50% off_sale "quoted" \\ back [a]*?'))),
        "long": rec(
            6, id="long", at=at,
            request_body=jbody(chat("x" * SEARCH_BYTES + " needle-beyond-the-bound " + "z" * SEARCH_BYTES)),
        ),
        "nobody": rec(7, id="nobody", at=at, request_body=None, response_body=None),
        # a conversation longer than the bound, resent whole, and its answer
        "resent": rec(
            11, id="resent", at=at,
            request_body=jbody(chat("opening words " + "y" * SEARCH_BYTES + " latest-question")),
            response_body=jbody({"choices": [{"message": {"content": "the answer-needle"}}]}),
        ),
    }  # fmt: skip
    for r in out.values():
        if r.id != "nobody" and (r.request_body is None or r.request_body.data is None):
            r.request_body = jbody(chat("plain"))
        if r.response_body is not None and r.response_body.data is None:
            r.response_body = None
    return out


CASES = [
    ("münchen", {"german"}),
    ("GRÜSSE", {"german"}),  # casefold: ß ~ ss
    ("テキスト", {"japanese"}),  # sent as \\u escapes, found as text
    ("привет", {"russian"}),
    ("quick brown", {"stream"}),  # across stream events
    ("50% off_", {"meta"}),  # LIKE metacharacters are literal
    ('"quoted"', {"meta"}),  # FTS5 phrase quotes are literal
    ("\\ b", {"meta"}),
    ("%", {"meta"}),
    ("[a]*?", {"meta"}),  # GLOB metacharacters are literal
    ("a]*", {"meta"}),
    ("*", {"meta"}),
    ("ми", {"russian"}),  # shorter than a trigram
    ("needle-beyond", set()),  # in the middle of a request past the 32 KiB bound
    ("xxxx", {"long"}),  # its start
    ("zzzz", {"long"}),  # and its end
    ("answer-needle", {"resent"}),  # a long request does not crowd out the answer
    ("opening words", {"resent"}),
    ("latest-question", {"resent"}),  # a request cut keeps its end: the question just asked
    ("plain", {"russian", "stream"}),
    ("nowhere at all", set()),
]


async def search(store: Store, q: str) -> set[str]:
    ids: set[str] = set()
    cursor = None
    while True:
        page = await store.list_requests("acme", ListQuery(q=q, limit=2, cursor=cursor))
        ids |= {x["id"] for x in page.items}
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


@pytest.mark.parametrize("kind", store_params())
async def test_search_bodies(kind: str, tmp_path: Path) -> None:
    records = corpus()
    bodies = FileBodyStore(str(tmp_path / "bodies"))
    await bodies.connect()
    try:
        # A large body the gateway already put in the body store: only its ref travels.
        big = rec(8, id="stored", at=T0 - timedelta(hours=1))
        raw = zstandard.ZstdCompressor().compress(json.dumps(chat("Ünïcödé in the BODY STORE")).encode())
        (ref,) = await bodies.put_many([("acme/stored-body", raw)])
        big.request_body = Body(content_type="application/json", size=99, encoding="zstd", ref=ref)
        items = [Item(r) for r in [*records.values(), big]]
        await BodyHandler(bodies).handle(items)
        assert all(i.record.request_body is None or i.record.request_body.data is None for i in items)
        async with open_store(kind, tmp_path) as store:
            texts = [i.search_text for i in items]
            assert await store.write_batch([i.record for i in items], texts) == len(items)
            assert await store.write_batch([i.record for i in items], texts) == 0  # redelivery
            for q, want in [*CASES, ("ünïcödé in the body", {"stored"})]:
                assert await search(store, q) == want, q
            # other filters still apply; another tenant sees nothing
            page = await store.list_requests("acme", ListQuery(q="plain", model="nope"))
            assert page.items == []
            assert (await store.list_requests("globex", ListQuery(q="münchen"))).items == []
            # retention removes the text with the row
            await store.write_batch(
                [rec(9, id="old", at=T0 - timedelta(days=40), request_body=jbody(chat("münchen")))]
            )
            assert await search(store, "münchen") == {"german", "old"}
            while await store.delete_older_than(T0 - timedelta(days=30)):
                pass
            assert await search(store, "münchen") == {"german"}
            # the newest document went with it: the next ones are numbered after what is left
            fresh = [rec(10 + i, id=f"new{i}", request_body=jbody(chat("münchen"))) for i in range(3)]
            assert await store.write_batch(fresh) == 3
            assert await search(store, "münchen") == {"german", "new0", "new1", "new2"}
            for q, want in CASES[1:]:  # every earlier document still leads to its own row
                assert await search(store, q) == want, q
    finally:
        await bodies.close()


@pytest.mark.parametrize("kind", store_params())
async def test_a_common_word_is_looked_for_row_by_row_with_the_same_pages(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `SEARCH_INDEX_MAX` matches a page is looked for row by row among the newest rows
    (`search_scan_sql`); every page, cursor and filter must equal the text index's answer."""
    words = {
        i: ("common " if i % 3 else "") + ("sparse " if i % 29 == 0 else "") + f"w{i}" for i in range(240)
    }
    records, texts = [], []
    for i, text in words.items():
        records.append(rec(i, model="gpt-4o" if i % 2 else "gpt-4o-mini", latency_ms=float(i * 37 % 101),
                           properties={"env": "prod" if i % 5 else "dev"}))  # fmt: skip
        texts.append(text)
        records.append(rec(i, id=f"other-{i}", tenant="globex"))  # the same words, another tenant
        texts.append(text)
    by_index_pages = 0
    real_list_sql = sql.list_sql

    def list_sql(*a: Any, **kw: Any) -> tuple[str, list[Any]]:
        nonlocal by_index_pages
        by_index_pages += kw.get("hit") is None
        return real_list_sql(*a, **kw)

    async def pages(store: Store, query: ListQuery) -> list[list[str]]:
        out, cursor = [], None
        while True:
            page = await store.list_requests("acme", replace(query, cursor=cursor))
            out.append([x["id"] for x in page.items])
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor

    queries = [
        ListQuery(q="common", limit=7),
        ListQuery(q="COMMON", limit=7, order="asc"),
        ListQuery(q="common", limit=5, model="gpt-4o"),
        ListQuery(q="common", limit=6, sort="latency"),
        ListQuery(q="common", limit=6, sort="cost", order="asc"),
        ListQuery(q="common", limit=4, properties={"env": "dev"}),
        ListQuery(q="sparse", limit=3),  # few matches: through the index
        ListQuery(q="mm", limit=9),  # shorter than a trigram
    ]
    async with open_store(kind, tmp_path) as store:
        assert await store.write_batch(records, texts) == len(records)
        monkeypatch.setattr(sql, "list_sql", list_sql)
        monkeypatch.setattr(sql, "SEARCH_SCAN_ROWS", 1)  # the index only: no page is found in 1 row
        by_index = [await pages(store, query) for query in queries]
        assert by_index_pages == sum(map(len, by_index))
        monkeypatch.setattr(sql, "SEARCH_INDEX_MAX", 10)
        monkeypatch.setattr(sql, "SEARCH_SCAN_ROWS", 40)  # some pages are found in 40 rows, some not
        by_index_pages = 0
        for query, want in zip(queries, by_index, strict=True):
            assert await pages(store, query) == want, query
        scanned = sum(map(len, by_index)) - by_index_pages
    # what each query should find, from the words written above
    assert {x for p in by_index[0] for x in p} == {str(uuid.UUID(int=i + 1)) for i in words if i % 3}
    assert {x for p in by_index[6] for x in p} == {str(uuid.UUID(int=i + 1)) for i in words if i % 29 == 0}
    assert scanned >= 20, scanned  # pages the row-by-row path answered


@pytest.mark.parametrize("kind", store_params())
async def test_a_walk_that_falls_behind_its_pace_gives_up_early_with_the_same_pages(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A word with enough matches to be walked but too rare to fill a page in the walk's rows
    goes to the index once the walk's pace says so (`walk_is_hopeless`), not after every row;
    a common word never does. The pages equal the index's either way."""
    records, texts = [], []
    for i in range(400):
        records.append(rec(i))
        texts.append(("rare " if i < 40 and i % 10 == 0 else "") + ("common " if i % 3 else "") + f"w{i}")
    calls: list[tuple[int, int, int, bool]] = []
    real = sql.walk_is_hopeless
    # the production figures: a word in 0.06% of rows gives up after 2,000; one that fills a
    # page at its pace (51 in 20,000 rows: ~5 in 2,000) walks on
    assert real(1, 2_000, 51) and not real(5, 2_000, 51) and not real(11, 5_000, 51)

    def spy(hits: int, walked: int, n: int) -> bool:
        calls.append((hits, walked, n, real(hits, walked, n)))
        return calls[-1][-1]

    async with open_store(kind, tmp_path) as store:
        assert await store.write_batch(records, texts) == len(records)
        monkeypatch.setattr(sql, "SEARCH_SCAN_ROWS", 1)
        want = {w: await store.list_requests("acme", ListQuery(q=w, limit=3)) for w in ("rare", "common")}
        monkeypatch.setattr(sql, "walk_is_hopeless", spy)
        monkeypatch.setattr(sql, "SEARCH_INDEX_MAX", 2)
        monkeypatch.setattr(sql, "SEARCH_SCAN_ROWS", 300)
        monkeypatch.setattr(sql, "SEARCH_PACE_AT", frozenset({200, 250}))
        got = await store.list_requests("acme", ListQuery(q="rare", limit=3))
        assert calls == [(0, 200, 4, True)]  # newest first: no hit in 200 rows; stopped there
        assert [x["id"] for x in got.items] == [x["id"] for x in want["rare"].items]
        assert got.next_cursor == want["rare"].next_cursor
        assert len(got.items) == 3
        calls.clear()
        got = await store.list_requests("acme", ListQuery(q="common", limit=3))
        assert calls == []  # a full page long before the first pace check
        assert [x["id"] for x in got.items] == [x["id"] for x in want["common"].items]


@pytest.mark.parametrize("kind", store_params())
async def test_a_body_nested_as_deep_as_json_goes_is_stored_and_searchable(kind: str, tmp_path: Path) -> None:
    """orjson parses 1000 levels; the text walk must too (a recursive one raised RecursionError
    in the body handler, and the record went the way of a poison message)."""
    deep = b"[" * 1000 + b'"deep needle"' + b"]" * 1000
    body = Body(content_type="application/json", size=len(deep), encoding="identity", data=deep)
    record = rec(1, id="deep", request_body=body)
    bodies = FileBodyStore(str(tmp_path / "bodies"))
    await bodies.connect()
    try:
        item = Item(record)
        await BodyHandler(bodies).handle([item])
        async with open_store(kind, tmp_path) as store:
            assert await store.write_batch([item.record], [item.search_text]) == 1
            assert await search(store, "DEEP NEEDLE") == {"deep"}
    finally:
        await bodies.close()


def test_a_reassembled_stream_is_indexed_once_from_its_response() -> None:
    """A stream record carries the reassembled response and the raw events: the text comes from
    the response alone (the events hold the same deltas; parsing them again cost 8x the rest)."""
    from llmtap.store.search import record_text

    reassembled = jbody({"choices": [{"message": {"role": "assistant", "content": "The quick brown"}}]})
    r = rec(
        1, id="s", streamed=True, response_body=reassembled, response_events=sse("The qu", "ick br", "own")
    )
    text = record_text(r)
    assert text is not None and text.count("the quick brown") == 1 and "assistant" in text
    # no reassembled response (the stream held no JSON events): the events are the text
    r.response_body = None
    assert record_text(r) == "the quick brown"


def test_encoded_media_is_not_indexed_but_the_words_around_it_are() -> None:
    """The media audit: base64 images in messages, `b64_json`, audio answers and uploaded files
    were indexed as text: random queries matched them, and an image before the user's words
    took the whole text budget (`q=capybaraotter` found nothing)."""
    import base64
    import os

    from llmtap.store.search import body_text, record_text

    image = base64.b64encode(os.urandom(60_000)).decode()
    request = {
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
            {"type": "text", "text": "capybaraotter"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}},
        ]}],
    }  # fmt: skip
    answer = {"created": 1, "data": [{"b64_json": image, "revised_prompt": "a red fox"}]}
    r = rec(1, id="m", request_body=jbody(request), response_body=jbody(answer))
    text = record_text(r)
    assert text is not None and "capybaraotter" in text and "a red fox" in text
    assert image[:40].casefold() not in text and len(text) < 200
    # A body of a binary type is no text at all; a form's text fields are, not its files.
    audio = os.urandom(20_000)
    assert body_text(Body(content_type="audio/mpeg", size=len(audio), data=audio), audio) == ""
    form = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + audio + b"\r\n"
        b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nmake it a watercolour\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1\r\n--xyz--\r\n'
    )
    ctype = "multipart/form-data; boundary=xyz"
    got = body_text(Body(content_type=ctype, size=len(form), data=form), form)
    assert got == "make it a watercolour\ngpt-image-1"
    # A body cut at the size limit is no JSON any more: its base64 runs go all the same (rev15).
    cut = json.dumps(request).encode()[:200_000]
    got = body_text(Body(content_type="application/json", size=len(cut), truncated=True, data=cut), cut)
    assert image[:40] not in got and "claude-sonnet-4-5" in got and len(got) < 1_000
    # Long words of base64's letters that are not base64 are text (rev15: a DNA sequence, a
    # slug, a hex digest were taken for media).
    words = ["ACGT" * 60, "-".join(["some-long-slug"] * 20), "0123456789abcdef" * 16, "MKTAYIAKQR" * 25,
             "/home/User1/projects/Module0/Module1/" * 10, "CamelCaseIdent1" * 18]  # fmt: skip
    assert body_text(jbody({"w": words}), zstandard.ZstdCompressor().compress(
        json.dumps({"w": words}).encode())) == "\n".join(words)  # fmt: skip
    # Audio that begins with silence ("AAAA..."), MIME base64 in lines (rev16).
    silent = base64.b64encode(bytes(150) + os.urandom(3000)).decode()
    lines = base64.encodebytes(os.urandom(3000)).decode()
    for blob in (silent, lines):
        raw = json.dumps({"a": blob, "t": "kept"}).encode()
        assert body_text(Body(content_type="application/json", size=len(raw), data=raw), raw) == "kept"
        assert "kept" in (got := body_text(Body(size=9, truncated=True, data=raw[:-2]), raw[:-2]))
        assert len(got) < 100
    # Long words without spaces that are not base64 (a URL, CJK prose) are still text.
    url = "https://example.com/" + "a/" * 150
    cjk = "\u65e5\u672c\u8a9e" * 100
    assert body_text(jbody({"u": url, "c": cjk}), zstandard.ZstdCompressor().compress(
        json.dumps({"u": url, "c": cjk}).encode())) == url + "\n" + cjk  # fmt: skip

    # rev17: a `data:` URL inside a message's prose was indexed whole; silent or quiet audio
    # under a media key (few distinct letters) was text; a password, a list of identifiers or
    # of keys a few hundred letters long was taken for media.
    def text_of(obj: Any) -> str:
        raw = json.dumps(obj).encode()
        return body_text(Body(content_type="application/json", size=len(raw), data=raw), raw)

    prose = f"Here is my chart ![chart](data:image/png;base64,{image}) what does the trend show?"
    got = text_of({"messages": [{"content": prose}]})
    assert "trend show" in got and "chart" in got and image[:40] not in got and len(got) < 200
    quiet = base64.b64encode(b"".join(n.to_bytes(2, "little", signed=True) for n in
                                      [(i * 7919) % 21 - 10 for i in range(20_000)])).decode()  # fmt: skip
    for audio_b64 in (base64.b64encode(bytes(30_000)).decode(), quiet):
        parts = [{"inline_data": {"mime_type": "audio/wav", "data": audio_b64}}, {"text": "kept"}]
        assert text_of({"contents": [{"parts": parts}]}) == "audio/wav\nkept"
    # rev18b: what a media key holds elsewhere is text (Gemini's function `result`, an
    # Anthropic text document's `data`); a `data:` URL in prose goes whatever its letters.
    ids = "\n".join(f"ORDERX{i:06d}" for i in range(60))
    dna = "ACGT" * 100 + "ZEBRAMARKDNA"
    called = {"functionResponse": {"name": "f", "response": {"result": ids}}}
    document = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": dna}}
    got = text_of({"contents": [{"parts": [called]}], "messages": [{"content": [document]}]})
    assert ids in got and dna in got, got[:200]
    flat = "see ![x](data:image/png;base64," + "A" * 4000 + ") end"
    assert text_of({"m": flat}) == "see ![x](data:image/png;base64, ) end"
    # fuzz2: a boundary past U+00FF raised (the request was not searchable)
    part = 'Content-Disposition: form-data; name="prompt"\r\n\r\nwatercolour\r\n'
    form = f"--\u382d\r\n{part}--\u382d--\r\n".encode()
    ctype = "multipart/form-data; boundary=\u382d"
    assert body_text(Body(content_type=ctype, size=len(form), data=form), form) == "watercolour"
    rng = random.Random(17)
    alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    password = "".join(rng.choice(alnum) for _ in range(300))
    idents = "\n".join(f"get{w}ById_{i}" for i, w in enumerate(["User", "Order", "Item", "Cart"] * 4))
    keys = "\n".join("5" + "".join(rng.choice(alnum[:-1]) for _ in range(50)) for _ in range(5))
    for text in (password, idents, keys):
        assert text_of({"messages": [{"role": "user", "content": text}]}) == f"user\n{text}"


def test_json_only_a_lenient_parser_reads_is_indexed_as_its_text() -> None:
    """A body with a byte-order mark, a lone surrogate escape or a byte that is not UTF-8 was
    indexed as raw JSON text, its `\\u` escapes undecoded: `q=` missed what the page showed."""
    from llmtap.store.search import body_text

    for data in (
        b'\xef\xbb\xbf{"messages": [{"content": "\\u65e5\\u672c red"}]}',
        b'{"messages": [{"content": "\\u65e5\\u672c red \\ud83d"}]}',
        b'{"messages": [{"content": "\\u65e5\\u672c red \xff"}]}',
    ):
        text = body_text(Body(content_type="application/json", size=len(data), data=data), data)
        assert text.startswith("\u65e5\u672c red"), (data, text)


async def test_sqlite_search_index_merges_16_segments_at_a_time_after_migrating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 12 sets FTS5's `automerge` to 16 (write cost -24% at 1M documents, same query
    times: bench/search_index.py) in the index's own config, on a store with documents in it."""
    import sqlite3

    import llmtap.store.sqlite as lite
    from llmtap.store.migrations import SQLITE

    path = tmp_path / "old.db"
    monkeypatch.setattr(lite, "MIGRATIONS", [m for m in SQLITE if m[0] < 12])
    old = lite.SQLiteStore(path)
    await old.connect()
    assert await old.write_batch([rec(0, id="before", request_body=jbody(chat("written before 12")))]) == 1
    await old.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT v FROM request_text_config WHERE k = 'automerge'").fetchone() is None
    monkeypatch.setattr(lite, "MIGRATIONS", SQLITE)
    new = lite.SQLiteStore(path)
    await new.connect()
    try:
        assert await new.write_batch([rec(1, id="after", request_body=jbody(chat("written after 12")))]) == 1
        assert await search(new, "written") == {"before", "after"}
    finally:
        await new.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT v FROM request_text_config WHERE k = 'automerge'").fetchone() == (16,)


def test_the_bound_is_shared_half_and_half_only_when_both_sides_are_long() -> None:
    from llmtap.store.search import record_text

    def text(ask: str, answer: str, limit: int) -> str | None:
        r = rec(1, request_body=jbody(chat(ask)), response_body=jbody({"c": answer}))
        return record_text(r, limit=limit)

    # chat() adds the model's and the role's strings: "gpt-4o-mini\nuser\n" (17 bytes) + ask
    # A request cut keeps its start and its end, half its room each ("\n" between them).
    ask = "a" * 50 + "c" * 50
    assert text("a" * 3, "b" * 5, 64) == "gpt-4o-mini\nuser\naaa\nbbbbb"  # fits: all of it
    assert text(ask, "b" * 100, 64) == "gpt-4o-mini\nuser" + "\n" + "c" * 15 + "\n" + "b" * 32
    assert text("a" * 3, "b" * 100, 64) == "gpt-4o-mini\nuser\naaa\n" + "b" * 44  # the rest to the answer
    assert text(ask, "b" * 5, 64) == "gpt-4o-mini\nuser\n" + "a" * 12 + "\n" + "c" * 29 + "\nbbbbb"
    assert text(ask, "b" * 100, 0) is None


async def test_with_search_bytes_0_the_worker_indexes_nothing_and_reads_no_body_back(tmp_path: Path) -> None:
    """`LLMTAP_SEARCH_BYTES=0`: the body handler extracts no text (the costliest part of a
    worker on real answers) and fetches no body back from the body store; records and bodies
    are stored as always."""
    from llmtap.config import Settings
    from llmtap.handlers.chain import build_chain

    bodies = FileBodyStore(str(tmp_path / "bodies"))
    await bodies.connect()
    gets: list[str] = []
    real_get = bodies.get

    async def counted_get(ref: str) -> bytes | None:
        gets.append(ref)
        return await real_get(ref)

    bodies.get = counted_get  # type: ignore[method-assign]
    try:
        raw = zstandard.ZstdCompressor().compress(json.dumps(chat("stored needle")).encode())
        (ref,) = await bodies.put_many([("acme/big", raw)])
        big = rec(1, id="big")
        big.request_body = Body(content_type="application/json", size=99, encoding="zstd", ref=ref)
        inline = rec(2, id="inline", request_body=jbody(chat("inline needle")))
        async with open_store("sqlite", tmp_path) as store:
            chain = build_chain(Settings(data_dir=tmp_path, search_bytes=0), store, bodies)
            items = [Item(big), Item(inline)]
            await chain.run(items)
            assert all(i.ok for i in items) and [i.search_text for i in items] == [None, None]
            assert gets == []
            assert await search(store, "needle") == set()
            got = await store.get_request("acme", "inline")
            assert got is not None and got["request_body"]["ref"]  # the body went to the body store
            assert await bodies.get(got["request_body"]["ref"]) is not None
    finally:
        await bodies.close()


# -- LLMTAP_SEARCH_SCOPE=turn: what a request adds to its conversation ------------------------------

SYSTEM = {"role": "system", "content": "you are the lighthouse keeper"}


def _turns() -> list[tuple[dict[str, Any], str]]:
    """A three-turn Chat Completions conversation as a client sends it: every earlier message
    resent with each turn. (request, answer) per turn."""
    msgs: list[dict[str, Any]] = [SYSTEM]
    out = []
    for n, (ask, answer) in enumerate(
        [("first-question", "first-answer"), ("second-question", "second-answer"), ("third-q", "third-a")]
    ):
        msgs = [*msgs, {"role": "user", "content": f"{ask} {n}"}]
        out.append(({"model": "gpt-4o-mini", "messages": msgs}, f"{answer} {n}"))
        msgs = [*msgs, {"role": "assistant", "content": f"{answer} {n}"}]
    return out


def _conversation() -> list[LogRecord]:
    return [
        rec(
            n,
            id=f"turn{n}",
            request_body=jbody(req),
            response_body=jbody({"choices": [{"message": {"role": "assistant", "content": answer}}]}),
        )
        for n, (req, answer) in enumerate(_turns())
    ]


@pytest.mark.parametrize("kind", store_params())
@pytest.mark.parametrize("scope", ["request", "turn"])
async def test_search_scope_turn_finds_each_message_where_it_entered_the_conversation(
    kind: str, scope: str, tmp_path: Path
) -> None:
    """By turn, a message is indexed once, in the request that added it (the system prompt with
    the first turn); the whole request (the default) finds it in every later request too."""
    bodies = FileBodyStore(str(tmp_path / "bodies"))
    await bodies.connect()
    try:
        items = [Item(r) for r in _conversation()]
        await BodyHandler(bodies, SEARCH_BYTES, scope).handle(items)  # type: ignore[arg-type]
        async with open_store(kind, tmp_path) as store:
            assert await store.write_batch([i.record for i in items], [i.search_text for i in items]) == 3
            by_turn = scope == "turn"
            want = {
                "lighthouse keeper": {"turn0"} if by_turn else {"turn0", "turn1", "turn2"},
                "first-question": {"turn0"} if by_turn else {"turn0", "turn1", "turn2"},
                "first-answer": {"turn0"} if by_turn else {"turn0", "turn1", "turn2"},  # its response
                "second-question": {"turn1"} if by_turn else {"turn1", "turn2"},
                "second-answer": {"turn1"} if by_turn else {"turn1", "turn2"},
                "third-q": {"turn2"},
                "third-a": {"turn2"},
            }
            for q, ids in want.items():
                assert await search(store, q) == ids, q
    finally:
        await bodies.close()


def test_turn_per_provider() -> None:
    """Each provider's rule for the new turn, on its own wire format."""
    from llmtap.providers import provider_for

    def turn(provider: str, req: Any) -> Any:
        return provider_for(provider).turn(req)

    first = {"model": "m", "messages": [SYSTEM, {"role": "user", "content": "hi"}]}
    assert turn("openai", first) is first  # no earlier reply: the whole request (system prompt too)
    later = {"model": "m", "tools": [{"x": 1}], "messages": [*first["messages"],  # type: ignore[list-item]
             {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
             {"role": "tool", "content": "t"}]}  # fmt: skip
    assert turn("openai", later) == [{"role": "user", "content": "q2"}, {"role": "tool", "content": "t"}]
    assert turn("azure", later) == turn("vllm", later) == turn("openai", later)  # OpenAI's wire
    # Responses API: items the model produced (messages, calls, reasoning) end the old part
    responses = {"model": "m", "instructions": "be brief", "input": [
        {"role": "user", "content": "q1"}, {"type": "reasoning", "summary": []},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "42"}]}  # fmt: skip
    assert turn("openai", responses) == [{"type": "function_call_output", "call_id": "c", "output": "42"}]
    assert turn("openai", {"model": "m", "input": "just text"}) == {"model": "m", "input": "just text"}
    # Anthropic: `system` is resent; an assistant prefill at the end is new
    anthropic = {"system": "s", "messages": [{"role": "user", "content": "q1"},
                 {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                 {"role": "assistant", "content": "{"}]}  # fmt: skip
    assert turn("anthropic", anthropic) == [
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "{"},
    ]
    # Gemini: the model's turns have role "model"
    gemini = {"systemInstruction": {"parts": [{"text": "s"}]}, "contents": [
        {"role": "user", "parts": [{"text": "q1"}]}, {"role": "model", "parts": [{"text": "a1"}]},
        {"role": "user", "parts": [{"text": "q2"}]}]}  # fmt: skip
    assert turn("gemini", gemini) == [{"role": "user", "parts": [{"text": "q2"}]}]
    # Anything else a client may send is taken whole, never an error
    for odd in [None, 3, "text", [], {"messages": "x"}, {"messages": [1, None, "a"]}, {"contents": {}}]:
        for p in ("openai", "anthropic", "gemini"):
            assert turn(p, odd) is odd


def test_search_scope_is_a_checked_setting() -> None:
    from llmtap.config import Settings
    from llmtap.errors import ConfigError

    assert Settings().search_scope == "request"
    assert Settings(search_scope="turn").search_scope == "turn"
    with pytest.raises((ConfigError, ValueError)):
        Settings(search_scope="conversation")


def test_forms_are_read_part_by_part_as_servers_read_them_in_bounded_work() -> None:
    """rev20: .NET's `HttpClient` quotes the boundary and not the field name
    (`name=model`, as RFC 7578 allows): the gateway missed its model and the form's text; a
    boundary followed by ` ; charset=...`, `FILENAME=` and `filename*=` were read otherwise than
    servers read them; one part head of 8,000 `content-disposition:` held the gateway's event
    loop for 16 s (a regex backtracking from each)."""
    import time

    from llmtap.gateway.capture import _form_fields
    from llmtap.store.search import body_text

    g = "2f0c6e6a-5b0e-4c3a-9a4f-2b6b1d1c9e11"
    dotnet = (
        f"--{g}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Disposition: form-data; name=model\r\n\r\n"
        f"whisper-1\r\n--{g}\r\nContent-Disposition: form-data; name=response_format\r\n\r\nsrt\r\n"
        f"--{g}\r\nContent-Disposition: form-data; name=prompt\r\n\r\nspeak slowly\r\n"
        f"--{g}\r\nContent-Disposition: form-data; name=file; FILENAME=a.mp3\r\n\r\nID3 not text\r\n"
        f"--{g}\r\nContent-Disposition: form-data; name=\"x\"; filename*=UTF-8''b.mp3\r\n\r\nnor this\r\n"
        f"--{g}\r\nContent-Disposition: form-data; name*=UTF-8''language\r\n\r\nen\r\n--{g}--\r\n"
    ).encode()
    for ctype in (
        f'multipart/form-data; boundary="{g}"',
        f"multipart/form-data; boundary={g} ; charset=utf-8",
        f"Multipart/Form-Data;BOUNDARY={g}",
    ):
        assert _form_fields(ctype, dotnet) == {"model": "whisper-1", "response_format": "srt"}, ctype
        got = body_text(Body(content_type=ctype, size=len(dotnet), data=dotnet), dotnet)
        assert got == "whisper-1\nsrt\nspeak slowly\nen", ctype
    t0 = time.process_time()  # this process's CPU: other jobs on the machine do not count
    head = (
        b"--b\r\n"
        + b"content-disposition:" * 40_000
        + b'\r\n\r\nx\r\n--b\r\nContent-Disposition: f; name="model"'
    )
    assert _form_fields("multipart/form-data; boundary=b", head + b"\r\n\r\ngpt-4o-transcribe\r\n--b--") == {
        "model": "gpt-4o-transcribe"
    }
    empty = b"--b\r\n\r\n\r\n" * 400_000  # 4 MB of parts with nothing in them: 256 are read
    assert _form_fields("multipart/form-data; boundary=b", empty) == {}
    body_text(Body(content_type="multipart/form-data; boundary=b", size=len(head), data=head), head)
    assert time.process_time() - t0 < 20.0  # bounded: milliseconds; the regex took ~400 s on the first


def test_forms_end_where_servers_end_them_and_quoted_parameters_stay_whole() -> None:
    """rev21, compared with aiohttp, Starlette (python-multipart) and werkzeug: a part after the
    closing delimiter, a `;` or `name=` inside a quoted name, a `boundary=` inside another
    parameter's quotes, a file's line that merely starts with the boundary, and `MODEL` were
    read as the form's model (the upstream answered as whisper-1, the record said otherwise)."""
    import time

    from llmtap.gateway.capture import _form_fields
    from llmtap.providers.forms import form_parts

    def part(name: str, value: str, extra: str = "") -> str:
        return f"--abc\r\nContent-Disposition: form-data; name={name}{extra}\r\n\r\n{value}\r\n"

    ct = "multipart/form-data; boundary=abc"
    whisper = part('"model"', "whisper-1")
    cases = {
        "epilogue": whisper + "--abc--\r\n" + part('"model"', "gpt-4o-transcribe") + "--abc--\r\n",
        "quoted ;": whisper + part('"x;name=model;"', "gpt-4o-transcribe") + "--abc--\r\n",
        "case": whisper + part('"MODEL"', "gpt-4o-transcribe") + "--abc--\r\n",
        "in a file": whisper
        + part(
            '"file"',
            'RIFF\r\n--abcX\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o',
            '; filename="a"',
        )
        + "--abc--\r\n",
    }
    for what, form in cases.items():
        assert _form_fields(ct, form.encode()) == {"model": "whisper-1"}, what
    evil = 'multipart/form-data; foo="x; boundary=evil"; boundary=abc'
    form = whisper + '--abc\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\n--evil\r\n'
    form += part('"model"', "gpt-4o-transcribe").replace("--abc", "--evil") + "--abc--\r\n"
    assert _form_fields(evil, form.encode()) == {"model": "whisper-1"}
    names = [n for n, _, _, _ in form_parts(form.encode(), b"abc")]
    assert names == ["model", "f"]
    # Bounded: 256 heads of 8,100 `;` each (2 MB) took the gateway's loop 0.6 s (rev21).
    hostile = (("--a\r\nContent-Disposition: form-data" + ";" * 8100 + "\r\n\r\nx\r\n") * 256).encode()
    t0 = time.process_time()  # this process's CPU: other jobs on the machine do not count
    for _ in range(5):
        assert _form_fields("multipart/form-data; boundary=a", hostile) == {}
    assert time.process_time() - t0 < 20.0  # a few ms each; the guard is against seconds each


def test_forms_cut_by_the_size_limit_and_heads_read_as_the_dashboard_reads_them() -> None:
    """rev22: a model field the body size limit cut (`gpt-4o-mini-transcribe` after `gpt-4o`)
    was recorded as `gpt-4o`; a second `name`, a head line ended by LF alone and a `name*` in
    ISO-8859-1 were read otherwise by the gateway and the dashboard; 4 MiB of lines that merely
    start with the boundary held the loop 340 ms (a Python step each)."""
    import time

    from llmtap.gateway.capture import _form_fields
    from llmtap.providers.forms import form_parts

    ct = "multipart/form-data; boundary=abc"
    body = (
        b'--abc\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n\r\n'
        + b"\x00" * 5000
        + b'\r\n--abc\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-mini-transcribe'
        + b'\r\n--abc\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'
        + b"words " * 2000
        + b"\r\n--abc--\r\n"
    )
    at = body.index(b"gpt-4o-mini-transcribe") + len(b"gpt-4o")
    assert _form_fields(ct, body[:at], body[-1000:]) == {}  # cut: no model rather than a wrong one
    assert _form_fields(ct, body) == {"model": "gpt-4o-mini-transcribe"}
    assert [whole for *_, whole in form_parts(body[:at], b"abc")] == [True, False]
    heads = {
        b'form-data; name="file"; name="model"': "file",  # the first, as the dashboard reads it
        b"form-data; name=\"file\"; name*=ISO-8859-1''mod%E8l": "mod\u00e8l",
        b"form-data; name*=UTF-8''mod%C3%A8l": "mod\u00e8l",
    }
    for disposition, name in heads.items():
        form = b"--abc\r\nContent-Disposition: " + disposition + b"\r\n\r\nv\r\n--abc--\r\n"
        assert [n for n, *_ in form_parts(form, b"abc")] == [name], disposition
    lf = b"--abc\r\nContent-Type: text/plain\nContent-Disposition: form-data; name=model\r\n\r\nwhisper-1"
    lf += b"\r\n--abc--"
    assert _form_fields(ct, lf) == {"model": "whisper-1"}
    boundary = "B" * 40
    fake = (f"\r\n--{boundary}" + " " * 63 + "x").encode() * 40_000  # 4 MiB of near-delimiters
    t0 = time.process_time()  # this process's CPU: other jobs on the machine do not count
    for _ in range(5):
        assert (
            _form_fields(f"multipart/form-data; boundary={boundary}", b"--" + boundary.encode() + fake) == {}
        )
    assert time.process_time() - t0 < 20.0  # a catastrophe guard: milliseconds each


def test_forms_tail_unclosed_quotes_and_hostile_heads() -> None:
    """rev23 (review of 313abfe): the kept end of a cut body begins mid-line, and a file's
    `X--abc` line cut right after `X` was taken for a delimiter: its fake `model` part set the
    model recorded. `name="modelx` (a quote never closed) lost its last character and was read
    as `model` (starlette reads `"modelx`, werkzeug and aiohttp no name). 256 heads of an
    unclosed quoted value full of escapes, or of 8,000 CR-ended lines, held the loop 0.6 s and
    0.26 s."""
    import time

    from llmtap.gateway.capture import REQUEST_TAIL, _form_fields

    ct = "multipart/form-data; boundary=B"
    head = (
        b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-transcribe\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    )
    tail = b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
    close = b"\r\n--B--\r\n"
    tail += b"p" * (REQUEST_TAIL - len(tail) - len(close)) + close
    body = head + b"\0" * 100_000 + b"X" + tail
    assert _form_fields(ct, body[:50_000], body[-REQUEST_TAIL:]) == {"model": "gpt-4o-transcribe"}
    assert _form_fields(ct, body) == {"model": "gpt-4o-transcribe"}
    unclosed = (
        b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-transcribe\r\n'
        b'--B\r\nContent-Disposition: form-data; name="modelx\r\n\r\nwhisper-1\r\n--B--\r\n'
    )
    assert _form_fields(ct, unclosed) == {"model": "gpt-4o-transcribe"}
    for junk in (b';a="' + b"\\x" * 4080, b"\r" * 8150, b"; " * 4080):
        part = b"--B\r\nContent-Disposition: form-data" + junk[:8150] + b"\r\n\r\nv\r\n"
        hostile = part * 256 + b"--B--\r\n"
        t0 = time.process_time()
        for _ in range(5):
            _form_fields(ct, hostile)
        assert time.process_time() - t0 < 1.0  # milliseconds each; 0.6 s each before
    many = b'--B\r\nContent-Disposition: form-data; name="x"\r\n\r\nv\r\n' * 300
    many += b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-transcribe\r\n--B--\r\n'
    assert _form_fields(ct, many) == {"model": "gpt-4o-transcribe"}  # starlette and werkzeug read it
