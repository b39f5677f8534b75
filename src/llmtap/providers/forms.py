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

#: `boundary=` of a content type, quoted (anything but a quote) or not (up to `;`).
_BOUNDARY = re.compile(r'(?i)(?:^|[;\s])boundary\s*=\s*(?:"([^"]*)"|([^;]*))')
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
    found = _BOUNDARY.search(content_type)
    if found is None:
        return None
    value = (found.group(1) if found.group(1) is not None else found.group(2)).strip()
    try:
        return value.encode("utf-8", "surrogateescape") if value else None
    except UnicodeEncodeError:  # a lone surrogate no byte stands for: no body holds it
        return None


def form_parts(data: bytes, boundary: bytes) -> Iterator[tuple[str | None, bool, bytes]]:
    """(field name, whether it is a file, value) of each part of a multipart body, in order.

    A part's head is read line by line: `name` quoted or not (RFC 7578 allows a token: .NET's
    `HttpClient` sends `name=model`), `name*=` in RFC 8187 form; a part with `filename` or
    `filename*` is a file, whatever the letters' case, and its value is not copied (b"").
    A part without a Content-Disposition has no name. The value is the part's bytes up to the
    next delimiter (its line end, which belongs to the delimiter, left out)."""
    body = b"\r\n" + data
    delimiter = b"\r\n--" + boundary
    pos = body.find(delimiter)
    for _ in range(MAX_PARTS):
        if pos < 0:
            return
        start = pos + len(delimiter)
        pos = body.find(delimiter, start)
        stop = len(body) if pos < 0 else pos
        end = body.find(b"\r\n\r\n", start, min(stop, start + MAX_HEAD + 4))
        if end < 0:  # the closing `--`, or a head too long to be one
            continue
        name, is_file = _disposition(body[start:end])
        yield name, is_file, b"" if is_file else body[end + 4 : stop]


def _disposition(head: bytes) -> tuple[str | None, bool]:
    for line in head.split(b"\r\n"):
        if line[: len(_DISPOSITION)].lower() != _DISPOSITION:
            continue
        name: str | None = None
        is_file = False
        for param in line[len(_DISPOSITION) :].split(b";")[1:]:
            key, _, value = param.partition(b"=")
            key = key.strip().lower()
            if key in (b"filename", b"filename*"):
                is_file = True
            elif key == b"name":
                value = value.strip()
                if value[:1] == b'"':
                    value = value[1:-1] if value.endswith(b'"') and len(value) > 1 else value[1:]
                name = value.decode("utf-8", "replace")
            elif key == b"name*" and name is None:  # `UTF-8''model`: charset'language'value
                charset, _, rest = value.strip().partition(b"'")
                _, quote, rest = rest.partition(b"'")
                if quote and charset.lower() in (b"utf-8", b"us-ascii"):
                    name = unquote_to_bytes(rest).decode("utf-8", "replace")
        return name, is_file
    return None, False
