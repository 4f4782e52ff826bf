"""Every ``postroom`` command that reads a config, run against broken configs: one clear message, never a traceback.

The commands are found by walking the click tree, so a new command is covered (or this test asks for the value
of its new required argument).  The daemons run as real processes with a timeout: a config mistake must stop them
at start, not after they bound their socket.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from postroom.admin.cli import main
from postroom_testbed import free_port
from tests.test_config_check import GOOD

# Every config points at a Redis nobody listens on and at a database in the test's own folder, so nothing here
# touches the machine's /var/lib/postroom or its Redis.
SERVICES = """\
[redis]
url = "{redis}"
timeout_seconds = 0.5
[database]
url = "{database}"
"""

# name -> config text (None: the file does not exist); every one of these stops every command that reads it
BROKEN: dict[str, str | None] = {
    "missing file": None,
    "empty file": "",
    "not TOML": "[milter\n",
    "not UTF-8": "# \xff\n",
    "redis url is http": GOOD + SERVICES.replace("{redis}", "http://127.0.0.1:6379"),
    "database driver missing": GOOD + SERVICES.replace("{database}", "mysql://x"),
    "unknown agent": GOOD.replace('["meier"]', '["meier", "nobody"]') + SERVICES,
    "two agents one address": GOOD + '[agents.mueller]\naddress = "meier@example.test"\n' + SERVICES,
    "unknown key": GOOD + SERVICES + "sokcet = 'x'\n",
}
# These stop the daemons; a command that does not need what is missing may run (but never with a traceback).
INCOMPLETE: dict[str, str] = {
    "database folder impossible": GOOD + SERVICES.replace("{database}", "sqlite:////dev/null/postroom/h.sqlite3"),
    "missing dkim key": GOOD + SERVICES + '[dkim."example.test"]\nselector = "s"\nkey_file = "nope.key"\n',
    "missing rules file": 'rules_file = "nope.toml"\n' + GOOD + SERVICES,
    "missing canned dir": GOOD.replace("[redis]", "") + 'canned_dir = "nope"\n' + SERVICES,
}
DAEMONS = {"milter", "smtpd"}
# Not run here: the demo reads no config (tests/test_demo.py), the hidden worker gets its config from the milter
# process over a socket (tests/test_milter_worker.py), dkim genkey and config example read none (tests/test_cli.py,
# tests/test_deploy_guide.py).
NO_CONFIG = {"demo", "milter-worker", "dkim genkey", "config example"}
# imap-event reads its mail from stdin (empty here); imap-event-followup gets the JSON imap-event makes.
FOLLOWUP = (
    '{"mailbox": "support@example.test", "number": 1, "message_id": "<m@x>", "dropped_in": "Meier", '
    '"move_to": "", "note_folder": "Meier", "note_subject": "s", "note_body": "b"}'
)
ARGUMENTS = {
    "number": "1",
    "agent": "meier",
    "path": "RULES",
    "message_path": "MAIL",
    "folder": "Support/Meier",
    "user": "meier",
    "followup_json": FOLLOWUP,
}


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out: list[tuple[tuple[str, ...], click.Command]] = []
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            out += commands(cmd, (*prefix, name))
        else:
            out.append(((*prefix, name), cmd))
    return out


def argv(name: tuple[str, ...], cmd: click.Command, config: Path, files: dict[str, Path]) -> list[str]:
    args = [*name, "--config", str(config)]
    for param in cmd.params:
        if isinstance(param, click.Argument) and param.required:
            assert param.name in ARGUMENTS, f"{' '.join(name)}: give a value for its argument {param.name}"
            value = ARGUMENTS[param.name]
            args.append(str(files[value]) if value in files else value)
    return args


def write_configs(folder: Path, configs: dict[str, str | None]) -> dict[str, Path]:
    services = {"redis": f"redis://127.0.0.1:{free_port()}/0", "database": f"sqlite:///{folder}/h.sqlite3"}
    out = {}
    for n, (name, text) in enumerate(configs.items()):
        path = folder / f"c{n}.toml"
        if text is not None:
            filled = text.replace("{redis}", services["redis"]).replace("{database}", services["database"])
            path.write_bytes(filled.encode("latin-1") if name == "not UTF-8" else filled.encode())
        out[name] = path
    return out


@pytest.fixture
def broken(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "broken").mkdir()
    return write_configs(tmp_path / "broken", BROKEN)


@pytest.fixture
def incomplete(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "incomplete").mkdir()
    return write_configs(tmp_path / "incomplete", dict(INCOMPLETE))


def test_the_walk_finds_every_command() -> None:
    names = {" ".join(n) for n, _ in commands(main)}
    assert {"milter", "smtpd", "config check", "tickets list", "rules test", "db upgrade"} <= names


@pytest.mark.parametrize("name", [n for n, _ in commands(main) if " ".join(n) not in NO_CONFIG | DAEMONS], ids=" ".join)
def test_no_traceback_for_a_broken_config(
    tmp_path: Path, broken: dict[str, Path], incomplete: dict[str, Path], name: tuple[str, ...]
) -> None:
    cmd = dict(commands(main))[name]
    files = {"RULES": tmp_path / "rules.toml", "MAIL": tmp_path / "mail.eml"}
    files["RULES"].write_text('[[rule]]\nname = "x"\ntag = "y"\n')
    files["MAIL"].write_bytes(b"From: a@b.test\r\nTo: support@example.test\r\nSubject: s\r\n\r\nhi\r\n")
    env = {var: None for var in os.environ if var.startswith("POSTROOM_")}
    for what, config in {**broken, **incomplete}.items():
        res = CliRunner().invoke(main, argv(name, cmd, config, files), env=env)
        where = f"{' '.join(name)} with {what}"
        assert res.exception is None or isinstance(res.exception, SystemExit), f"{where}: {res.exception!r}"
        assert "Traceback" not in res.output, f"{where}:\n{res.output}"
        if what in broken:
            assert res.exit_code == 2, f"{where}: exit {res.exit_code}\n{res.output}"
            assert str(config) in res.output, f"{where}: {res.output}"


@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_daemons_stop_at_start_with_one_line_per_mistake(
    broken: dict[str, Path], incomplete: dict[str, Path], daemon: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    procs = {
        what: subprocess.Popen(
            [sys.executable, "-m", "postroom", daemon, "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for what, config in {**broken, **incomplete}.items()
    }
    try:
        for what, proc in procs.items():
            _, stderr = proc.communicate(timeout=120)
            where = f"{daemon} with {what}"
            assert proc.returncode != 0, f"{where} started:\n{stderr}"
            assert "Traceback" not in stderr, f"{where}:\n{stderr}"
            assert stderr.strip(), where
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("engine", ["libmilter", "asyncio"])
def test_a_milter_socket_in_a_missing_folder_is_one_line(tmp_path: Path, engine: str) -> None:
    config = tmp_path / "postroom.toml"
    services = SERVICES.format(redis=f"redis://127.0.0.1:{free_port()}/0", database=f"sqlite:///{tmp_path}/h.sqlite3")
    milter = f'[milter]\nsocket = "unix:{tmp_path}/nope/milter.sock"\nengine = "{engine}"\n'
    config.write_text(GOOD + services + milter)
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "postroom", "milter", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot listen on [milter] socket unix:{tmp_path}/nope/milter.sock" in proc.stderr
