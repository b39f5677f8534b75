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
_PARAM = r';\s*([^\s=;"]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;]*))?'
_PARAM_STR = re.compile(_PARAM)
_PARAM_BYTES = re.compile(_PARAM.encode())
_UNESCAPE = re.compile(rb"\\(.)", re.DOTALL)
#: Parameters read per header line: a form's head has two or three (rev21: 8,100 `;` per head
#: in 256 parts held the gateway's loop 0.6 s a request).
MAX_PARAMS = 16
#: A part's head longer than this is no head (a real one is a line or two): not read.
MAX_HEAD = 8 * 1024
#: Parts read per body at most: an upload names a few fields; 4 MiB of empty parts cost the
#: event loop 0.3 s to walk (rev20).
MAX_PARTS = 256
_DISPOSITION = b"content-disposition:"


def form_boundary(content_type: str) -> bytes | None:
    """The boundary a multipart content type names, quoted or not, spaces around it cut
    (`boundary=b ; charset=utf-8`, .NET's `boundary="<guid>"`); None without one. A boundary
    is ASCII (RFC 2046); one that is not is taken as the client sent it, as UTF-8."""
    value = None
    for n, m in enumerate(_PARAM_STR.finditer(content_type)):
        if n >= MAX_PARAMS:
            break
        if m[1].lower() == "boundary" and m[2] is not None:
            raw = m[2].strip()
            value = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw[:1] == '"' else raw
            break
    if not value:
        return None
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no byte stands for: no body holds it
        return None


def form_parts(data: bytes, boundary: bytes) -> Iterator[tuple[str | None, bool, bytes]]:
    """(field name, whether it is a file, value) of each part of a multipart body, in order,
    as RFC 2046 delimits them: a delimiter is `--boundary` at a line's start followed by its
    line's end (spaces or tabs before it allowed), and the parts end at the close delimiter
    (`--boundary--`): what follows it is no part, nor is a line of a file that merely starts
    with the boundary (rev21: both were read as fields).

    A part's head is read line by line: `name` quoted or not (RFC 7578 allows a token: .NET's
    `HttpClient` sends `name=model`), `name*=` in RFC 8187 form; a part with `filename` or
    `filename*` is a file, whatever the parameter's letters' case, and its value is not copied
    (b""). A part without a Content-Disposition has no name. The value is the part's bytes up
    to the next delimiter (its line end, which belongs to the delimiter, left out)."""
    body = b"\r\n" + data
    delimiter = b"\r\n--" + boundary
    pos, close, start = _delimiter(body, delimiter, 0)
    for _ in range(MAX_PARTS):
        if pos < 0 or close:
            return
        pos, close, after = _delimiter(body, delimiter, start)
        stop = len(body) if pos < 0 else pos
        if body.startswith(b"\r\n", start):  # no head at all
            head, value_at = b"", start + 2
        else:
            end = body.find(b"\r\n\r\n", start, min(stop, start + MAX_HEAD + 4))
            if end < 0:  # a head too long to be one, or cut off by the size limit
                start = after
                continue
            head, value_at = body[start:end], end + 4
        name, is_file = _disposition(head)
        yield name, is_file, b"" if is_file else body[value_at:stop]
        start = after


def _delimiter(body: bytes, delimiter: bytes, start: int) -> tuple[int, bool, int]:
    """(offset of the next delimiter at or after `start`, whether it closes the form, offset of
    the next part's head); -1 when there is none."""
    while True:
        pos = body.find(delimiter, start)
        if pos < 0:
            return -1, False, -1
        after = pos + len(delimiter)
        if body.startswith(b"--", after):
            return pos, True, -1
        eol = after
        while eol < len(body) and eol - after < 64 and body[eol] in (0x20, 0x09):  # transport padding
            eol += 1
        if body.startswith(b"\r\n", eol):
            return pos, False, eol + 2
        start = pos + 1  # the boundary's letters inside a line: no delimiter


def _disposition(head: bytes) -> tuple[str | None, bool]:
    for line in head.split(b"\r\n"):
        if line[: len(_DISPOSITION)].lower() != _DISPOSITION:
            continue
        name: str | None = None
        extended: str | None = None
        is_file = False
        for n, m in enumerate(_PARAM_BYTES.finditer(line, len(_DISPOSITION))):
            if n >= MAX_PARAMS:
                break
            key, value = m[1].lower(), (m[2] or b"").strip()
            if value[:1] == b'"':
                value = _UNESCAPE.sub(rb"\1", value[1:-1])
            if key in (b"filename", b"filename*"):
                is_file = True
            elif key == b"name":
                name = value.decode("utf-8", "replace")
            elif key == b"name*":  # RFC 8187: charset'language'value (aiohttp prefers it)
                charset, _, rest = value.partition(b"'")
                _, quote, rest = rest.partition(b"'")
                if quote and charset.lower() in (b"utf-8", b"us-ascii"):
                    extended = unquote_to_bytes(rest).decode("utf-8", "replace")
        return (extended if extended is not None else name), is_file
    return None, False
