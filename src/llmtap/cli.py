"""The `llmtap` command line.

`llmtap up` runs everything on embedded defaults; `gateway`, `worker` and `server` run one part
each for scaled-out deployments; `status`, `keys`, `webhooks`, `alerts` and `dlq` are operations.
Settings come from `LLMTAP_*` variables or `--config FILE.toml`; a bad one stops start-up with
one sentence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from llmtap import __version__
from llmtap.config import Settings, load_settings, misspelled_variables, require_drivers
from llmtap.errors import LlmtapError

if TYPE_CHECKING:
    from llmtap.bodies.base import BodyStore
    from llmtap.cooperate import Foreground
    from llmtap.gateway.app import GatewayService
    from llmtap.queue.base import DeadLetter, Queue, Role
    from llmtap.store.base import ApiKey, Store
    from llmtap.webhooks.outbox import Endpoint

T = TypeVar("T")
B = TypeVar("B", "Store", "Queue", "BodyStore")

EPILOG = """\b
Examples:
  llmtap up                                   # everything, embedded (SQLite + files in ./.llmtap)
  LLMTAP_QUEUE=kafka://127.0.0.1:9092/llmtap llmtap gateway
  LLMTAP_QUEUE=redis://127.0.0.1:6379/0 LLMTAP_STORE=postgresql://u:p@db/llmtap llmtap worker
  LLMTAP_QUEUE=sqs://llmtap.fifo AWS_REGION=eu-west-1 llmtap worker
  llmtap status

\b
Point your SDK at the gateway:
  OpenAI(base_url="http://127.0.0.1:8787/openai/v1")
  Anthropic(base_url="http://127.0.0.1:8787/anthropic")
"""


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    """The settings, or exit 2 with one sentence naming the bad one."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given and "settings" in ctx.obj:
        return cast(Settings, ctx.obj["settings"])
    flags = {"data_dir": ctx.obj.get("data_dir"), **given}  # `--data-dir` of an admin command
    try:
        settings = load_settings(ctx.obj.get("config"), drivers=False, **flags)  # each command's own
    except LlmtapError as e:
        _fail(str(e))
    if "settings" not in ctx.obj:
        for line in misspelled_variables(os.environ):
            click.echo(f"llmtap: warning: {line}", err=True)
    if not given:
        ctx.obj["settings"] = settings  # a command asks more than once (tenant, missing files)
    return settings


def _make_data_dir(settings: Settings) -> None:
    """Create the data dir, or exit 2 with one sentence (a path under /proc, or a file) that
    names it whole (the default `.llmtap` is relative to a working directory the user may not know)."""
    where = os.path.abspath(settings.data_dir)
    try:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        why = "a file is in the way" if isinstance(e, FileExistsError) else e.strerror
        _fail(f"invalid setting LLMTAP_DATA_DIR: cannot create {where!r}: {why}")
    probe = settings.data_dir / f".llmtap-write-{os.getpid()}"
    try:  # queues, stores and the spool all write here: say so now, not as "unable to open database file"
        probe.touch()
        probe.unlink()
    except OSError as e:
        _fail(f"invalid setting LLMTAP_DATA_DIR: cannot write in {where!r}: {e.strerror}")


def _fail(message: str, code: int = 2) -> Any:
    click.echo(f"llmtap: {message}", err=True)
    sys.exit(code)


def _found(result: T, what: str) -> T:
    """The command's target exists, or exit 1 with one sentence ("no endpoint 'ep_1'")."""
    if not result:
        _fail(f"no {what}", 1)
    return result


def _shown(text: str) -> str:
    """Stored text on one line of a listing: no terminal escapes, no line breaks (a poison
    letter's fields, a key's name are anyone's bytes)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


#: C0 and C1 control characters and the bidirectional overrides and isolates: stored values (a
#: user id sent with `ESC [2J`, or U+202E reversing the rest of the line) are shown escaped,
#: never written to the terminal raw (unicode check: `alerts list` cleared the screen).
_CONTROLS = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))},
    **{c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))},
}


def _listing(rows: Sequence[T], line: Callable[[T], str], empty: str) -> None:
    """One line per row on stdout, or `empty` on stderr (a script reading stdout sees nothing)."""
    for row in rows:
        click.echo(line(row).translate(_CONTROLS))
    if not rows:
        click.echo(empty, err=True)


def _run(coro_fn: Callable[[], Awaitable[T]], *, serving: bool = False) -> T:
    if serving:
        from llmtap.runtime import install_uvloop

        # Only for the services: uvloop retries its wait when a signal interrupts it, so a
        # Ctrl-C reached an admin command only once its current call returned (a locked store:
        # 10 s), and then raced that call's own error. The services set their own handlers.
        install_uvloop()
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except LlmtapError as e:
        _fail(str(e))
        raise  # unreachable
    except KeyboardInterrupt:
        if serving:  # pragma: no cover - its signal handlers normally catch it first
            return None  # type: ignore[return-value]
        # A command cut short: say so, and exit as a shell's Ctrl-C does (what was done is done).
        return _fail("interrupted (Ctrl-C): the command may have done part of its work", 130)  # type: ignore[no-any-return]


def _run_with(ctx: click.Context, fn: Callable[[Settings], Awaitable[T]], *, create: bool = False) -> T:
    """The one way a command runs: settings (a bad one: one sentence), then `fn` on an event
    loop (a backend error: one sentence). `create` makes the data dir first."""
    settings = _settings(ctx)
    if create:
        _make_data_dir(settings)
    return _run(lambda: fn(settings))


@contextlib.asynccontextmanager
async def _connected(backend: B, role: Role = "producer") -> AsyncIterator[B]:
    """A store, a body store, or a queue (as producer, or `inspect`: creating nothing),
    connected for the length of one command."""
    from llmtap.queue.base import Queue

    await (backend.connect(role) if isinstance(backend, Queue) else backend.connect())
    try:
        yield backend
    finally:
        await backend.close()


def _serve(settings: Settings, title: str, parts: list[str]) -> None:
    from llmtap.runtime import Service, SharedBackends, raise_fd_limit, run_services, setup_logging

    try:
        require_drivers(settings)  # every backend's: a service may open any of them
    except LlmtapError as e:
        _fail(str(e))
    setup_logging(settings.log_level, settings.log_format)
    _make_data_dir(settings)
    raise_fd_limit()

    async def main() -> int:
        # One store, one body store, one handler chain for every part of this process; started
        # first, so it is stopped last, once nothing uses it any more.
        shared = SharedBackends(settings)
        services: list[Service] = [shared]
        # Start order: consumers and API first, the gateway last, so that it accepts traffic only
        # once everything behind it is ready; stop order is the reverse (gateway flushes first).
        gateway = None
        if "gateway" in parts:
            from llmtap.gateway.app import GatewayService

            gateway = GatewayService(settings, backends=shared)
        if "worker" in parts:
            from llmtap.worker.worker import WorkerService

            foreground = _foreground(settings, gateway)
            worker = WorkerService(settings, backends=shared, foreground=foreground)
            services.append(worker)
            if parts == ["worker"] and settings.worker_port is not None:
                from llmtap.worker.probe import WorkerProbe

                services.append(WorkerProbe(settings, worker))
        if "server" in parts:
            from llmtap.alerts.evaluator import AlertService
            from llmtap.server.app import ServerService
            from llmtap.webhooks.deliverer import DelivererService

            services.append(ServerService(settings, backends=shared))
            services.append(DelivererService(settings, backends=shared))
            services.append(AlertService(settings, backends=shared))
        if gateway is not None:
            services.append(gateway)
        return await run_services(settings, title, services)

    sys.exit(_run(main, serving=True))


def _foreground(settings: Settings, gateway: GatewayService | None) -> Foreground | None:
    """The gateway's requests, for a worker sharing their event loop (`llmtap up`) to let go first."""
    if gateway is None or settings.worker_defer_s <= 0:
        return None
    from llmtap.cooperate import Foreground

    publisher = gateway.publisher
    return Foreground(lambda: publisher.submitted, settings.worker_defer_s)


