"""Exceptions shared across layers.

They exist so that each layer can tell a *user mistake* (one clear sentence, no traceback),
a *passing outage* (retry, never acknowledge) and a *bad record* (dead-letter it) apart.
"""

from __future__ import annotations

import socket


class LlmtapError(Exception):
    """Base class."""


class ConfigError(LlmtapError):
    """A setting is wrong. The message is one sentence naming the setting."""


class BackendUnavailable(LlmtapError):
    """A backend (queue, store, body store, ingest endpoint) cannot be reached right now.

    Raised at start-up it stops the process with its message; raised while running it means
    "retry later": the worker does not acknowledge, the gateway falls back.
    """


class MessageRefused(LlmtapError, ValueError):
    """The queue will not take this message (too large for it): not an outage. The gateway splits
    the batch down to the record at fault and sends that one without its bodies; the worker
    dead-letters a smaller letter instead of retrying one the dead-letter place never takes."""


class QueueMissing(LlmtapError):
    """An `inspect` connection found no such queue: nothing was ever published to it, or the
    setting names the wrong one. Read-only commands create nothing, so they say so instead."""


class TransientError(BackendUnavailable):
    """A handler hit an outage; the whole batch is retried later and nothing is acknowledged."""


class NotDeleted(TransientError):
    """A body store deleted some of the bodies asked and refused `refs` one by one (an object
    lock, a deny policy): retention counts those, and only those, toward giving up."""

    def __init__(self, message: str, refs: list[str]) -> None:
        super().__init__(message)
        self.refs = refs


class RecordError(LlmtapError):
    """This one record cannot be processed (garbage bytes, unknown version, invalid field).

    It goes to the dead-letter place with this message as its reason.
    """


def unknown_host(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it) is a name the DNS says does not exist: a mistyped host,
    not an outage (a resolver that cannot answer right now is EAI_AGAIN, and waits)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, socket.gaierror) and e.errno in (
            socket.EAI_NONAME,
            getattr(socket, "EAI_NODATA", -5),
        ):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False
