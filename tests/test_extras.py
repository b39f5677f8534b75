"""Packaging extras (issue 9): `pip install llmtap` is the embedded mode; a network backend's
driver comes with its extra, and configuring one without it stops start-up with one sentence.

"Not installed" is made real for a child process: a directory first on its PYTHONPATH holds a
package of the driver's name that fails to import the way an absent module does.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Callable
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from llmtap.backends import BODIES, FAMILIES, QUEUES, STORES
from llmtap.bodies.base import BodyStore, open_body_store
from llmtap.config import Settings, load_settings
from llmtap.errors import ConfigError
from llmtap.queue.base import Queue, open_queue
from llmtap.store.base import Store, open_store
from procs import ROOT, Proc, fake_upstream, free_port, get_record, llmtap_env, wait_http

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: Every driver module an extra brings (the embedded mode must import none of them).
DRIVERS = ("aiokafka", "redis", "asyncpg", "aiobotocore", "botocore", "opentelemetry")


def _llmtap_cmd() -> list[str]:
    """The installed console script (the entry point users run), else the module."""
    script = Path(sys.executable).with_name("llmtap")
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmtap.cli"]


def _shim(tmp: Path, modules: tuple[str, ...], error: str | None = None) -> Path:
    """A PYTHONPATH directory where importing each of `modules` fails: like an absent module
    (ModuleNotFoundError naming it), or with `error` like a driver that is present but broken."""
    shim = tmp / "shim"
    for name in modules:
        (shim / name).mkdir(parents=True, exist_ok=True)
        raise_ = (
            f"raise ImportError({error!r})"
            if error
            else f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})"
        )
        (shim / name / "__init__.py").write_text(raise_ + "\n")
    return shim


def _run(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_llmtap_cmd(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


CASES = [
    # setting, URL, driver module made unimportable, expected sentence
    (
        "queue", "kafka://127.0.0.1:9/llmtap", "aiokafka",
        "LLMTAP_QUEUE=kafka://… needs the Kafka driver: pip install 'llmtap[kafka]'",
    ),
    (
        "queue", "rediss://:hunter2secret@127.0.0.1:9/0", "redis",
        "LLMTAP_QUEUE=rediss://… needs the Redis driver: pip install 'llmtap[redis]'",
    ),
    (
        "store", "postgresql://llmtap:hunter2secret@127.0.0.1:9/llmtap", "asyncpg",
        "LLMTAP_STORE=postgresql://… needs the PostgreSQL driver: pip install 'llmtap[postgres]'",
    ),
    (
        "bodies", "s3://bucket/prefix", "aiobotocore",
        "LLMTAP_BODIES=s3://… needs the S3 client (aiobotocore): pip install 'llmtap[s3]'",
    ),
    (
        "queue", "sqs://llmtap.fifo", "aiobotocore",
        "LLMTAP_QUEUE=sqs://… needs the AWS SQS client (aiobotocore): pip install 'llmtap[sqs]'",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "url", "driver", "sentence"), CASES, ids=[c[2] + "-" + c[0] for c in CASES]
)
def test_a_backend_without_its_extra_stops_start_up_with_one_sentence(
    tmp_path: Path, setting: str, url: str, driver: str, sentence: str
) -> None:
    data = tmp_path / "data"
    env = llmtap_env(data, **{setting: url}, s3_endpoint="http://127.0.0.1:9")
    env["PYTHONPATH"] = str(_shim(tmp_path, (driver,)))
    # `up` with a driver missing would otherwise start (waiting on the backend) or print a traceback.
    r = _run(env, "up", "--gateway-port", str(free_port()), "--server-port", str(free_port()), cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr == f"llmtap: {sentence}\n"
    assert r.stdout == ""  # no banner: nothing started
    assert not data.exists()  # stopped before the data directory was made
    assert "hunter2secret" not in r.stderr


def test_an_admin_command_needs_only_the_driver_of_the_backend_it_opens(tmp_path: Path) -> None:
    """An admin host with one extra, beside a configuration naming other backends: `llmtap keys`
    and `dlq` refused to run for a driver of a backend they never open."""
    kafka = "LLMTAP_QUEUE=kafka://… needs the Kafka driver: pip install 'llmtap[kafka]'"
    env = llmtap_env(tmp_path / "data", queue="kafka://127.0.0.1:9/llmtap", multi_tenant="true")
    env["PYTHONPATH"] = str(_shim(tmp_path, ("aiokafka", "asyncpg")))
    r = _run(env, "keys", "create", "--tenant", "acme", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("lt_"), (r.stdout, r.stderr)
    r = _run(env, "keys", "list", cwd=tmp_path)
    assert r.returncode == 0 and "tenant=acme" in r.stdout, (r.stdout, r.stderr)
    for args in (("dlq", "list"), ("status",), ("up",)):  # these do open the queue
        r = _run(env, *args, cwd=tmp_path)
        assert (r.returncode, r.stderr) == (2, f"llmtap: {kafka}\n"), args
    pg = {**env, "LLMTAP_QUEUE": "sqlite", "LLMTAP_STORE": "postgresql://u:hunter2secret@127.0.0.1:9/x"}
    r = _run(pg, "dlq", "list", cwd=tmp_path)
    assert r.returncode == 0 and "no dead letters" in r.stderr, (r.stdout, r.stderr)
    r = _run(pg, "keys", "list", cwd=tmp_path)
    postgres = "LLMTAP_STORE=postgresql://… needs the PostgreSQL driver: pip install 'llmtap[postgres]'"
    assert (r.returncode, r.stderr) == (2, f"llmtap: {postgres}\n")


def test_a_driver_that_is_present_but_broken_says_why(tmp_path: Path) -> None:
    env = llmtap_env(tmp_path / "data", queue="kafka://127.0.0.1:9/llmtap")
    env["PYTHONPATH"] = str(_shim(tmp_path, ("aiokafka",), error="libzstd.so.1: wrong ELF class: ELFCLASS32"))
    r = _run(env, "worker", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr == (
        "llmtap: LLMTAP_QUEUE=kafka://… needs the Kafka driver (importing aiokafka failed: "
        "libzstd.so.1: wrong ELF class: ELFCLASS32): pip install 'llmtap[kafka]'\n"
    )


def test_otel_export_without_its_extra_stops_start_up_with_one_sentence(tmp_path: Path) -> None:
    env = llmtap_env(tmp_path / "data")
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
    env["PYTHONPATH"] = str(_shim(tmp_path, ("opentelemetry",)))
    r = _run(env, "worker", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr == (
        "llmtap: OTEL_EXPORTER_OTLP_ENDPOINT is set: exporting spans needs the OpenTelemetry SDK: "
        "pip install 'llmtap[otel]'\n"
    )


def test_the_embedded_mode_needs_no_driver_of_any_extra(tmp_path: Path) -> None:
    """`llmtap up` on the defaults with every extra's driver unimportable: a request goes through
    the gateway, the queue and the worker into the store, and the process stops cleanly."""
    with fake_upstream(tmp_path) as upstream:
        gw, srv = free_port(), free_port()
        env = llmtap_env(tmp_path / "data", openai_base_url=upstream)
        env["PYTHONPATH"] = str(_shim(tmp_path, DRIVERS))
        proc = Proc(
            [*_llmtap_cmd(), "up", "--gateway-port", str(gw), "--server-port", str(srv)],
            env,
            tmp_path / "up.log",
        )
        try:
            wait_http(f"http://127.0.0.1:{gw}/healthz", 60)
            req = urllib.request.Request(
                f"http://127.0.0.1:{gw}/openai/v1/chat/completions",
                data=b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}',
                headers={"content-type": "application/json", "authorization": "Bearer sk-test"},
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                assert resp.status == 200
                request_id = resp.headers["llmtap-request-id"]
            record = get_record(f"http://127.0.0.1:{srv}", request_id, timeout=60)
            assert record["model"].startswith("gpt-4o-mini")
        finally:
            code = proc.stop()
        out = proc.output()
        assert code == 0, out
        assert "Traceback" not in out


@pytest.mark.parametrize(
    ("opener", "setting", "url", "driver", "extra"),
    [
        (open_queue, "queue", "kafka://127.0.0.1:9/t", "aiokafka", "kafka"),
        (open_queue, "queue", "redis://127.0.0.1:9/0", "redis", "redis"),
        (open_queue, "queue", "sqs://q", "aiobotocore", "sqs"),
        (open_store, "store", "postgres://127.0.0.1:9/db", "asyncpg", "postgres"),
        (open_body_store, "bodies", "s3://bucket", "aiobotocore", "s3"),
    ],
)
def test_openers_raise_the_same_sentence_for_settings_built_in_code(
    monkeypatch: pytest.MonkeyPatch,
    opener: Callable[[Settings], object],
    setting: str,
    url: str,
    driver: str,
    extra: str,
) -> None:
    """Settings made without `load_settings` (embedding llmtap as a library) reach the opener."""
    settings = Settings(**{setting: url})
    monkeypatch.setitem(sys.modules, driver, None)  # `import driver` now fails as if absent
    with pytest.raises(
        ConfigError, match=rf"^LLMTAP_{setting.upper()}=\w+://… needs .*: pip install 'llmtap\[{extra}\]'$"
    ):
        opener(settings)


def test_load_settings_checks_the_driver_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(ConfigError, match=r"^LLMTAP_STORE=postgres://… needs the PostgreSQL driver"):
        load_settings(store="postgres://u:p@127.0.0.1:9/db")
    load_settings(store="sqlite")  # the embedded store needs no driver


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        (
            "queue", "amqp://h/q",
            "invalid setting LLMTAP_QUEUE: must be 'sqlite', 'kafka://host:port/topic', "
            "'redis://host:port/db' or 'sqs://queue-name' (got 'amqp://h/q')",
        ),
        (
            "store", "mysql://h/db",
            "invalid setting LLMTAP_STORE: must be 'sqlite' or "
            "'postgresql://user:password@host:port/database' (got 'mysql://h/db')",
        ),
        ("bodies", "gs://b", "invalid setting LLMTAP_BODIES: must be 'file' or 's3://bucket/prefix' (got 'gs://b')"),
        ("queue", "kafka:/h/t", "invalid setting LLMTAP_QUEUE: must be 'sqlite', 'kafka://host:port/topic', "
         "'redis://host:port/db' or 'sqs://queue-name' (got 'kafka:/h/t')"),
        ("queue", "kafka:///t", "invalid setting LLMTAP_QUEUE: 'kafka:///t' names no host"),
        ("bodies", "s3://b:x/p", "invalid setting LLMTAP_BODIES: 's3://b:x/p' is not a valid URL "
         "(a port is not a number; a password holding @ : / ? # must be percent-encoded)"),
    ],
)  # fmt: skip
def test_unknown_or_malformed_backend_urls_keep_their_messages(
    setting: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings(**{setting: value})
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("queue", "sqlite"), ("queue", "sqlite:/tmp/q.db"), ("queue", "sqlite:///tmp/q.db"),
        ("queue", "kafka://h:9092/t"), ("queue", "redis://h/0"), ("queue", "rediss://h/0"), ("queue", "sqs://q"),
        ("store", "sqlite"), ("store", "postgresql:///db"), ("store", "postgres://u:p@h/db"),
        ("bodies", "file"), ("bodies", "file:/tmp/b"), ("bodies", "s3://bucket/prefix"),
    ],
)  # fmt: skip
def test_accepted_backend_urls(setting: str, value: str) -> None:
    assert getattr(load_settings(**{setting: value}), setting) == value


@pytest.mark.parametrize(
    ("setting", "url", "cls", "description"),
    [
        ("queue", "sqlite", "SQLiteQueue", "sqlite /d/queue.db"),
        ("queue", "sqlite:///x/q.db", "SQLiteQueue", "sqlite /x/q.db"),
        ("queue", "kafka://127.0.0.1:9/t", "KafkaQueue", "kafka://127.0.0.1:9/t (Kafka)"),
        ("queue", "redis://:pw@127.0.0.1:9/0", "RedisQueue", "redis://:***@127.0.0.1:9/0 (Redis Streams)"),
        ("queue", "sqs://q.fifo", "SQSQueue", "sqs://q.fifo (SQS FIFO)"),
        ("store", "sqlite", "SQLiteStore", "sqlite /d/store.db"),
        ("store", "sqlite:/x/s.db", "SQLiteStore", "sqlite /x/s.db"),
        ("store", "postgresql://u:pw@h/db", "PostgresStore", "postgresql postgresql://u:***@h/db"),
        ("bodies", "file", "FileBodyStore", "files in /d/bodies"),
        ("bodies", "file:/x/b", "FileBodyStore", "files in /x/b"),
        ("bodies", "s3://b/p", "S3BodyStore", "s3://b/p at http://127.0.0.1:9"),
    ],
)
def test_openers_build_the_backend_the_table_names(
    setting: str, url: str, cls: str, description: str
) -> None:
    """Opening builds, connects nothing: the class, its target and the settings it was given."""
    settings = Settings(
        **{setting: url},
        data_dir=Path("/d"),
        s3_endpoint="http://127.0.0.1:9",
        partitions=3,
        inline_body_bytes=1000,
    )
    opened: object
    if setting == "queue":
        opened = open_queue(settings, group="g1")
    elif setting == "store":
        opened = open_store(settings)
    else:
        opened = open_body_store(settings)
    assert type(opened).__name__ == cls
    assert getattr(opened, "description", None) == description
    if setting == "queue":
        assert getattr(opened, "partitions", None) == 3
        if cls != "SQLiteQueue":
            assert getattr(opened, "group", None) == "g1"
        if cls == "SQSQueue":
            assert getattr(opened, "inline_body_bytes", None) == 1000


def test_embedded_paths() -> None:
    s = Settings(queue="sqlite:///tmp/x/q.db", store="sqlite", bodies="file:/tmp/b", data_dir=Path("/d"))
    assert QUEUES.embedded_path(s.queue, s.data_dir) == "/tmp/x/q.db"
    assert STORES.embedded_path(s.store, s.data_dir) == "/d/store.db"
    assert BODIES.embedded_path(s.bodies, s.data_dir) == "/tmp/b"
    assert QUEUES.embedded_path("kafka://h/t", s.data_dir) is None


# -- the tables agree with pyproject.toml and with the code ------------------------------------------


def _names(reqs: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def test_each_backend_class_is_its_family_and_its_extra_brings_its_driver() -> None:
    extras = PYPROJECT["optional-dependencies"]
    core = _names(PYPROJECT["dependencies"])
    dists = packages_distributions()
    base = {"queue": Queue, "store": Store, "bodies": BodyStore}
    for family in FAMILIES:
        for backend in family.backends:
            module, _, cls = backend.target.partition(":")
            assert issubclass(getattr(__import__(module, fromlist=[cls]), cls), base[family.setting])
            if backend.embedded:
                assert backend.extra is None and not backend.drivers
                continue
            assert backend.extra in extras, backend
            for driver in backend.drivers:
                provided_by = {canonicalize_name(d) for d in dists[driver]}
                assert provided_by & _names(extras[backend.extra]), (backend.name, driver)
                assert not provided_by & core, f"{driver} must not be a core dependency"


def test_the_core_install_has_no_driver_and_all_is_every_extra() -> None:
    extras = PYPROJECT["optional-dependencies"]
    dists = packages_distributions()
    driver_dists = {canonicalize_name(d) for m in DRIVERS for d in dists[m]}
    assert not driver_dists & _names(PYPROJECT["dependencies"])
    backends = {"kafka", "redis", "postgres", "s3", "sqs", "otel"}
    assert backends | {"all", "dev", "bench"} == extras.keys()  # bench: bench/spike_core.py only
    (everything,) = (Requirement(r) for r in extras["all"])
    assert everything.name == "llmtap" and everything.extras == backends


def test_constraints_pin_every_requirement_inside_its_range() -> None:
    """`constraints.txt` holds the exact versions scripts/ install; each must satisfy the range in
    pyproject.toml, or `pip install -c constraints.txt` fails on a fresh machine."""
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for name, group in PYPROJECT["optional-dependencies"].items():
        reqs += [Requirement(r) for r in group if not r.startswith("llmtap")]
        assert group, name
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside {req.specifier}"


def test_scripts_install_with_the_constraints() -> None:
    for script in (ROOT / "scripts").glob("*.sh"):
        for line in script.read_text().splitlines():
            if "pip install" in line and "--upgrade pip" not in line and not line.lstrip().startswith("#"):
                if script.name == "lock.sh" and "# no -c" in line:
                    continue  # resolving afresh is where the pins come from
                assert "-c constraints.txt" in line, f"{script.name}: {line.strip()}"