_data_dir_option = click.option(
    "--data-dir", type=click.Path(path_type=Path), help="Embedded data (LLMTAP_DATA_DIR)."
)


def _listen_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return _data_dir_option(click.option("--host", help="Address to bind (LLMTAP_HOST).")(f))


def _port_option(part: str, label: str, default: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    env = f"LLMTAP_{part.upper()}_PORT"
    return click.option(f"--{part}-port", type=int, help=f"{label} ({env}, default {default}).")


class _Group(click.Group):
    """Commands listed in the order they are defined: running llmtap first, then operations."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(
    cls=_Group,
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="LLMTAP_CONFIG",
    help="TOML file with settings (same keys as the LLMTAP_* variables).",
)
@click.version_option(__version__, prog_name="llmtap")
@click.pass_context
def cli(ctx: click.Context, config: Path | None) -> None:
    """llmtap: an LLM observability gateway that logs every request without slowing it down."""
    from llmtap.runtime import quiet_libraries

    quiet_libraries()
    # Everything llmtap writes holds prompts, answers or secrets (the stores, the queue, body
    # files, the spool): readable by its own user only, whatever the caller's umask
    # (the deploy audit: store.db and its WAL were 0644, read by `nobody`).
    os.umask(os.umask(0o077) | 0o077)
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


def _serving(title: str, parts: list[str], short_help: str, doc: str, *options: Callable[[Any], Any]) -> None:
    """Add a command that runs `parts` in this process; the four differ only in these."""

    def command(ctx: click.Context, /, **overrides: Any) -> None:
        _serve(_settings(ctx, **overrides), title, parts)

    command.__doc__ = doc
    f: Any = click.pass_context(command)
    for option in reversed(options):
        f = option(f)
    cli.command(title, short_help=short_help)(f)


_serving(
    "up", ["worker", "server", "gateway"],
    "Run everything in one process (embedded defaults).",
    "Run gateway, log worker, API and dashboard in one process (embedded defaults).",
    _listen_options, _port_option("gateway", "Gateway port", 8787),
    _port_option("server", "API + dashboard port", 8788),
)  # fmt: skip
_serving(
    "gateway", ["gateway"],
    "Run the proxy alone (stateless, scale out).",
    "Run the proxy alone (stateless: run many behind a load balancer).",
    _listen_options, _port_option("gateway", "Port", 8787),
)  # fmt: skip
_serving(
    "worker", ["worker"],
    "Run a log worker (run many: one consumer group).",
    "Run a log worker alone (run many: they share the queue's partitions).",
    _data_dir_option,
    click.option("--worker-port", type=int,
                 help="Serve /healthz, /livez and /metrics on this port (LLMTAP_WORKER_PORT, default off)."),
)  # fmt: skip
_serving(
    "server", ["server"],
    "Run the query API, dashboard and ingest endpoint.",
    "Run the query API, the dashboard and the fallback ingest endpoint.",
    _listen_options, _port_option("server", "Port", 8788),
)  # fmt: skip


@cli.command(short_help="Show queue lag, dead letters and spool size.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show queue lag per partition, dead-letter count and spool size."""

    async def main(settings: Settings) -> dict[str, Any]:
        from llmtap.errors import BackendUnavailable, QueueMissing
        from llmtap.gateway.sinks import HELD_RETRY, WHOLE_WAIT
        from llmtap.gateway.spool import spool_dir, spool_held, spool_size, spool_unreadable
        from llmtap.queue import open_queue
        from llmtap.queue.base import embedded_queue_path

        # Every key in every case, so scripts reading the JSON (and the table below) never miss one.
        info: dict[str, Any] = {
            "queue": settings.queue,
            "reachable": True,
            "error": None,
            "waiting": None,
            "in_flight": None,
            "notes": [],
            "missing": False,
        }
        info["spool_bytes"] = spool_size(settings)  # the spool matters most when the queue is down
        info["spool_held_bytes"] = spool_held(settings)
        if info["spool_held_bytes"]:  # the queue refused them: they wait for the ingest endpoint
            info["notes"].append(
                f"{info['spool_held_bytes']} of the spool's bytes are records the queue refused "
                f"(too large for it): they wait for the ingest endpoint (LLMTAP_INGEST_URL), tried "
                f"every {HELD_RETRY:.0f} s; {WHOLE_WAIT / 60:.0f} min after a gateway first tried one, it "
                f"goes without its bodies and headers"
            )
        info["ingest"] = await _ingest_status(settings)
        info["spool_unreadable_bytes"] = spool_unreadable(settings)
        if info["spool_unreadable_bytes"]:  # a disk error cost records: say where their bytes are
            info["notes"].append(
                f"{info['spool_unreadable_bytes']} unreadable spool bytes (their records are lost) "
                f"kept in {spool_dir(settings) / 'corrupt'}; delete them once looked at"
            )
        if _queue_missing(settings, say=False):  # no llmtap ever ran on this data dir: create nothing
            where = embedded_queue_path(settings)
            info.update(reachable=False, missing=True, lag=None, partitions=[], dead_letters=None)
            info["error"] = (
                f"no queue file {where}: no llmtap ran with this data dir (set --data-dir or LLMTAP_DATA_DIR)"
            )
            return info
        q = open_queue(settings)
        info["queue"] = q.description or settings.queue
        try:
            async with _connected(q, "inspect"):
                st = await q.status()
        except (BackendUnavailable, QueueMissing) as e:
            info.update(reachable=False, error=str(e), lag=None, partitions=[], dead_letters=None)
            info["missing"] = isinstance(e, QueueMissing)
            return info
        info.update(
            lag=st.lag,
            partitions=[{"partition": p.partition, "lag": p.lag, "owner": p.owner} for p in st.partitions],
            dead_letters=st.dead_letters,
            waiting=st.waiting,
            in_flight=st.in_flight,
            notes=[*info["notes"], *st.notes],
        )
        return info

    info = _run_with(ctx, main)
    ingest = info["ingest"]
    # Exit 1 when records cannot be taken: the queue is unreachable, or the server's ingest
    # file is (its endpoint answers 503, so a gateway whose queue is down spools).
    failing = not info["reachable"] or bool(ingest and ingest["error"])
    if as_json:
        click.echo(json.dumps(info, indent=2))
        if failing:
            sys.exit(1)  # like the table form: scripts can test the exit code alone
        return
    said_ingest = None
    if ingest and ingest["error"]:
        said_ingest = f"ingest        UNREADABLE (the server's ingest answers 503): {ingest['error']}"
    elif ingest and (ingest["lag"] or ingest["dead_letters"]):
        said_ingest = (
            f"ingest        {ingest['lag']} record(s) posted to this data dir's server, not yet stored; "
            f"{ingest['dead_letters']} dead letter(s) (LLMTAP_QUEUE=sqlite:{ingest['path']} llmtap dlq list)"
        )
    click.echo(f"queue         {info['queue']}")
    if not info["reachable"]:
        click.echo(f"              {'MISSING' if info.get('missing') else 'UNREACHABLE'}: {info['error']}")
        click.echo(f"spool         {info['spool_bytes']} bytes waiting on local disk")
        if said_ingest:
            click.echo(said_ingest)
        for note in info["notes"]:
            click.echo(f"note          {note}")
        sys.exit(1)
    click.echo(f"lag           {info['lag']} record(s) not yet stored")
    if info["waiting"] is not None:
        click.echo(
            f"  waiting {info['waiting']}, in flight {info['in_flight']} (received, not yet acknowledged)"
        )
    for p in info["partitions"]:
        click.echo(f"  partition {p['partition']:>3}  lag {p['lag']:>8}  owner {p['owner'] or '-'}")
    click.echo(f"dead letters  {info['dead_letters']}")
    click.echo(f"spool         {info['spool_bytes']} bytes waiting on local disk")
    if said_ingest:
        click.echo(said_ingest)
    for note in info["notes"]:
        click.echo(f"note          {note}")
    if failing:
        sys.exit(1)


async def _ingest_status(settings: Settings) -> dict[str, Any] | None:
    """The server's ingest queue in this data dir (records gateways posted while theirs was
    down), or None when no server took ingest here."""
    from llmtap.errors import BackendUnavailable
    from llmtap.queue.sqlite import SQLiteQueue
    from llmtap.server.ingest import PARTITIONS, ingest_queue_path

    path = ingest_queue_path(settings)
    if not path.exists():
        return None
    try:
        async with _connected(SQLiteQueue(str(path), partitions=PARTITIONS), "inspect") as q:
            st = await q.status()
    except BackendUnavailable as e:  # what the server cannot open either: its ingest answers 503
        return {"path": str(path), "lag": None, "dead_letters": None, "error": str(e)}
    return {"path": str(path), "lag": st.lag, "dead_letters": st.dead_letters, "error": None}


# -- keys ---------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Manage tenants' API keys (multi-tenant mode)."""


def _queue_missing(settings: Settings, say: bool = True) -> bool:
    """The embedded queue's file does not exist: read-only commands must not create it."""
    from llmtap.queue.base import embedded_queue_path

    where = "LLMTAP_QUEUE" if settings.queue != "sqlite" else "LLMTAP_DATA_DIR or --data-dir"
    return _missing(embedded_queue_path(settings), "queue", where if say else None)


def _store_missing(settings: Settings, say: bool = True) -> bool:
    """Likewise for the embedded store."""
    from llmtap.store.base import embedded_store_path

    where = "LLMTAP_STORE" if settings.store != "sqlite" else "LLMTAP_DATA_DIR or --data-dir"
    return _missing(embedded_store_path(settings), "store", where if say else None)


def _missing(path: str | Path | None, what: str, setting: str | None) -> bool:
    """Whether an embedded file is absent; says so on stderr, naming it: "no keys" alone, for a
    mistyped `--data-dir`, read as if there were none."""
    if path is None or Path(path).exists():
        return False
    if setting is not None:  # None: the caller says it its own way
        click.echo(f"llmtap: note: no {what} at {str(path)!r} yet ({setting})", err=True)
    return True


def _with_store(ctx: click.Context, fn: Callable[[Store], Awaitable[T]], *, create: bool = False) -> T:
    async def main(settings: Settings) -> T:
        from llmtap.store import open_store

        async with _connected(open_store(settings, admin=True)) as store:
            return await fn(store)

    return _run_with(ctx, main, create=create)


def _tenant_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A `--tenant` that names one: an empty one (an unset shell variable) is not the default
    tenant, and control characters would print as terminal escapes in every listing."""
    if value is not None and (not value.strip() or not value.isprintable()):
        raise click.BadParameter("must be a tenant's name: not empty, no control characters")
    return value


@keys.command("create")
@click.option("--tenant", callback=_tenant_name, required=True, help="Tenant the key belongs to.")
@click.option("--name", help="A label to recognise the key by.")
@click.pass_context
def keys_create(ctx: click.Context, tenant: str, name: str | None) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from llmtap import keys as k

    key, plaintext = _with_store(ctx, lambda s: k.create_key(s, tenant, name), create=True)
    click.echo(plaintext)
    click.echo(
        f"key {key.id} for tenant {key.tenant!r} created; store it now, it is not shown again", err=True
    )
    if not _settings(ctx).multi_tenant:
        click.echo(
            "llmtap: note: keys are checked only in multi-tenant mode (LLMTAP_MULTI_TENANT=true);"
            " until then every request is the default tenant's",
            err=True,
        )


@keys.command("list")
@click.option("--tenant", callback=_tenant_name, help="Only this tenant's keys.")
@click.pass_context
def keys_list(ctx: click.Context, tenant: str | None) -> None:
    """List keys (prefix, tenant, state); never the keys themselves."""
    from llmtap import keys as k

    rows = [] if _store_missing(_settings(ctx)) else _with_store(ctx, lambda s: k.list_keys(s, tenant))

    def line(key: ApiKey) -> str:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        return (
            f"{key.id}  {key.prefix}…  tenant={_shown(key.tenant)}  name={_shown(key.name or '-')}  {state}"
        )

    _listing(rows, line, "no keys")


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke a key by id; running gateways and servers refuse it within 2 seconds."""
    from llmtap import keys as k

    revoked = not _store_missing(_settings(ctx)) and _with_store(ctx, lambda s: k.revoke_key(s, key_id))
    _found(revoked, f"active key with id {key_id!r}")
    click.echo(f"key {key_id} revoked")


@cli.command(short_help="Erase a user's, a session's or given requests' logs (bodies too).")
@click.option("--user", "user_id", help="Every request of this user id (Llmtap-User-Id).")
@click.option("--session", "session_id", help="Every request of this session id.")
@click.option("--request", "request_ids", multiple=True, help="This request id (repeat for more).")
@click.option("--tenant", callback=_tenant_name, help="The tenant (default: the default tenant).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def erase(
    ctx: click.Context,
    user_id: str | None,
    session_id: str | None,
    request_ids: tuple[str, ...],
    tenant: str | None,
    yes: bool,
) -> None:
    """Erase logs for good: a data subject's request to be forgotten (GDPR art. 17).

    Deletes the requests' rows, bodies (files or S3 objects), search text, properties,
    webhook deliveries and their share of the rollups (a user's own rollup rows go with the
    last request); totals
    keep no trace of who. Records still in the queue are stored when the workers reach them:
    erase again once `llmtap status` shows lag 0. What webhooks already delivered, and OTel
    exports, are out of llmtap's hands.

    \b
    Example:
      llmtap erase --user user-42
      llmtap erase --session chat-9 --tenant acme --yes
      llmtap erase --request 0193c1e2-... --request 0193c1e3-...
    """
    if user_id is not None and session_id is not None:
        # "alice, session s1" reads as alice's requests in s1, and erased bob's in s1 too
        _fail("give --user or --session, not both (each erases every request it names)")
    targets = [("user_id", v) for v in [user_id] if v is not None]
    targets += [("session_id", v) for v in [session_id] if v is not None]
    targets += [("id", v) for v in dict.fromkeys(request_ids)]
    if not targets:
        _fail("name what to erase: --user, --session or --request")
    for by, value in targets:
        if not value.strip():
            _fail(f"--{by.removesuffix('_id') if by != 'id' else 'request'} must not be empty")
    settings = _settings(ctx)
    who = tenant if tenant is not None else settings.default_tenant
    if _store_missing(settings):
        _fail("nothing erased: there is no store here (a mistyped --data-dir?)", 1)
    if not yes:
        what = ", ".join(
            f"{'request' if by == 'id' else by.removesuffix('_id')} {_shown(v)}" for by, v in targets
        )
        click.confirm(f"Erase every stored request of {what} in tenant {_shown(who)}, for good?", abort=True)
    owed_file = settings.data_dir / ERASE_OWED

    async def run(settings: Settings) -> tuple[int, int, list[str], int | None]:
        from llmtap.bodies.base import open_body_store
        from llmtap.store import open_store

        rows = refs = 0
        failed: list[str] = []
        async with (
            _connected(open_store(settings, admin=True)) as store,
            _connected(open_body_store(settings)) as bodies,
        ):
            # bodies an earlier erase could not remove (their rows are gone): first
            owed = await _erase_bodies(bodies, _read_owed(owed_file))
            for by, value in targets:
                while True:
                    n, keys = await store.erase(who, by, value, limit=2_000)
                    failed += await _erase_bodies(bodies, keys)
                    rows, refs = rows + n, refs + len(keys)
                    if n == 0:
                        break
                    if rows >= 10_000 and rows % 10_000 < n:
                        click.echo(f"  ... {rows} erased", err=True)
        owed += failed
        _write_owed(owed_file, owed)
        return rows, refs - len(failed), owed, await _dead_letters_of(settings, who, targets)

    rows, refs, owed, letters = _run_with(ctx, run)
    click.echo(
        f"erased {rows} request(s) and {refs} bod{'y' if refs == 1 else 'ies'} in tenant {_shown(who)}"
    )
    if letters:
        click.echo(
            f"llmtap: {letters} dead letter(s) hold these requests (replayed, they would be stored"
            " again): remove them with `llmtap dlq discard` (`llmtap dlq list` shows their ids)",
            err=True,
        )
    if owed:
        _fail(
            f"{len(owed)} bod{'y' if len(owed) == 1 else 'ies'} could not be erased yet (kept in"
            f" {owed_file}): run `llmtap erase` again once the body store answers",
            1,
        )
    if rows == 0:
        _fail("nothing matched (ids are exact; `--tenant` names another tenant's)", 1)


#: Body refs `llmtap erase` could not remove yet (their rows are gone): tried first next time.
ERASE_OWED = "erase-owed.txt"


def _read_owed(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


def _write_owed(path: Path, owed: list[str]) -> None:
    if owed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{ref}\n" for ref in owed))
    else:
        path.unlink(missing_ok=True)


async def _erase_bodies(bodies: BodyStore, refs: list[str]) -> list[str]:
    """Erase `refs`; those the store refused or could not reach, to try again."""
    if not refs:
        return []
    try:
        await bodies.erase_many(refs)
    except Exception as e:  # the rows are gone: their refs must not be
        click.echo(f"llmtap: erasing {len(refs)} bodies failed ({type(e).__name__}: {e})", err=True)
        return list(refs)
    return []


async def _dead_letters_of(settings: Settings, tenant: str, targets: list[tuple[str, str]]) -> int | None:
    """How many dead letters hold the erased requests (None: the queue could not be read)."""
    from llmtap.queue import open_queue
    from llmtap.record import decode

    if _queue_missing(settings, say=False):
        return 0
    try:
        async with _connected(open_queue(settings), "inspect") as q:
            letters = await q.dead_letters(100_000)
    except Exception:
        return None
    n = 0
    for letter in letters:
        try:
            r = decode(letter.value)
        except Exception:
            continue
        if r.tenant == tenant and any(getattr(r, by) == value for by, value in targets):
            n += 1
    return n


# -- webhooks -----------------------------------------------------------------------------------


@cli.group()
def webhooks() -> None:
    """Manage webhook endpoints and inspect their deliveries."""


def _with_hooks(
    ctx: click.Context, fn: Callable[[Any, Settings], Awaitable[T]], *, create: bool = False
) -> T:
    settings = _settings(ctx)
    if not create and _store_missing(settings, say=False):
        from llmtap.store.base import embedded_store_path

        where = embedded_store_path(settings)
        _fail(
            f"no store at {str(where)!r} yet (nothing has been logged): no webhook endpoints or deliveries", 1
        )
    return _with_store(ctx, lambda s: fn(s.webhooks(), settings), create=create)


def _tenant(ctx: click.Context, tenant: str | None) -> str:
    return tenant or _settings(ctx).default_tenant


_tenant_option = click.option(
    "--tenant", callback=_tenant_name, help="Its tenant (default: the default tenant)."
)


def _one(id_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The arguments of a command on one endpoint or delivery: its id, and its `--tenant`."""
    return lambda f: click.argument(id_name)(_tenant_option(click.pass_context(f)))


def _change(
    ctx: click.Context, tenant: str | None, endpoint_id: str, change: Callable[[Any, str], Any]
) -> None:
    """Run `change(db, tenant)` on one endpoint; exit 1 with one sentence if it is not there."""
    done = _with_hooks(ctx, lambda db, _s: change(db, _tenant(ctx, tenant)))
    _found_endpoint(ctx, done, endpoint_id, tenant)


def _found_endpoint(ctx: click.Context, result: T, endpoint_id: str, tenant: str | None) -> T:
    """Like `_found`; without `--tenant`, an endpoint of another tenant is named with its tenant
    (`webhooks list` shows every tenant's, the others default to the default tenant's)."""
    if result:
        return result
    hint = ""
    if tenant is None:
        endpoints = _with_hooks(ctx, lambda db, _s: db.list_endpoints(None))
        owner = next((ep.tenant for ep in endpoints if ep.id == endpoint_id), None)
        if owner is not None:
            hint = (
                f" for the default tenant: it belongs to tenant {owner!r} (add --tenant {shlex.quote(owner)})"
            )
    return cast(T, _fail(f"no endpoint {endpoint_id!r}{hint}", 1))


@webhooks.command("add")
@click.argument("url")
@click.option(
    "--tenant", callback=_tenant_name, help="Tenant whose records it receives (default: the default tenant)."
)
@click.option(
    "--event", "events", multiple=True,
    help="request.completed, delivery.disabled, alert.firing, alert.resolved (default: all).",
)  # fmt: skip
@click.option(
    "--filter", "filters", multiple=True, help="model=NAME or property.NAME=VALUE (all must match)."
)
@click.option("--sample", default=1.0, show_default=True, help="Fraction of matching records sent.")
@click.option("--include-bodies", is_flag=True, help="Add request/response bodies (size-capped).")
@click.option("--secret", help="A whsec_ secret to use (default: a new one, printed once).")
@click.option(
    "--format", "fmt", type=click.Choice(["standard", "slack"]), default="standard", show_default=True,
    help="slack: send {\"text\": ...} (a Slack-compatible incoming webhook) instead of the envelope.",
)  # fmt: skip
@click.pass_context
def webhooks_add(
    ctx: click.Context, url: str, tenant: str | None, events: tuple[str, ...], filters: tuple[str, ...],
    sample: float, include_bodies: bool, secret: str | None, fmt: str,
) -> None:  # fmt: skip
    """Add an endpoint; prints its signing secret once."""
    from llmtap.webhooks.manage import Invalid, create_endpoint

    async def go(db: Any, settings: Settings) -> Any:
        return await create_endpoint(
            db, _tenant(ctx, tenant), url, events=events, filters=filters, sample=sample,
            include_bodies=include_bodies, secret=secret, allow_private=settings.webhook_allow_private,
            format=fmt,
        )  # fmt: skip

    try:
        ep = _with_hooks(ctx, go, create=True)
    except Invalid as e:
        _fail(str(e))
    click.echo(ep.secret)
    click.echo(f"endpoint {ep.id} for tenant {ep.tenant!r} added; its secret is not shown again", err=True)


@webhooks.command("list")
@click.option("--tenant", callback=_tenant_name, help="Only this tenant's endpoints (default: all).")
@click.pass_context
def webhooks_list(ctx: click.Context, tenant: str | None) -> None:
    """List endpoints (never their secrets)."""
    from llmtap.redact import redact_webhook_url

    rows = _with_hooks(ctx, lambda db, _s: db.list_endpoints(tenant))

    def line(ep: Endpoint) -> str:
        state = "disabled" if ep.disabled_at else ("failing" if ep.failing_since else "active")
        extra = f"  filters={ep.filters}" if ep.filters else ""
        extra += f"  sample={ep.sample}" if ep.sample < 1 else ""
        extra += "  bodies" if ep.include_bodies else ""
        extra += "  rotating (signs with two secrets)" if ep.previous_secret else ""
        extra += f"  format={ep.format}" if ep.format != "standard" else ""
        events = ",".join(ep.events)
        return f"{ep.id}  tenant={ep.tenant}  {redact_webhook_url(ep.url)}  events={events}  {state}{extra}"

    _listing(rows, line, "no webhook endpoints")


@webhooks.command("remove")
@_one("endpoint_id")
def webhooks_remove(ctx: click.Context, endpoint_id: str, tenant: str | None) -> None:
    """Remove an endpoint and its pending deliveries."""
    _change(ctx, tenant, endpoint_id, lambda db, t: db.remove_endpoint(t, endpoint_id))
    click.echo(f"endpoint {endpoint_id} removed")


@webhooks.command("enable")
@_one("endpoint_id")
def webhooks_enable(ctx: click.Context, endpoint_id: str, tenant: str | None) -> None:
    """Enable a disabled endpoint again; its pending deliveries are sent."""
    _change(ctx, tenant, endpoint_id, lambda db, t: db.enable_endpoint(t, endpoint_id))
    click.echo(f"endpoint {endpoint_id} enabled")


@webhooks.command("rotate")
@_one("endpoint_id")
@click.option("--secret", help="The new whsec_ secret (default: a new one, printed once).")
def webhooks_rotate(ctx: click.Context, endpoint_id: str, tenant: str | None, secret: str | None) -> None:
    """Give an endpoint a new secret; deliveries carry both signatures until the next rotation."""
    from llmtap.webhooks.outbox import check_secret, new_secret

    try:
        new = check_secret(secret) if secret else new_secret()
    except ValueError as e:
        _fail(str(e))
    _change(ctx, tenant, endpoint_id, lambda db, t: db.rotate_secret(t, endpoint_id, new))
    click.echo(new)
    click.echo(f"endpoint {endpoint_id} signs with the new secret and the previous one", err=True)


@webhooks.command("test")
@_one("endpoint_id")
def webhooks_test(ctx: click.Context, endpoint_id: str, tenant: str | None) -> None:
    """Send a signed sample event now and show the receiver's answer."""
    from llmtap.webhooks.manage import test_endpoint

    async def go(db: Any, settings: Settings) -> Any:
        ep = await db.get_endpoint(_tenant(ctx, tenant), endpoint_id)
        if ep is None:
            return None
        return await test_endpoint(ep, allow_private=settings.webhook_allow_private)

    result = _found_endpoint(ctx, _with_hooks(ctx, go), endpoint_id, tenant)
    click.echo(json.dumps(result))
    if not result["ok"]:
        sys.exit(1)


_limit_option = click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(1, 100_000), help="Show at most this many."
)


@webhooks.command("deliveries")
@_tenant_option
@click.option("--endpoint", "endpoint_id", help="Only this endpoint's deliveries.")
@click.option("--status", type=click.Choice(["pending", "delivered", "failed"]))
@_limit_option
@click.pass_context
def webhooks_deliveries(
    ctx: click.Context, tenant: str | None, endpoint_id: str | None, status: str | None, limit: int
) -> None:
    """The delivery log, newest first: status, attempts, last answer (failed: given up)."""
    rows = _with_hooks(
        ctx, lambda db, _s: db.list_deliveries(_tenant(ctx, tenant), endpoint_id, status, limit)
    )

    def line(d: dict[str, Any]) -> str:
        last = d["last_error"] or (f"HTTP {d['last_status']}" if d["last_status"] else "")
        return (
            f"{d['id']}  {d['endpoint_id']}  {d['event']}  {d['subject']}  {d['status']}"
            f"  attempts={d['attempts']}  {last}"
        )

    _listing(rows, line, "no deliveries")


@webhooks.command("redeliver")
@_one("delivery_id")
def webhooks_redeliver(ctx: click.Context, delivery_id: str, tenant: str | None) -> None:
    """Send a delivery again, under its same webhook-id."""
    _found(
        _with_hooks(ctx, lambda db, _s: db.redeliver(_tenant(ctx, tenant), delivery_id)),
        f"delivery {delivery_id!r}",
    )
    click.echo(f"delivery {delivery_id} queued again")


# -- alerts -------------------------------------------------------------------------------------


@cli.group(
    epilog="""\b
Examples:
  llmtap alerts add --metric error_rate --above 0.05 --window 5m --group-by model --min-requests 20
  llmtap alerts add --metric cost_usd --above 50 --window 1d --name "daily spend"
  llmtap alerts add --metric requests --below 1 --window 15m --min-requests 0   # traffic stopped
  llmtap alerts add --metric p95_latency_ms --above 4000 --window 10m --group-by property.feature

\b
`llmtap server` evaluates every rule each LLMTAP_ALERT_INTERVAL_S (60 s) over the last window of
whole minutes; an alert fires once when its condition holds (with at least --min-requests
requests in the window) and resolves once after it has been clear for
LLMTAP_ALERT_RESOLVE_AFTER_S (300 s). Events alert.firing / alert.resolved go to the tenant's
webhook endpoints that subscribe to them (llmtap webhooks add URL --event alert.firing ...).
"""
)
def alerts() -> None:
    """Manage alert rules (cost, error rate, requests, tokens, p95 latency or TTFT)."""


def _with_alerts(ctx: click.Context, fn: Callable[[Any], Awaitable[T]], *, create: bool = False) -> T:
    from llmtap.alerts.db import AlertDB

    if not create and _store_missing(_settings(ctx), say=False):
        from llmtap.store.base import embedded_store_path

        where = embedded_store_path(_settings(ctx))
        _fail(f"no store at {str(where)!r} yet (nothing has been logged): no alert rules", 1)
    return _with_store(ctx, lambda s: fn(AlertDB(s.webhooks())), create=create)


@alerts.command(
    "add",
    epilog="""\b
Examples:
  llmtap alerts add --metric error_rate --above 0.05 --window 5m --group-by model --min-requests 20
  llmtap alerts add --metric p95_ttft_ms --above 1500 --window 15m --group-by user_id --tenant acme
""",
)
@click.option(
    "--metric", required=True,
    type=click.Choice(["cost_usd", "error_rate", "requests", "tokens", "p95_latency_ms", "p95_ttft_ms"]),
    help="What to watch (error_rate is a fraction: 0.05 is 5%).",
)  # fmt: skip
@click.option("--above", type=float, help="Fire when the metric is above this.")
@click.option("--below", type=float, help="Fire when the metric is below this.")
@click.option("--window", required=True, help="Sliding window, whole minutes from 5m to 1d (5m, 1h, 1d).")
@click.option("--group-by", help="One alert per model, user_id, provider, status or property.NAME.")
@click.option(
    "--min-requests", type=int, default=1, show_default=True,
    help="Evaluate only windows with at least this many requests (not for --metric requests).",
)  # fmt: skip
@click.option("--name", help="A label shown in the alert's message.")
@click.option("--tenant", callback=_tenant_name, help="Whose requests (default: the default tenant).")
@click.pass_context
def alerts_add(
    ctx: click.Context, metric: str, above: float | None, below: float | None, window: str,
    group_by: str | None, min_requests: int, name: str | None, tenant: str | None,
) -> None:  # fmt: skip
    """Add a rule; prints its id."""
    from llmtap.alerts.rules import Invalid, make_rule, parse_duration
    from llmtap.webhooks.db import now_us

    if (above is None) == (below is None):
        _fail("give exactly one of --above or --below")
    try:
        rule = make_rule(
            _tenant(ctx, tenant), metric=metric, op="above" if above is not None else "below",
            threshold=above if above is not None else below, window_s=parse_duration(window),
            group_by=group_by, min_requests=min_requests, name=name,
        )  # fmt: skip
    except Invalid as e:
        _fail(str(e))
    added = _with_alerts(ctx, lambda db: db.add_rule(rule, now_us()), create=True)
    click.echo(added.id)
    click.echo(f"alert {added.id} for tenant {added.tenant!r}: {added.describe()}", err=True)


@alerts.command("list")
@click.option("--tenant", callback=_tenant_name, help="Only this tenant's rules (default: all).")
@click.pass_context
def alerts_list(ctx: click.Context, tenant: str | None) -> None:
    """List rules, with the groups firing now."""

    async def go(db: Any) -> list[tuple[Any, list[str]]]:
        rules = await db.list_rules(tenant)
        firing: dict[str, list[str]] = {}
        for t in {r.tenant for r in rules}:
            for st in await db.states(t):
                if st["state"] == "firing":
                    key = st["group_key"]
                    firing.setdefault(st["rule_id"], []).append(key[1:] if key.startswith("=") else key)
        return [(r, firing.get(r.id, [])) for r in rules]

    rows = [] if _store_missing(_settings(ctx)) else _with_alerts(ctx, go)

    def line(row: tuple[Any, list[str]]) -> str:
        rule, firing = row
        label = f"  name={rule.name!r}" if rule.name else ""
        if not firing:
            state = "ok"
        elif rule.group_by:
            state = f"FIRING for {', '.join(firing)}"
        else:
            state = "FIRING"
        return f"{rule.id}  tenant={rule.tenant}  {rule.describe()}{label}  {state}"

    _listing(rows, line, "no alert rules")


@alerts.command("remove")
@_one("rule_id")
def alerts_remove(ctx: click.Context, rule_id: str, tenant: str | None) -> None:
    """Remove a rule (an alert firing then sends no resolution)."""
    removed = not _store_missing(_settings(ctx)) and _with_alerts(
        ctx, lambda db: db.remove_rule(_tenant(ctx, tenant), rule_id)
    )
    _found(removed, f"alert rule {rule_id!r} of tenant {_tenant(ctx, tenant)!r}")
    click.echo(f"alert {rule_id} removed")


# -- dead letters -------------------------------------------------------------------------------


@cli.group()
def dlq() -> None:
    """Inspect, replay or discard dead-lettered records."""


def _with_queue(ctx: click.Context, fn: Callable[[Queue], Awaitable[T]], role: Role = "producer") -> T:
    async def main(settings: Settings) -> T:
        from llmtap.queue import open_queue

        async with _connected(open_queue(settings), role) as queue:
            return await fn(queue)

    return _run_with(ctx, main)


@dlq.command("list")
@_limit_option
@click.pass_context
def dlq_list(ctx: click.Context, limit: int) -> None:
    """List dead letters with their reasons."""
    if _queue_missing(_settings(ctx)):
        rows: list[DeadLetter] = []  # no queue file, no dead letters: nothing to create
    else:
        rows = _with_queue(ctx, lambda q: q.dead_letters(limit), "inspect")

    def line(d: DeadLetter) -> str:
        rid = d.request_id
        request = f"  request={_shown(rid)}" if rid else ""
        return f"{_shown(d.id)}  partition={d.partition} offset={d.offset}{request}  {_shown(d.reason)}"

    _listing(rows, line, "no dead letters")


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@click.pass_context
def dlq_replay(ctx: click.Context, ids: tuple[str, ...], replay_all: bool) -> None:
    """Publish dead letters again (after fixing what made them fail)."""
    if not ids and not replay_all:
        _fail("name dead-letter ids to replay, or pass --all")
    if _queue_missing(_settings(ctx)):
        n = 0  # no queue, no dead letters: nothing to create
    else:
        named = list(dict.fromkeys(ids))  # an id named twice is replayed once
        n = _with_queue(ctx, lambda q: q.replay_dead_letters(None if replay_all else named))
    click.echo(f"replayed {n} record(s)")
    missing = 0 if replay_all else len(set(ids)) - n
    if missing > 0:  # a mistyped id must not read as done
        _fail(f"{missing} of the ids named no dead letter (`llmtap dlq list` shows them)", 1)


@dlq.command("discard")
@click.argument("ids", nargs=-1)
@click.option("--all", "discard_all", is_flag=True, help="Discard every dead letter.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_discard(ctx: click.Context, ids: tuple[str, ...], discard_all: bool, yes: bool) -> None:
    """Remove dead letters for good: records that can never be stored.

    Their only copy goes (`llmtap dlq list` shows them and why they failed). Kafka keeps a
    discarded letter's bytes in `<topic>.dlq` until its retention.ms, unlisted.

    \b
    Example:
      llmtap dlq discard 17 18        # these ids (from `llmtap dlq list`)
      llmtap dlq discard --all --yes
    """
    if not ids and not discard_all:
        _fail("name dead-letter ids to discard, or pass --all")
    if _queue_missing(_settings(ctx)):
        click.echo("discarded 0 record(s)")
        return
    if not yes:
        what = "every dead letter" if discard_all else f"{len(set(ids))} dead letter(s)"
        click.confirm(f"Discard {what} for good? Their records will never be stored", abort=True)
    named = list(dict.fromkeys(ids))
    n = _with_queue(ctx, lambda q: q.discard_dead_letters(None if discard_all else named))
    click.echo(f"discarded {n} record(s)")
    missing = 0 if discard_all else len(named) - n
    if missing > 0:  # a mistyped id must not read as done
        _fail(f"{missing} of the ids named no dead letter (`llmtap dlq list` shows them)", 1)


@cli.command("fake-upstream", short_help="Run a local fake OpenAI/Anthropic/Gemini/Azure API (demos).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9999, show_default=True, help="0 picks a free port (printed at start).")
@click.option(
    "--record-limit",
    default=256,
    show_default=True,
    help="Requests kept for GET /_fake/requests (0: none, as benchmarks run it).",
)
def fake_upstream(host: str, port: int, record_limit: int) -> None:
    """Run a local fake OpenAI/Anthropic/Gemini/Azure API (for demos and tests; no keys needed).

    \b
    Example:
      llmtap fake-upstream --port 9999 &
      LLMTAP_OPENAI_BASE_URL=http://127.0.0.1:9999 llmtap up
    """
    from llmtap.testing.fake_upstream import run

    try:
        run(host, port, record_limit=record_limit)
    except OSError as e:  # a busy port or a host not on this machine: one sentence, no traceback
        _fail(f"cannot listen on {host}:{port} for the fake upstream: {e.strerror or e}")


def _config_here(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["config"] = value


def _data_dir_here(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["data_dir"] = value


def _accept_anywhere(group: click.Group) -> None:
    """`llmtap up --config x.toml` as well as `llmtap --config x.toml up`: every command that
    reads settings takes the option after its name too (people type it there); and every one
    takes `--data-dir`, so `llmtap status --data-dir X` looks where `llmtap up --data-dir X` ran."""

    def option(name: str, kind: click.Path, callback: Any, help: str) -> click.Option:
        return click.Option(
            [name], type=kind, expose_value=False, is_eager=True, callback=callback, help=help
        )

    for cmd in group.commands.values():
        if isinstance(cmd, click.Group):
            _accept_anywhere(cmd)
        elif cmd.name != "fake-upstream":
            config = click.Path(dir_okay=False, path_type=Path)
            cmd.params.append(
                option(
                    "--config",
                    config,
                    _config_here,
                    "TOML file with settings (as `llmtap --config FILE ...`).",
                )
            )
            if not any(p.name == "data_dir" for p in cmd.params):
                data = click.Path(file_okay=False, path_type=Path)
                cmd.params.append(
                    option("--data-dir", data, _data_dir_here, "Embedded data (LLMTAP_DATA_DIR).")
                )


_accept_anywhere(cli)


def main() -> None:
    cli(obj={})


if __name__ == "__main__":  # pragma: no cover
    main()
