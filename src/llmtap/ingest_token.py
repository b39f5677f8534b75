"""The bearer token of `POST /api/v1/ingest`, which every caller must present.

Ingest used to trust loopback in single-tenant mode when no token was set. A reverse proxy on
the same host makes every caller loopback: one `location / { proxy_pass ...; }` let anyone
post records (an outside check posted $12,500 of forged cost). Now there is always a token:
`LLMTAP_INGEST_TOKEN` when set, else one llmtap makes once and keeps in
`<data dir>/ingest.token` (mode 0600). A gateway and a server sharing a data dir (`llmtap up`,
or split processes on one host) both read it; across hosts set `LLMTAP_INGEST_TOKEN` on both,
as before. A gateway without the server's token is refused (401) and spools its records.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from llmtap.config import Settings

log = logging.getLogger("llmtap")

FILE = "ingest.token"


def token_path(settings: Settings) -> Path:
    return settings.data_dir / FILE


def ingest_token(settings: Settings) -> str | None:
    """`LLMTAP_INGEST_TOKEN`, else the data dir's token, made if there is none yet; None when
    the data dir can be neither read nor written (then no caller is let in)."""
    if settings.ingest_token:
        return settings.ingest_token
    path = token_path(settings)
    try:
        return _read(path) or _make(path)
    except OSError as e:
        log.warning("no ingest token: cannot read or make %s (%s); set LLMTAP_INGEST_TOKEN", path, e)
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text("utf-8").strip() or None
    except FileNotFoundError:
        return None


def _make(path: Path) -> str:
    """A new token, written whole before it appears under its name (`link` fails if another
    process made one meanwhile: then that one is read), so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            made = _read(path)
            if made is None:
                raise OSError(f"{path} is empty") from None
            return made
    finally:
        tmp.unlink(missing_ok=True)
    return token
