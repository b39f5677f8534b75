"""Issue 7 items 18 and 20: read-only commands create nothing; `status --json` fails like the
table form when the queue is unreachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmtap.config import load_settings
from llmtap.errors import ConfigError
from procs import free_port, llmtap_env


def _llmtap(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmtap.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["status"], 1),  # MISSING: no llmtap ran here (a mistyped data dir looked healthy)
        (["status", "--json"], 1),
        (["dlq", "list"], 0),
        (["dlq", "replay", "--all"], 0),
        (["dlq", "replay", "1-0"], 1),  # an id that names no dead letter is not "done"
        (["keys", "list"], 0),
        (["keys", "revoke", "k_nope"], 1),
    ],
)
def test_read_only_commands_on_a_fresh_directory_create_nothing(
    tmp_path: Path, args: list[str], code: int
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env = llmtap_env(work / ".llmtap")  # the default data dir of a fresh checkout
    r = _llmtap(env, *args, cwd=work)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    assert list(work.iterdir()) == []  # no data dir, no queue file, no store file
    if args == ["status", "--json"]:
        info = json.loads(r.stdout)
        assert info["reachable"] is False and info["missing"] is True
        assert str(work / ".llmtap" / "queue.db") in info["error"] and "--data-dir" in info["error"]
    elif args == ["status"]:
        assert "MISSING: no queue file" in r.stdout, r.stdout
    elif r.returncode == 0:  # "none", and where it looked (a mistyped --data-dir looked the same)
        what = "queue" if args[0] == "dlq" else "store"
        assert f"no {what} at '{work / '.llmtap' / f'{what}.db'}' yet" in r.stderr, r.stderr


def _publish(env: dict[str, str], *values: bytes) -> None:
    """Publish `values` to the queue `env` names, the way a gateway does, in a process of its own."""
    code = (
        "import asyncio, sys\n"
        "from llmtap.config import Settings\n"
        "from llmtap.queue.base import Message, open_queue\n"
        "async def main():\n"
        "    q = open_queue(Settings())\n"
        "    await q.connect('producer')\n"
        "    await q.publish([Message('k', v.encode()) for v in sys.argv[1:]])\n"
        "    await q.close()\n"
        "asyncio.run(main())\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, *(v.decode() for v in values)], env=env, check=True, timeout=60
    )


def test_admin_commands_take_data_dir_after_their_name(tmp_path: Path) -> None:
    """`llmtap status --data-dir X` looks where `llmtap up --data-dir X` ran (they had no such
    flag: only LLMTAP_DATA_DIR, easy to forget in another shell)."""
    ran = tmp_path / "ran-here"
    env = llmtap_env(tmp_path / "elsewhere")
    _publish({**env, "LLMTAP_DATA_DIR": str(ran)}, b"one", b"two")
    r = _llmtap(env, "status", "--json", "--data-dir", str(ran), cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["lag"] == 2, r.stderr
    r = _llmtap(env, "dlq", "list", "--data-dir", str(ran), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _llmtap(env, "status", cwd=tmp_path).returncode == 1  # LLMTAP_DATA_DIR: nothing there
    assert not (tmp_path / "elsewhere").exists()


def test_read_only_commands_still_read_an_existing_queue(tmp_path: Path) -> None:
    env = llmtap_env(tmp_path / "data")
    _publish(env, b"not a record")
    r = _llmtap(env, "status", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["lag"] == 1


def test_dlq_discard_removes_named_letters_for_good_after_asking(tmp_path: Path) -> None:
    """Found by the disk check: dead letters that can never be stored were kept for ever (30 MB
    of them in one queue file) and no command could remove them."""
    import asyncio

    from llmtap.queue.sqlite import SQLiteQueue

    env = llmtap_env(tmp_path / "data")
    _publish(env, b"not a record", b"nor this", b"nor that")

    async def dead_letter_all() -> list[str]:
        q = SQLiteQueue(str(tmp_path / "data" / "queue.db"), 6)
        await q.connect("consumer")
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while len(await q.dead_letters()) < 3:
                assert asyncio.get_running_loop().time() < deadline, "the letters never came"
                for d in await q.consume(10, 1.0):
                    await q.dead_letter(d, "cannot decode")
            return [d.id for d in await q.dead_letters()]
        finally:
            await q.close()

    ids = asyncio.run(dead_letter_all())
    assert len(ids) == 3
    r = _llmtap(env, "dlq", "discard", ids[0], "--yes", cwd=tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, "discarded 1 record(s)"), r.stderr
    r = _llmtap(env, "dlq", "discard", ids[0], "--yes", cwd=tmp_path)
    assert r.returncode == 1 and "named no dead letter" in r.stderr  # not "done"
    r = subprocess.run(
        [sys.executable, "-m", "llmtap.cli", "dlq", "discard", "--all"],
        env=env, cwd=tmp_path, input="n\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and "Aborted" in r.stderr, r.stderr  # asked, and said no
    assert ids[1] in _llmtap(env, "dlq", "list", cwd=tmp_path).stdout
    r = _llmtap(env, "dlq", "discard", "--all", "--yes", cwd=tmp_path)
    assert r.stdout.strip() == "discarded 2 record(s)", r.stderr
    assert json.loads(_llmtap(env, "status", "--json", cwd=tmp_path).stdout)["dead_letters"] == 0


def test_status_names_spool_bytes_a_replay_could_not_read(tmp_path: Path) -> None:
    """They were kept in spool/corrupt/ with one log line, and nothing counted them after."""
    env = llmtap_env(tmp_path / "data")
    _publish(env, b"not a record")
    corrupt = tmp_path / "data" / "spool" / "corrupt"
    corrupt.mkdir(parents=True)
    (corrupt / "gw-1.0.bin").write_bytes(b"x" * 123)
    r = _llmtap(env, "status", "--json", cwd=tmp_path)
    info = json.loads(r.stdout)
    assert (r.returncode, info["spool_unreadable_bytes"], info["spool_bytes"]) == (0, 123, 0), r.stderr
    assert any("123 unreadable spool bytes" in n and str(corrupt) in n for n in info["notes"]), info
    r = _llmtap(env, "status", cwd=tmp_path)
    assert "note          123 unreadable spool bytes (their records are lost)" in r.stdout, r.stdout


def test_status_says_what_waits_in_held_segments_for_the_ingest_endpoint(tmp_path: Path) -> None:
    """Records the queue refused wait in `-held` segments while the ingest endpoint is down: a
    spool that stayed full said only its size, not that those records wait, nor for what."""
    from llmtap.gateway.spool import DiskSpool

    env = llmtap_env(tmp_path / "data")
    _publish(env, b"not a record")
    spool = DiskSpool(tmp_path / "data" / "spool", 1 << 20)
    spool.write_segment([b"x" * 100, b"y" * 50])
    spool.append([b"z" * 10])
    spool.close()
    r = _llmtap(env, "status", "--json", cwd=tmp_path)
    info = json.loads(r.stdout)
    assert 150 < info["spool_held_bytes"] < info["spool_bytes"], info
    said = f"{info['spool_held_bytes']} of the spool's bytes are records the queue refused"
    assert any(n.startswith(said) and "LLMTAP_INGEST_URL" in n for n in info["notes"]), info
    r = _llmtap(env, "status", cwd=tmp_path)
    assert f"note          {said}" in r.stdout, r.stdout
    assert "tried every 30 s; 10 min after a gateway first tried one" in r.stdout, r.stdout


@pytest.mark.parametrize("as_json", [False, True])
def test_status_exits_1_when_the_queue_is_unreachable_in_both_forms(tmp_path: Path, as_json: bool) -> None:
    env = llmtap_env(tmp_path, queue=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    r = _llmtap(env, "status", *(["--json"] if as_json else []), cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    if as_json:
        info = json.loads(r.stdout)  # the JSON is still printed, for scripts that parse it
        assert info["reachable"] is False and info["error"]
    else:
        assert "UNREACHABLE" in r.stdout


@pytest.mark.parametrize("queue", ["kafka://127.0.0.1:{port}/t", "redis://127.0.0.1:{port}/0"])
def test_an_admin_command_on_an_unreachable_queue_says_one_line(tmp_path: Path, queue: str) -> None:
    """aiokafka's own "Unable connect to ..." ERROR reached stderr above llmtap's sentence: the
    admin commands set up no logging, so Python's last-resort handler printed it."""
    env = llmtap_env(tmp_path, queue=queue.format(port=free_port()))  # nothing listens there
    r = _llmtap(env, "dlq", "list", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmtap: cannot reach "), r.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_is_taken_before_or_after_the_command_and_near_miss_variables_are_named(
    tmp_path: Path, where: str
) -> None:
    """`llmtap status --config x.toml` as well as `llmtap --config x.toml status`; a variable one
    letter off a setting is named with the setting it resembles (it was silently ignored), while
    other tools' `LLMTAP_*` variables (`scripts/services.sh` ports) are left alone."""
    queue = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: status says so, exits 1
    config = tmp_path / "llmtap.toml"
    config.write_text(f'queue = "{queue}"\n')
    env = llmtap_env(tmp_path / "data")
    env["LLMTAP_QUEU"] = "kafka://typo:9092/t"
    env["LLMTAP_KAFKA_PORT"] = "29092"
    args = ["--config", str(config), "status"] if where == "before" else ["status", "--config", str(config)]
    r = _llmtap(env, *args, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert queue.removeprefix("redis://").split("/")[0] in r.stdout + r.stderr  # the file's queue
    warnings = [x for x in r.stderr.splitlines() if x.startswith("llmtap: warning:")]
    assert warnings == [
        "llmtap: warning: LLMTAP_QUEU is not a setting (did you mean LLMTAP_QUEUE?); it is ignored"
    ]


def test_a_flag_wins_over_the_environment_which_wins_over_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old `LLMTAP_DATA_DIR` in the shell beat `llmtap up --data-dir X` (an outside check):
    the logs went where the user had not asked."""
    config = tmp_path / "llmtap.toml"
    config.write_text(f'gateway_port = 1001\nserver_port = 2001\ndata_dir = "{tmp_path / "file"}"\n')
    for name in [k for k in os.environ if k.startswith("LLMTAP_") and not k.startswith("LLMTAP_TEST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LLMTAP_GATEWAY_PORT", "1002")
    monkeypatch.setenv("LLMTAP_DATA_DIR", str(tmp_path / "env"))
    s = load_settings(config, gateway_port=1003, data_dir=str(tmp_path / "flag"), server_port=None)
    assert (s.gateway_port, s.data_dir, s.server_port) == (1003, tmp_path / "flag", 2001)
    s = load_settings(config)
    assert (s.gateway_port, s.data_dir, s.server_port) == (1002, tmp_path / "env", 2001)
    with pytest.raises(ConfigError, match="LLMTAP_GATEWAY_PORT"):
        load_settings(config, gateway_port=-5)  # a bad flag is named like the setting
    assert load_settings(config).gateway_port == 1002  # and leaves nothing behind


@pytest.mark.parametrize(
    ("line", "said"),
    [
        (
            "LLMTAP_GATEWAY_PROT = 1",
            "unknown setting 'LLMTAP_GATEWAY_PROT' in config file {f} (did you mean LLMTAP_GATEWAY_PORT?)",
        ),
        (
            "gateway_prot = 1",
            "unknown setting 'gateway_prot' in config file {f} (did you mean gateway_port?)",
        ),
        ("zzz = 1", "unknown setting 'zzz' in config file {f}"),
    ],
)
def test_a_mistyped_config_file_key_is_named_as_written_with_its_file(
    tmp_path: Path, line: str, said: str
) -> None:
    config = tmp_path / "llmtap.toml"
    config.write_text(line + "\n")
    with pytest.raises(ConfigError) as e:
        load_settings(config)
    assert str(e.value) == said.format(f=config)


def test_a_key_created_in_single_tenant_mode_says_it_is_not_checked(tmp_path: Path) -> None:
    env = llmtap_env(tmp_path / "data")
    r = _llmtap(env, "keys", "create", "--tenant", "acme", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("lt_"), r.stderr
    assert "keys are checked only in multi-tenant mode (LLMTAP_MULTI_TENANT=true)" in r.stderr
    env["LLMTAP_MULTI_TENANT"] = "true"
    r = _llmtap(env, "keys", "create", "--tenant", "acme", cwd=tmp_path)
    assert r.returncode == 0 and "multi-tenant mode" not in r.stderr


def test_ctrl_c_during_an_admin_command_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """Ctrl-C while a command waited on a locked store: a TypeError traceback (its result was
    None), and `dlq replay` said 'replayed None record(s)' with exit 0."""
    import signal
    import sqlite3
    import time

    env = llmtap_env(tmp_path)
    assert _llmtap(env, "keys", "create", "--tenant", "acme", cwd=tmp_path).returncode == 0
    lock = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # the command waits for it (SQLite's busy timeout)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmtap.cli", "keys", "list"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # As a terminal starts it: a suite run in the background (CI) inherits SIGINT ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        # Interrupted once it opened the store (inside the command, waiting on the lock).
        deadline = time.monotonic() + 60
        fds = Path(f"/proc/{proc.pid}/fd")
        while not any(str(tmp_path / "store.db") == os.path.realpath(f) for f in _links(fds)):
            assert time.monotonic() < deadline and proc.poll() is None, "the command never opened the store"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and err.strip().startswith("llmtap: interrupted"), err


def _links(fds: Path) -> list[Path]:
    try:
        return list(fds.iterdir())
    except OSError:
        return []


def test_a_letter_written_by_hand_lists_escaped_and_never_blocks_the_others(tmp_path: Path) -> None:
    """A letter whose key is not UTF-8 failed `dlq list` and `dlq replay --all` for every letter
    (exit 2); an id or reason holding a terminal escape was printed raw; an id named twice was
    replayed twice."""
    import sqlite3
    import time

    env = llmtap_env(tmp_path)
    _publish(env, b"seed")  # makes the queue file
    with sqlite3.connect(tmp_path / "queue.db") as db:
        db.executemany(
            'INSERT INTO dead_letters (id, partition, "offset", key, value, reason, failed_at)'
            " VALUES (?, ?, ?, CAST(? AS TEXT), ?, ?, ?)",
            [
                ("g1", 0, 1, b"\xff\xfeA", b"\x00", "r", time.time()),
                ("g2\x1b]0;pwned\x07", "zero", "x", b"k", b"v", "two\nlines", "soon"),
                ("g3", 0, 3, b"k", b"w", "fine", time.time()),
            ],
        )
    r = _llmtap(env, "dlq", "list", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and "\x1b" not in r.stdout, r.stdout
    assert any(line.startswith("g2\\x1b]0;pwned\\x07") and "two\\nlines" in line for line in lines), lines
    r = _llmtap(env, "dlq", "replay", "g3", "g3", cwd=tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, "replayed 1 record(s)"), r.stderr
    r = _llmtap(env, "dlq", "replay", "--all", cwd=tmp_path)
    assert (r.returncode, r.stdout.strip()) == (0, "replayed 2 record(s)"), r.stderr


def test_mistakes_the_cli_review_found_are_one_sentence_each(tmp_path: Path) -> None:
    """Each was a traceback, or silently something else (an empty LLMTAP_HOST bound every
    address; an empty --tenant was the default tenant's)."""
    import socket

    env = llmtap_env(tmp_path / "d")
    bad_toml = tmp_path / "c.toml"
    bad_toml.write_bytes(b"\xff\xfe")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = [
            ({"LLMTAP_HOST": ""}, ["status"], "invalid setting LLMTAP_HOST: is empty"),
            ({"LLMTAP_DATA_DIR": ""}, ["status"], "invalid setting LLMTAP_DATA_DIR: is empty"),
            ({}, ["status", "--config", str(bad_toml)], "is not UTF-8 text"),
            ({}, ["status", "--config", str(bad_toml / "x")], "cannot be read: Not a directory"),
            ({}, ["keys", "create", "--tenant", ""], "Invalid value for '--tenant'"),
            ({}, ["webhooks", "list", "--tenant", " "], "Invalid value for '--tenant'"),
            ({}, ["dlq", "list", "--limit", "-1"], "Invalid value for '--limit'"),
            ({}, ["worker", "--worker-port", port], f"cannot listen on 127.0.0.1:{port}"),
            ({}, ["fake-upstream", "--port", port], f"cannot listen on 127.0.0.1:{port} for the fake"),
        ]
        # the deploy audit: a key pasted into the wrong setting was echoed back
        key = "sk-proj-" + "A1b2C3d4" * 5
        cases += [
            ({"LLMTAP_GATEWAY_PORT": key}, ["status"], "GATEWAY_PORT: Input should be a valid integer"),
            ({"LLMTAP_LOG_LEVEL": f"Bearer {key}"}, ["status"], "(a credential: not shown)"),
            # rev18a: with a space or quotes around it, or inside a list setting, it was shown
            # (a key anywhere in a value makes it a credential since rev23: not shown at all)
            ({"LLMTAP_GATEWAY_PORT": f" {key}"}, ["status"], "(a credential: not shown)"),
            ({"LLMTAP_GATEWAY_PORT": f'"{key}"'}, ["status"], "LLMTAP_GATEWAY_PORT"),
            ({"LLMTAP_UPSTREAMS": f"a=http://x,{key}"}, ["status"], "LLMTAP_UPSTREAMS: entry '***'"),
        ]
        for extra, args, says in cases:
            r = _llmtap({**env, **extra}, *args, cwd=tmp_path)
            assert r.returncode == 2 and says in r.stderr, (args, r.returncode, r.stderr)
            assert "Traceback" not in r.stderr and key not in r.stderr, (args, r.stderr)


def test_a_start_up_error_never_shows_a_password_whatever_shape_the_setting_has(tmp_path: Path) -> None:
    """rev20: a config file's list where a URL was expected was shown whole (`(got [...])`), a
    forgotten upstream name echoed its URL, a tab in a URL hid its password from the URL
    parser, and `user:2024#pass@host` read as a port and a fragment was accepted and logged."""
    env = llmtap_env(tmp_path / "d")
    secret = "hunter2ZQX"
    files = {
        "store": f'store = ["postgresql://u:{secret}@h/db"]',
        "queue": f'queue = ["redis://:{secret}@h:6379/0"]',
        "upstreams": f'upstreams = ["vllm=http://u:{secret}@h"]',
        "openai_base_url": f'openai_base_url = ["https://h.example/v1?api-key={secret}"]',
    }
    cases: list[tuple[dict[str, str], list[str], str]] = []
    for name, line in files.items():
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(line + "\n")
        cases.append(({}, ["--config", str(cfg), "status"], f"LLMTAP_{name.upper()}: Input should be"))
    cases += [
        ({"LLMTAP_UPSTREAMS": f"https://admin:{secret}@llm.internal/v1?x=y"}, ["status"], "upstream name"),
        ({"LLMTAP_OPENAI_BASE_URL": f"http://admin:hun\t{secret}@llm.internal"}, ["status"], "credentials"),
        ({"LLMTAP_INGEST_URL": f"http://admin:2024#{secret}@127.0.0.1:9"}, ["status"], "%23"),
        ({"LLMTAP_WEBHOOK_URL": f"http://admin:2024?{secret}@127.0.0.1:9"}, ["status"], "%3F"),
        # (a base takes no credentials at all: said so before its fragment since rev24)
        ({"LLMTAP_OPENAI_BASE_URL": f"http://admin:2024#{secret}@llm.internal"}, ["status"], "credentials"),
        # rev21: without `//` no parser finds a userinfo
        ({"LLMTAP_OPENAI_BASE_URL": f"user:{secret}@proxy.internal:8080"}, ["status"], "http://"),
        ({"LLMTAP_QUEUE": f"user:{secret}@redis:6379"}, ["status"], "LLMTAP_QUEUE"),
        ({"LLMTAP_STORE": f"postgresql:/llmtap:{secret}@h/db"}, ["status"], "LLMTAP_STORE"),
        ({"LLMTAP_UPSTREAMS": f"vllm=https:u:{secret}@h"}, ["status"], "upstream 'vllm'"),
    ]
    for extra, args, says in cases:
        r = _llmtap({**env, **extra}, *args, cwd=tmp_path)
        assert r.returncode == 2 and says in r.stderr, (args, extra, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and secret not in r.stderr, (args, extra, r.stderr)
        assert "***" in r.stderr, (args, extra, r.stderr)
    # rev23: a password holding `/`, `,` or `;` was shown in part (each half is a secret here)
    head, tail = "QhunZQ", "ter2XQ"
    halves = [
        {"LLMTAP_INGEST_URL": f"https://u:{head}/{tail}?x=1@127.0.0.1:9"},
        {"LLMTAP_OPENAI_BASE_URL": f"http://user:2024/{head}{tail}@llm.internal"},  # rev24: accepted
        {"LLMTAP_STORE": f"postgresql://user:2024/{head}?a=b@{tail}/db"},
        # rev25: SQS's own messages quoted the URL whole
        {"LLMTAP_QUEUE": f"sqs://q?endpoint=http://u:{head}{tail}@127.0.0.1:9&wait_seconds=x"},
        {"LLMTAP_QUEUE": f"sqs://u:{head}{tail}@q"},
        {"LLMTAP_QUEUE": f"redis://user:{head}/{tail}?password=1@127.0.0.1:9/0"},
        {"LLMTAP_UPSTREAMS": f"x=https://user:{head},{tail}@llm.internal"},
        {"LLMTAP_STREAM_USAGE_SKIP": f"openai,https://user:{head}{tail}@llm.internal"},
        {"LLMTAP_QUEUE": f"redis://127.0.0.1:9/0?password={head};{tail}"},  # the status shows it
    ]
    for extra in halves:
        r = _llmtap({**env, **extra}, "status", cwd=tmp_path)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (extra, r.stderr)
        assert head not in r.stderr + r.stdout and tail not in r.stderr + r.stdout, (extra, r.stderr)


def test_erase_a_user_for_good_through_llmtap_up(tmp_path: Path) -> None:
    """`llmtap erase --user`: a data subject's requests leave the API, the search and the
    totals, and their body files leave the disk; another user's stay. Nothing matched is exit 1."""
    import sqlite3

    import openai

    from procs import fake_upstream, http_json, list_records, running_up, stored_count, wait_until

    with (
        fake_upstream(tmp_path) as upstream,
        running_up(tmp_path, openai_base_url=upstream, inline_body_bytes=0) as up,
    ):
        client = openai.OpenAI(base_url=f"{up.gw}/openai/v1", api_key="sk-test", max_retries=0)
        for user, n in (("user-42", 3), ("user-7", 2)):
            for i in range(n):
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": f"secret of {user} #{i}"}],
                    extra_headers={"Llmtap-User-Id": user},
                )
        wait_until(lambda: stored_count(up.api) == 5, 60, what="5 stored")
        # Where each body lies (inline limit 0: all in files, packed by batch with other users')
        db = sqlite3.connect(tmp_path / "data" / "store.db")
        refs = {
            user: [json.loads(b)["ref"] for row in rows for b in row]
            for user in ("user-42", "user-7")
            if (
                rows := db.execute(
                    "SELECT request_body, response_body FROM requests WHERE user_id = ?", (user,)
                ).fetchall()
            )
        }
        db.close()
        assert len(refs["user-42"]) == 6 and len(refs["user-7"]) == 4

        def span(ref: str) -> bytes:
            name, _, where = ref.partition("#")
            offset, _, length = where.partition("+")
            with open(tmp_path / "data" / "bodies" / name, "rb") as f:
                return os.pread(f.fileno(), int(length), int(offset))

        kept = {ref: span(ref) for ref in refs["user-7"]}
        env = llmtap_env(tmp_path / "data")
        r = _llmtap(env, "erase", "--user", "user-42", "--yes", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "erased 3 request(s) and 6 bodies in tenant default", r.stdout
        assert list_records(up.api, user_id="user-42") == []
        assert list_records(up.api, q="secret of user-42") == []
        others = list_records(up.api)
        assert [x["user_id"] for x in others] == ["user-7", "user-7"]
        assert stored_count(up.api) == 2  # the totals no longer count them
        for ref in refs["user-42"]:  # its bytes are gone from the disk ...
            assert span(ref).strip(b"\0") == b"", ref
        assert {ref: span(ref) for ref in refs["user-7"]} == kept  # ... the packs' other bodies stay
        status, body = http_json("GET", f"{up.api}/api/v1/requests/{others[0]['id']}")
        assert status == 200 and "secret of user-7" in json.dumps(body), body
        again = _llmtap(env, "erase", "--user", "user-42", "--yes", cwd=tmp_path)
        assert again.returncode == 1 and "nothing matched" in again.stderr, again.stderr
        assert "erased 0 request(s)" in again.stdout
        none = _llmtap(env, "erase", "--yes", cwd=tmp_path)
        assert none.returncode == 2 and "name what to erase" in none.stderr
        both = _llmtap(env, "erase", "--user", "user-7", "--session", "s1", "--yes", cwd=tmp_path)
        assert both.returncode == 2 and "not both" in both.stderr  # it read as "and", meant "or"
        typo = _llmtap(llmtap_env(tmp_path / "data-typo"), "erase", "--user", "user-7", "--yes", cwd=tmp_path)
        assert typo.returncode == 1 and "no store here" in typo.stderr, typo.stderr

        # A body store that refuses: the rows go, their refs are kept and erased at the next run.
        first = others[0]["id"]
        db = sqlite3.connect(tmp_path / "data" / "store.db")
        (row,) = db.execute(
            "SELECT request_body, response_body FROM requests WHERE id = ?", (first,)
        ).fetchall()
        db.close()
        mine = [json.loads(b)["ref"] for b in row]
        pack = tmp_path / "data" / "bodies" / mine[0].partition("#")[0]
        pack.rename(pack.with_suffix(".away"))
        pack.mkdir()  # what no write goes into
        failed = _llmtap(env, "erase", "--request", first, "--yes", cwd=tmp_path)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
        assert "could not be erased yet" in failed.stderr and "run `llmtap erase` again" in failed.stderr
        owed = tmp_path / "data" / "erase-owed.txt"
        assert set(owed.read_text().split()) >= {mine[0]}
        pack.rmdir()
        pack.with_suffix(".away").rename(pack)
        second = others[1]["id"]
        done = _llmtap(env, "erase", "--request", second, "--yes", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert not owed.exists()
        for ref in mine:
            assert span(ref).strip(b"\0") == b"", ref  # the first request's bodies: gone now
        assert stored_count(up.api) == 0

    # A dead letter holding the user's record would store it again when replayed: named.
    import asyncio

    from llmtap.queue.base import Message
    from llmtap.queue.sqlite import SQLiteQueue
    from llmtap.record import encode
    from store_helpers import rec

    async def dead_letter_of(user: str) -> None:
        q = SQLiteQueue(str(tmp_path / "data" / "queue.db"), partitions=1)  # the file keeps its own count
        await q.connect("both")
        try:
            await q.publish([Message(key="k", value=encode(rec(1, tenant="default", user_id=user)))])
            got: list = []
            while not got:
                got = await q.consume(10, 1.0)
            await q.dead_letter(got[0], "test: a record that could not be stored")
        finally:
            await q.close()

    asyncio.run(dead_letter_of("user-7"))
    named = _llmtap(env, "erase", "--user", "user-7", "--yes", cwd=tmp_path)
    assert "1 dead letter(s) hold these requests" in named.stderr and "llmtap dlq discard" in named.stderr, (
        named.stderr
    )


def test_listings_write_stored_control_characters_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    """A user id sent as `evil\\x1b[2J` (or C1's `\\x9b`) reached the terminal raw through
    `llmtap alerts list` (unicode check): escape sequences run by whoever reads the listing."""
    from llmtap import cli

    cli._listing(["FIRING for evil\x1b[2J\x9b2J\x85 日本 🙂 \u202egnp.exe"], lambda row: row, "none")
    assert capsys.readouterr().out == "FIRING for evil\\x1b[2J\\x9b2J\\x85 日本 🙂 \\u202egnp.exe\n"


def test_looking_at_a_queue_made_with_other_partitions_says_nothing_about_them(tmp_path: Path) -> None:
    """The server's ingest queue is made with 4 partitions: `llmtap dlq list` on it (as the
    README says) warned "created with 4 partitions; using that, not 6" before its answer. A
    service that publishes to it with another count is still told."""
    env = llmtap_env(tmp_path / "data")
    made = {**env, "LLMTAP_PARTITIONS": "4"}
    _publish(made, b"one")
    r = _llmtap(env, "dlq", "list", cwd=tmp_path)
    assert r.returncode == 0 and "no dead letters" in r.stderr, r.stderr
    assert "partitions" not in r.stderr, r.stderr
    r = _llmtap(env, "status", cwd=tmp_path)
    assert "partitions;" not in r.stderr, r.stderr
    _publish(env, b"two")  # a producer with the default 6: warned, and it uses the file's 4
    r = _llmtap(env, "status", "--json", cwd=tmp_path)
    assert json.loads(r.stdout)["lag"] == 2
