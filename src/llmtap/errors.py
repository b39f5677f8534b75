"""Exceptions shared across layers.

They exist so that each layer can tell a *user mistake* (one clear sentence, no traceback),
a *passing outage* (retry, never acknowledge) and a *bad record* (dead-letter it) apart.
"""


class LlmtapError(Exception):
    """Base class."""


class ConfigError(LlmtapError):
    """A setting is wrong. The message is one sentence naming the setting."""


class BackendUnavailable(LlmtapError):
    """A backend (queue, store, body store, ingest endpoint) cannot be reached right now.

    Raised at start-up it stops the process with its message; raised while running it means
    "retry later": the worker does not acknowledge, the gateway falls back.
    """


class TransientError(BackendUnavailable):
    """A handler hit an outage; the whole batch is retried later and nothing is acknowledged."""


class RecordError(LlmtapError):
    """This one record cannot be processed (garbage bytes, unknown version, invalid field).

    It goes to the dead-letter place with this message as its reason.
    """
