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


def form_parts(data: bytes, boundary: bytes) -> Iterator[tuple[str | None, bool, bytes, bool]]:
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
    to the next delimiter (its line end, which belongs to the delimiter, left out)."""
    body = b"\r\n" + data
    # One search per delimiter, at C speed: a step in Python for each line merely starting with
    # the boundary held the gateway's loop 340 ms a 4 MiB upload of them (rev22).
    delimiter = re.compile(re.escape(b"\r\n--" + boundary) + rb"(?:(--)|[ \t]{0,64}\r\n)")
    found = delimiter.search(body)
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
        name, is_file = _disposition(head)
        yield name, is_file, b"" if is_file else body[value_at:stop], found is not None


_LINE = re.compile(rb"\r\n|\n|\r")


def _disposition(head: bytes) -> tuple[str | None, bool]:
    """(name, is a file) from a part's head: its first Content-Disposition, lines ended by CRLF,
    LF or CR, the first of each parameter (the dashboard's rule; aiohttp refuses a second)."""
    for line in _LINE.split(head):
        if line[: len(_DISPOSITION)].lower() != _DISPOSITION:
            continue
        params: dict[bytes, bytes] = {}
        for n, m in enumerate(_PARAM_BYTES.finditer(line, len(_DISPOSITION))):
            if n >= MAX_PARAMS:
                break
            value = (m[2] or b"").strip()
            if value[:1] == b'"':
                value = _UNESCAPE.sub(rb"\1", value[1:-1])
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
