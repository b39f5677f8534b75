"""Settings: `LLMTAP_*` environment variables, optionally a TOML file given with `--config`.

Every setting has a default so `llmtap up` needs none. Precedence: environment over TOML over
defaults. A wrong value stops start-up with one sentence naming the setting (`load_settings`),
and so does a backend whose driver is not installed (the sentence names the pip extra).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from llmtap.backends import FAMILIES
from llmtap.errors import ConfigError
from llmtap.redact import (
    is_secret_name,
    is_secret_value,
    redact_dsn,
    redact_keys,
    redact_text,
    redact_url,
)

ENV_PREFIX = "LLMTAP_"
#: Backend family by setting name: its URL schemes, classes and extras (`llmtap.backends`).
_FAMILY = {f.setting: f for f in FAMILIES}


class Settings(BaseSettings):
    """All of llmtap's settings. Field name `foo_bar` is variable `LLMTAP_FOO_BAR`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # -- where to listen ---------------------------------------------------------------------
    host: str = "127.0.0.1"
    gateway_port: int = Field(8787, ge=0, le=65535)
    server_port: int = Field(8788, ge=0, le=65535)
    worker_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="`llmtap worker` serves /healthz, /livez and /metrics here (off when unset: several"
        " workers on one host each need their own port)",
    )
    data_dir: Path = Path("./.llmtap")
    allowed_hosts: str | None = Field(
        None,
        description="Host header values the server answers (DNS-rebinding guard), comma-separated; "
        "besides localhost, 127.0.0.1, ::1 and the bind host (always answered); '*' answers any;"
        " '.example.com' a domain",
    )

    # -- upstreams ---------------------------------------------------------------------------
    openai_base_url: str = "https://api.openai.com"
    anthropic_base_url: str = "https://api.anthropic.com"
    gemini_base_url: str = "https://generativelanguage.googleapis.com"
    public_url: str | None = Field(
        None,
        description="the gateway's URL as clients reach it through a proxy in front"
        " (https://llm.example.com/v1proxy): an upstream URL handed to a client points there",
    )
    azure_base_url: str | None = Field(
        None,
        description="the Azure OpenAI resource, e.g. https://myres.openai.azure.com (off until set)",
    )
    upstreams: str | None = Field(
        None, description="named OpenAI-compatible upstreams 'name=url,name2=url2', each at /<name>/..."
    )
    upstream_connect_timeout: float = Field(10.0, gt=0, description="seconds to connect upstream")
    upstream_read_timeout: float = Field(600.0, gt=0, description="seconds between upstream bytes")
    upstream_max_connections: int = Field(1000, ge=1)
    openai_stream_usage: bool = Field(
        True,
        description="ask OpenAI for usage on streams the client did not ask it for, and strip that "
        "extra chunk from what the client receives",
    )
    stream_usage_skip: str | None = Field(
        None,
        description="routes whose upstream sends stream usage unasked (vLLM started with "
        "--enable-force-include-usage), comma-separated: the gateway neither asks for it nor strips "
        "it there (OpenRouter's upstreams are known and skipped without it)",
    )

    # -- backends ----------------------------------------------------------------------------
    queue: str = "sqlite"
    store: str = "sqlite"
    bodies: str = "file"
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    # -- queue behaviour ---------------------------------------------------------------------
    partitions: int = Field(6, ge=1, le=1024, description="partitions of a queue created by llmtap")
    #: What keeps records in order (`partition_by` resolves `auto`). `session_id`: a
    #: conversation's turns in order, every other record spread by its id; `tenant`: one tenant
    #: is one partition (one busy worker).
    partition_key: Literal["auto", "tenant", "session_id", "user_id", "id"] = "auto"

    # -- capture -----------------------------------------------------------------------------
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=0,
        le=64 * 1024 * 1024,  # record.DECODE_LIMIT: what a stored body may decode to
        description="bodies above this are truncated in the log (never in transit)",
    )
    inline_body_bytes: int = Field(
        64 * 1024, ge=0, description="compressed bodies up to this size travel inside the queue message"
    )

    # -- gateway publisher -------------------------------------------------------------------
    publish_batch_size: int = Field(500, ge=1)
    publish_linger_ms: float = Field(
        20.0, ge=0, description="group commit: how long the publisher waits to fill a batch"
    )
    publish_buffer_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    publish_spool_after_ms: float = Field(
        2000.0,
        ge=0,
        description="a batch the queue has not taken in this long goes to the disk spool too"
        " (a hung broker must not keep records in memory only); 0: never",
    )
    shutdown_timeout: float = Field(30.0, gt=0, description="seconds to drain on SIGTERM")
    header_timeout: float = Field(
        60.0, gt=0, description="seconds a client has to send a request's headers (slow-client guard)"
    )
    client_stall_timeout: float = Field(
        120.0,
        gt=0,
        description="seconds a client may read nothing of an answer while more waits for it; then it is"
        " cut off (it held an upstream connection for ever)",
    )
    ingest_url: str | None = Field(
        None, description="fallback: the llmtap server's base URL; default http://HOST:SERVER_PORT"
    )
    ingest_token: str | None = Field(None, description="bearer token for POST /api/v1/ingest")
    spool_max_bytes: int = Field(1024 * 1024 * 1024, ge=1024)

    # -- worker ------------------------------------------------------------------------------
    worker_batch_size: int = Field(500, ge=1)
    worker_linger_ms: float = Field(
        # Each batch costs ~3.5 ms of CPU whatever its size (bench/steady_rate.py): at 50 ms, a
        # worker at 100 req/s spent a third of its CPU on batches of 5.
        200.0,
        ge=0,
        description="after a small batch, wait this long so the next one is bigger",
    )
    worker_max_attempts: int = Field(5, ge=1, description="tries of a failing record before dead-letter")
    worker_defer_s: float = Field(
        10.0,
        ge=0,
        description="llmtap up: seconds the worker may wait while the gateway's requests keep it busy",
    )
    worker_pipeline: int = Field(
        2, ge=1, le=16, description="batches in flight: the next batch's handlers run while one is written"
    )
    retention_days: int | None = Field(None, ge=1)
    search_bytes: int = Field(
        32 * 1024,
        ge=0,
        le=1024 * 1024,
        description="UTF-8 bytes of request and response text indexed per record for q= search; 0: none",
    )
    search_scope: Literal["request", "turn"] = Field(
        "request",
        description="what of a request q= searches: all of it, or only the turn it adds to its"
        " conversation (earlier messages resent with it are not indexed again)",
    )
    rollup_properties: str = Field(
        "",
        description="comma-separated property names rolled up for fast stats (e.g. feature,env);"
        " properties with few values only (not an id per request or per user);"
        " every worker must use the same list",
    )
    otlp_content: bool = Field(
        False, description="exported spans carry the messages too (OTEL_EXPORTER_OTLP_ENDPOINT set)"
    )
    webhook_url: str | None = Field(None, description="one webhook endpoint without the CLI")
    webhook_secret: str | None = Field(None, description="its whsec_ secret (generated if unset)")
    webhook_allow_private: bool = Field(
        False, description="allow endpoints on loopback, link-local or private addresses"
    )
    webhook_disable_after_s: float = Field(
        3 * 86400.0, gt=0, description="an endpoint failing this long is disabled"
    )
    webhook_max_backoff_s: float = Field(
        60.0, gt=0, description="longest wait between probes of a failing endpoint"
    )
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_concurrency: int = Field(8, ge=1, description="requests in flight per endpoint")
    alert_interval_s: float = Field(
        60.0, ge=1, le=3600, description="how often `llmtap server` evaluates the alert rules"
    )
    alert_resolve_after_s: float = Field(
        300.0, ge=0, le=86400, description="a firing alert resolves once clear this long"
    )
    webhook_body_bytes: int = Field(
        64 * 1024, ge=0, description="--include-bodies: each body's text in a payload is cut to this"
    )
    webhook_keep_days: float = Field(
        7.0, gt=0, description="delivered and given-up deliveries stay in the delivery log this long"
    )
    webhook_max_rejections: int = Field(
        5, ge=1, description="attempts before an event a working receiver keeps refusing (4xx) is given up"
    )

    # -- tenants -----------------------------------------------------------------------------
    multi_tenant: bool = False
    default_tenant: str = "default"

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object a line on stderr, for Loki, Datadog, CloudWatch"
    )

    @field_validator("queue", "store", "bodies")
    @classmethod
    def _check_backend(cls, v: str, info: ValidationInfo) -> str:
        family = _FAMILY[info.field_name or ""]
        backend = family.find(v)
        if backend is None:
            raise ValueError(family.expected)
        if backend.embedded:
            return v
        v = _check_network_url(v, host=backend.host)
        if info.field_name == "bodies" and "@" in urlsplit(v).netloc:
            raise ValueError(
                f"{redact_url(v)!r}: s3://bucket/prefix takes no credentials; set "
                "LLMTAP_S3_ACCESS_KEY_ID and LLMTAP_S3_SECRET_ACCESS_KEY (or AWS_*) instead"
            )
        return v

    @field_validator("host")
    @classmethod
    def _check_host(cls, v: str) -> str:
        if not v.strip():  # an empty variable (a compose file's `LLMTAP_HOST=`) bound every address
            raise ValueError("is empty: name an address to listen on (127.0.0.1, or 0.0.0.0 for every one)")
        return v.strip()

    @field_validator("data_dir", mode="before")
    @classmethod
    def _check_data_dir(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():  # `Path("")` is the current directory
            raise ValueError("is empty: name a directory (the default is ./.llmtap)")
        return v

    @field_validator("rollup_properties")
    @classmethod
    def _check_rollup_properties(cls, v: str) -> str:
        names = [n.strip().lower() for n in v.split(",") if n.strip()]
        return ",".join(dict.fromkeys(names))

    @property
    def rollup_property_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.rollup_properties.split(",") if n)

    @field_validator("ingest_url", "webhook_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        return None if v is None else _check_http_url(v)

    @field_validator(
        "openai_base_url",
        "anthropic_base_url",
        "gemini_base_url",
        "azure_base_url",
        "s3_endpoint",
        "public_url",
    )
    @classmethod
    def _check_base_url(cls, v: str | None, info: ValidationInfo) -> str | None:
        why = {
            "s3_endpoint": "set LLMTAP_S3_ACCESS_KEY_ID and LLMTAP_S3_SECRET_ACCESS_KEY (or AWS_*) instead",
            "public_url": "it is handed to every client",
        }.get(info.field_name or "")
        return None if v is None else _check_http_url(v, base=True, credentials=why)

    @field_validator("upstreams")
    @classmethod
    def _check_upstreams(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        parse_upstreams(v)
        return v

    @field_validator("stream_usage_skip")
    @classmethod
    def _check_stream_usage_skip(cls, v: str | None) -> str | None:
        for name in (v or "").split(","):
            name = name.strip()
            if name and not _ROUTE_NAME_RE.match(name):
                shown = redact_dsn(name)  # a URL pasted here may hold a password (rev23)
                raise ValueError(
                    f"{shown!r} is not a route name (openai, azure, or a name from LLMTAP_UPSTREAMS)"
                )
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, v: str | None) -> str | None:
        if v is None:
            return v
        names = [n.strip() for n in v.split(",")]
        for n in names:
            if not n or not (n == "*" or _HOST_RE.match(n)):
                raise ValueError(
                    "must be a comma-separated list of host names or IP addresses without port"
                    " ('*' for any, '.example.com' for a domain and its subdomains)"
                )
        return ",".join(names)

    # -- derived -----------------------------------------------------------------------------
    @property
    def allowed_host_names(self) -> frozenset[str]:
        """Lowercase `Host` names the server answers; `*` in it means any.

        Loopback names and the bind host are always in it: a gateway on the same machine posts
        its fallback records to `http://<bind host>:<port>` (`effective_ingest_url`), and no
        DNS-rebinding page can send a `Host` that is not its own domain name."""
        own = {"localhost", "127.0.0.1", "::1", normalize_host(self.host)}
        if self.allowed_hosts is not None:
            return frozenset(own | {normalize_host(n) for n in self.allowed_hosts.split(",")})
        return frozenset(own)

    @property
    def partition_by(self) -> str:
        """`LLMTAP_PARTITION_KEY`, `auto` resolved: `session_id` where workers scale out (Kafka,
        Redis, SQS: every worker gets partitions with work), `tenant` on the embedded SQLite
        queue, whose one worker writes one SQLite file: records in one partition make whole
        batches, which cost `llmtap up` 7-10% less CPU than batches cut over six (bench/README)."""
        if self.partition_key != "auto":
            return self.partition_key
        return "tenant" if self.queue.split(":", 1)[0] == "sqlite" else "session_id"

    @property
    def stream_usage_routes_skipped(self) -> frozenset[str]:
        """`LLMTAP_STREAM_USAGE_SKIP` as a set of route names."""
        return frozenset(n.strip() for n in (self.stream_usage_skip or "").split(",") if n.strip())

    @property
    def upstream_map(self) -> dict[str, str]:
        """`LLMTAP_UPSTREAMS` as name → base URL (validated at start-up)."""
        return parse_upstreams(self.upstreams) if self.upstreams else {}

    @property
    def effective_ingest_url(self) -> str:
        return self.ingest_url or f"http://{self.host}:{self.server_port}"

    def describe(self) -> dict[str, str]:
        """Backends in words, for start-up banners (no credentials)."""
        return {
            "queue": redact_dsn(self.queue),
            "store": redact_dsn(self.store),
            "bodies": redact_dsn(self.bodies),
            "data dir": str(self.data_dir.resolve()),
        }

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Command-line flags win over the environment, which wins over the TOML file's values
        # (the init kwargs): a flag typed now must beat an old LLMTAP_DATA_DIR in the shell.
        return (_FlagSource(settings_cls), env_settings, init_settings)


#: The command-line flags of the `load_settings` call in progress.
_FLAGS: ContextVar[Mapping[str, Any] | None] = ContextVar("llmtap_flags", default=None)


class _FlagSource(PydanticBaseSettingsSource):
    """The settings given as command-line flags, the first source asked."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_FLAGS.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FLAGS.get() or {})


#: A host name (letters, digits, '-', '.', '_'), an IPv4 or a bare or bracketed IPv6 address.
_HOST_RE = re.compile(
    r"^(\.?[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?|\[?[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\]?)$"
)


#: A route name: what follows the first `/` of a gateway path.
_ROUTE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: First path segments the gateway answers itself, so no upstream may take them.
_RESERVED_ROUTES = frozenset({"healthz", "livez", "metrics", "api", "static"})


def _routes_known(settings: Settings) -> Settings:
    """Settings naming routes must name OpenAI-shaped ones that exist: a typo (`vlm`) was taken
    and the route went on stripping what its upstream sends."""
    shaped = {"openai", "azure", *settings.upstream_map}
    for name in sorted(settings.stream_usage_routes_skipped - shaped):
        raise ConfigError(
            f"invalid setting LLMTAP_STREAM_USAGE_SKIP: {name!r} is not an OpenAI-shaped route "
            f"(openai, azure, or a name from LLMTAP_UPSTREAMS: {', '.join(sorted(shaped))})"
        )
    return settings


def parse_upstreams(value: str) -> dict[str, str]:
    """`name=url,name2=url2` → {name: url}; raises ValueError with one sentence on any mistake."""
    from llmtap.providers import BUILTIN  # providers import this module's Settings for types

    out: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, url = item.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not name or not url:
            raise ValueError(f"entry {redact_dsn(item)!r} is not name=url")
        if not _ROUTE_NAME_RE.match(name):
            raise ValueError(
                f"upstream name {redact_dsn(name)!r} must be lowercase letters, digits, '-' or '_' "
                "(it becomes a route: /<name>/...)"
            )
        if name in BUILTIN or name in _RESERVED_ROUTES:
            raise ValueError(f"upstream name {name!r} is taken by llmtap's own /{name}/ route")
        if name in out:
            raise ValueError(f"upstream name {name!r} is given twice")
        try:
            out[name] = _check_http_url(url, base=True)
        except ValueError as e:
            if "@" in value and "@" not in url:
                # A password holding a `,` was cut there: what is left of it reads as a port,
                # and would be shown (rev23: `https://user:pa` of `user:pa,ss@h`).
                raise ValueError(
                    f"upstream {name!r}: its URL is not valid where the list is cut at a ','"
                    " (a ',' in a password is written %2C)"
                ) from None
            raise ValueError(f"upstream {name!r}: {e}") from None
    if not out:
        raise ValueError("must list at least one name=url")
    return out


def _masked(value: Any) -> Any:
    """A setting's value with the password of each URL in it masked (`redact_dsn`): a string,
    or the strings of a list a config file gave where one was expected."""
    if isinstance(value, str):
        return redact_dsn(value)
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def _check_http_url(v: str, *, base: bool = False, credentials: str | None = None) -> str:
    """An http(s) URL, trailing `/` dropped. A `base` (an upstream, the S3 endpoint) carries
    no credentials and no query: requests are built on it and their errors quote it, so a
    password or key in it would end up in records and messages; send credentials as headers.
    Messages never show the URL's password."""
    v = v.strip()  # a trailing newline from a mounted secret or `$(cat file)`
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as e:
        raise ValueError(f"{redact_dsn(v)!r} is not a valid URL ({_url_error(e)})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {redact_dsn(v)!r}")
    if base and "@" in v.partition("://")[2]:  # `u:2024/pw@h` reads as host `u`, port 2024 (rev24)
        raise ValueError(
            f"must not hold credentials (user:password@), got {redact_dsn(v)!r}: "
            + (credentials or "the client's own Authorization / api-key headers go upstream unchanged")
        )
    if base and (parts.query or parts.fragment):
        raise ValueError(f"must not have a query or fragment, got {redact_dsn(v)!r}")
    at = parts.query.find("@")
    if parts.fragment or (at >= 0 and "=" not in parts.query[:at]):
        # What follows `#` never reaches the server, and `user:2024#pass@host` or `?pass@host`
        # is a password the URL reads as a port and a fragment: requests went to host `user`,
        # and their errors printed the password whole (rev20).
        raise ValueError(
            f"must not have a fragment or an '@' in its query, got {redact_dsn(v)!r}"
            " (a '#', '?' or '@' in a password is written %23, %3F, %40)"
        )
    if any(c.isspace() or not c.isprintable() for c in v):  # sent as is in every request line
        raise ValueError(f"must not hold spaces or control characters, got {redact_dsn(v)!r}")
    return v.rstrip("/")


def _url_error(e: ValueError) -> str:
    """What urllib found wrong, without quoting it: its text quotes the part it read as a port,
    which is a password's head when the password holds a raw `#`, `?` or `/`."""
    text = str(e)
    if text.startswith("Port could not be cast"):
        return "a port is not a number; a password holding @ : / ? # must be percent-encoded"
    if text.startswith("Port out of range"):
        return "its port is out of range"
    return "its host is malformed"


def normalize_host(name: str) -> str:
    """`Example.COM.` → `example.com`, `[::1]` → `::1`: the form `Host` names are compared in."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name.rstrip(".") if name not in (".", "") else name


def _check_network_url(v: str, *, host: bool = True) -> str:
    """A backend URL must parse (brackets, port) at start-up: a typo is a wrong setting, stopped
    with one sentence, while an unreachable host is an outage the services wait out."""
    try:
        parts = urlsplit(v)
        hosts = parts.netloc.rpartition("@")[2]
        for one in hosts.split(",") if "," in hosts else [None]:  # `kafka://h1:9092,h2:9092/t`
            (parts if one is None else urlsplit("//" + one)).port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"{redact_dsn(v)!r} is not a valid URL ({_url_error(e)})") from None
    if host and not parts.netloc:
        raise ValueError(f"{redact_dsn(v)!r} names no host")
    return v


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def misspelled_variables(environ: Mapping[str, str]) -> list[str]:
    """`LLMTAP_QUEU is not a setting (did you mean LLMTAP_QUEUE?)` for each variable that is
    no setting but close to one: the environment, unlike the TOML file, may hold other tools'
    `LLMTAP_*` variables (`scripts/services.sh` ports), so only near misses are named."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {"LLMTAP_CONFIG"}
    out = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known and not name.startswith("LLMTAP_TEST_"):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
            if close:
                out.append(f"{name} is not a setting (did you mean {close[0]}?); it is ignored")
    return out


def load_settings(
    config_file: str | Path | None = None, *, drivers: bool = True, **overrides: Any
) -> Settings:
    """Build settings from the TOML file, the environment and command-line flags (`overrides`),
    each winning over the one before.

    Raises `ConfigError` with one sentence naming the first bad setting, or (`drivers`) a
    network backend whose driver is not installed (`require_drivers`).
    """
    file_values: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # a setting's name as the file wrote it
    if config_file is not None:
        path = Path(config_file)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text (TOML files are)") from None
        except OSError as e:  # a directory, no permission, a symlink loop
            raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
        # Accept both `gateway_port = 1` and `LLMTAP_GATEWAY_PORT = 1` spellings.
        for key, value in raw.items():
            if key.upper().startswith("OTEL_"):
                # The OpenTelemetry SDK's own settings (endpoint, headers, ...): it reads them from
                # the environment, which wins over the file as it does for ours.
                os.environ.setdefault(key.upper(), str(value))
                continue
            name = key.lower().removeprefix(ENV_PREFIX.lower())
            file_values[name] = value
            spelled[name] = key
    flags = _FLAGS.set({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = _routes_known(Settings(**file_values))
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            key = spelled.get(field, field)
            close = difflib.get_close_matches(field, list(Settings.model_fields), n=1, cutoff=0.8)
            hint = ""
            if close:
                hint = f" (did you mean {ENV_PREFIX + close[0].upper() if key.isupper() else close[0]}?)"
            raise ConfigError(f"unknown setting {key!r} in config file {config_file}{hint}") from None
        value = _masked(value)  # a URL's password must not reach the terminal or a log
        # Shown with every credential rule (rev20: a list's URLs were shown whole).
        shown = ""
        if value is not None and not isinstance(value, dict):
            shown = f" (got {redact_text(repr(value))})"
        if is_secret_name(field):
            shown = ""  # a token or secret of the wrong type is still a secret
        elif isinstance(value, str) and is_secret_value(value):  # a key pasted into another setting
            shown, msg = " (a credential: not shown)", msg.replace(value, "***")
        if isinstance(value, str) and (value in msg or "got '" in msg):
            shown = ""  # the message names it (or the part of it at fault) already
        # A key anywhere in it (a list setting quotes its parts; a value with a space or quotes
        # around it is no key's shape as a whole: rev18a) is masked where it stands.
        raise ConfigError(f"invalid setting {_env_name(field)}: {redact_keys(msg + shown)}") from None
    finally:
        _FLAGS.reset(flags)
    if drivers:
        require_drivers(settings)
    return settings


def require_drivers(settings: Settings) -> None:
    """A network backend whose extra is not installed: say which, before anything starts.

    The services check every backend; an admin command only the one it opens (opening it says
    the same sentence): `llmtap keys` on a host with the PostgreSQL extra alone, beside a
    Kafka queue it never touches, refused to run."""
    for family in FAMILIES:
        url = getattr(settings, family.setting)
        family.backend(url).require(family.env, url)
