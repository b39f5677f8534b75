"""Multipart form bodies (RFC 7578), as uploads to the providers send them.

The gateway reads a transcription's `model` and `response_format` from its form, and the
worker indexes a form's text fields: both read the parts here, the way the providers' servers
do, so a field one of them sees is the field the other sees. Bounded work per body: this runs
on the gateway's event loop, and a form is whatever a client sent.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import unquote_to_bytes

__all__ = ["form_boundary", "form_parts"]

#: A parameter of a header value (`; name=value`, the value quoted with `\\` escapes or not):
#: a quoted `;` or `boundary=` belongs to its value (rev21: `name="x;name=model;"`, a
#: `boundary=` inside another parameter's quotes, were read as parameters).
#: The quoted value is group 2 (its escapes still in), an unquoted one group 3: a value that
#: opens a quote and never closes it is taken as sent, quote and all, as starlette does (rev23:
#: `name="modelx` lost its last letter and was read as `model`). Unrolled (`[^"\\]*(?:\\.[^"\\]*)*`):
#: one alternation per character cost 2.4 ms an 8 KiB head, 0.6 s for 256 parts (rev23).
_PARAM = r';\s*([^\s=;"]+)\s*(?:=\s*(?:"([^"\\]*(?:\\.[^"\\]*)*)"|([^;]*)))?'
_PARAM_STR = re.compile(_PARAM)
_PARAM_BYTES = re.compile(_PARAM.encode())
_UNESCAPE = re.compile(rb"\\(.)", re.DOTALL)
#: Parameters read per header line: a form's head has two or three (rev21: 8,100 `;` per head
#: in 256 parts held the gateway's loop 0.6 s a request).
MAX_PARAMS = 16
#: A part's head longer than this is no head (a real one is a line or two): not read.
MAX_HEAD = 8 * 1024
#: Bytes of part heads read per body at most: what a head's parameters cost to read is bounded
#: by this, whatever they hold (rev23: 256 heads of 8 KiB of `; ` held the loop 60 ms). A real
#: form's heads are a few hundred bytes.
MAX_HEADS = 128 * 1024
#: Parts read per body at most: an upload names a few fields; 4 MiB of empty parts cost the
#: event loop 0.3 s to walk (rev20). As many as starlette and werkzeug read by default (rev23:
#: at 256, 300 one-letter fields before `model`, 16 KB, left a transcription unpriced that
#: their servers read whole; walking 1,000 costs 5 ms now).
MAX_PARTS = 1000


def form_boundary(content_type: str) -> bytes | None:
    """The boundary a multipart content type names, quoted or not, spaces around it cut
    (`boundary=b ; charset=utf-8`, .NET's `boundary="<guid>"`); None without one. A boundary
    is ASCII (RFC 2046); one that is not is taken as the client sent it, as UTF-8."""
    value = None
    for n, m in enumerate(_PARAM_STR.finditer(content_type)):
        if n >= MAX_PARAMS:
            break
        if m[1].lower() == "boundary" and (m[2] is not None or m[3] is not None):
            value = re.sub(r"\\(.)", r"\1", m[2]) if m[2] is not None else m[3].strip()
            break
    if not value:
        return None
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no byte stands for: no body holds it
        return None


def form_parts(
    data: bytes, boundary: bytes, at_start: bool = True
) -> Iterator[tuple[str | None, bool, bytes, bool]]:
    """(field name, whether it is a file, value, whether a delimiter ends it) of each part of a
    multipart body, in order, as RFC 2046 delimits them: a delimiter is `--boundary` at a
    line's start followed by its line's end (spaces or tabs before it allowed), and the parts
    end at the close delimiter (`--boundary--`): what follows it is no part, nor is a line of a
    file that merely starts with the boundary (rev21: both were read as fields). A part no
    delimiter ends is where a size limit cut the body: its value is only its start.

    A part's head is read line by line: `name` quoted or not (RFC 7578 allows a token: .NET's
    `HttpClient` sends `name=model`), `name*=` in RFC 8187 form; a part with `filename` or
    `filename*` is a file, whatever the parameter's letters' case, and its value is not copied
    (b""). A part without a Content-Disposition has no name. The value is the part's bytes up
    to the next delimiter (its line end, which belongs to the delimiter, left out).

    `at_start`: `data` is the body's start. A body's end (`Capture.request_tail`) begins
    anywhere, mid-line: its first bytes are no line's start, and `--boundary` there is a file's
    bytes, not a delimiter (rev23: a file holding `X--B` + a `model` part cut right after `X`
    set the model recorded)."""
    body = (b"\r\n" if at_start else b"") + data
    # One search per delimiter, at C speed: a step in Python for each line merely starting with
    # the boundary held the gateway's loop 340 ms a 4 MiB upload of them (rev22).
    delimiter = re.compile(re.escape(b"\r\n--" + boundary) + rb"(?:(--)|[ \t]{0,64}\r\n)")
    found = delimiter.search(body)
    heads = 0
    for _ in range(MAX_PARTS):
        if found is None or found[1] is not None:  # none, or the close delimiter
            return
        start = found.end()
        found = delimiter.search(body, start)
        stop = len(body) if found is None else found.start()
        if body.startswith(b"\r\n", start):  # no head at all
            head, value_at = b"", start + 2
        else:
            end = body.find(b"\r\n\r\n", start, min(stop, start + MAX_HEAD + 4))
            if end < 0:  # a head too long to be one, or cut off by the size limit
                continue
            head, value_at = body[start:end], end + 4
            heads += len(head)
            if heads > MAX_HEADS:
                return
        name, is_file = _disposition(head)
        yield name, is_file, b"" if is_file else body[value_at:stop], found is not None


_DISPOSITION = b"content-disposition:"
_EOL = re.compile(rb"[\r\n]")


def _disposition(head: bytes) -> tuple[str | None, bool]:
    """(name, is a file) from a part's head: its first Content-Disposition, lines ended by CRLF,
    LF or CR, the first of each parameter (the dashboard's rule; aiohttp refuses a second)."""
    # The first line that starts with it, found at C speed (rev23: a split into 8,000 CR-ended
    # lines a head, walked in Python, held the loop 0.26 s for 256 parts).
    low = head.lower()
    at = low.find(_DISPOSITION)
    while at > 0 and head[at - 1] not in b"\r\n":
        at = low.find(_DISPOSITION, at + 1)
    if at >= 0:
        at += len(_DISPOSITION)
        eol = _EOL.search(head, at)
        line = head[at : len(head) if eol is None else eol.start()]
        params: dict[bytes, bytes] = {}
        for n, m in enumerate(_PARAM_BYTES.finditer(line)):
            if n >= MAX_PARAMS:
                break
            value = _UNESCAPE.sub(rb"\1", m[2]) if m[2] is not None else (m[3] or b"").strip()
            params.setdefault(m[1].lower(), value)
        is_file = b"filename" in params or b"filename*" in params
        name = params.get(b"name")
        extended = params.get(b"name*")
        if extended is not None:  # RFC 8187: charset'language'value (aiohttp prefers it)
            charset, _, rest = extended.partition(b"'")
            _, quote, rest = rest.partition(b"'")
            try:
                if quote:
                    return unquote_to_bytes(rest).decode(charset.decode("ascii"), "replace"), is_file
            except (LookupError, UnicodeDecodeError):  # a charset Python does not know
                pass
        return (None if name is None else name.decode("utf-8", "replace")), is_file
    return None, False
