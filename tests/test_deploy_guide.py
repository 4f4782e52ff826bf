"""docs/deploy-milter.md, followed literally: its shell blocks, taken from the file and run in order as root.

They run against private instances: a Postfix, Dovecot and Redis of the testbed, and a temp folder standing in
for /opt, /etc/postroom and /etc/systemd/system (the guide's variables at its top, which a site changes the same
way).  Commands that address the machine's own services get a stand-in first on PATH: ``postconf``, ``postfix``
and ``doveadm`` add ``-c`` for the private instance; ``systemctl enable --now`` starts the installed unit's
ExecStart as the unit's User and Group, ``journalctl -u`` prints what it logged.  The guide ends with a customer's
answer in the agent's folder; this test reads it over IMAP.  Whatever blocks the guide has are run, so a new
section is covered as soon as it is written; a block after a ``<!-- guide test: not run ... -->`` comment is not
(only step 3's Dovecot set-up, which needs the site's own Dovecot; tests/test_imap_event_e2e.py runs what it writes).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom_testbed import Login, MailUser, Stack, StackError

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "deploy-milter.md"
SUPPORT = "support@example.test"


# A ```sh block right after this comment is shown but not run; the comment says why (the site's own Dovecot).
_NOT_RUN = r"(<!-- guide test: not run(?:(?!-->).)*-->\n)?"


def _sh_blocks(markdown: str) -> list[tuple[bool, str]]:
    """(run, text) of every ```sh block, in order."""
    found = re.findall(_NOT_RUN + r"^```sh\n(.*?)^```", markdown, re.M | re.S)
    return [(not marker, text) for marker, text in found]


def shell_blocks(markdown: str) -> list[str]:
    return [text for run, text in _sh_blocks(markdown) if run]


def test_the_guide_has_the_steps_this_test_relies_on() -> None:
    blocks = shell_blocks(GUIDE.read_text())
    assert blocks[0].lstrip().startswith("PREFIX=${PREFIX:-/opt/postroom}")
    assert any("./dev install" in b for b in blocks)
    assert any("systemctl enable --now postroom-milter" in b for b in blocks)
    # Only the Dovecot block that needs the site's own Dovecot is left out; tests/test_imap_event_e2e.py runs it.
    left_out = [text for run, text in _sh_blocks(GUIDE.read_text()) if not run]
    assert len(left_out) == 1 and "dovecot-snippet --config" in left_out[0], left_out


def _stand_ins(bin_dir: Path, stack: Stack, units: Path, logs: Path, state: Path) -> None:
    postfix_conf = stack.postfix.config_dir
    scripts = {
        "postconf": f'exec /usr/sbin/postconf -c "{postfix_conf}" "$@"',
        "postfix": f'exec /usr/sbin/postfix -c "{postfix_conf}" "$@"',
        "doveadm": f'exec /usr/bin/doveadm -c "{stack.dovecot.config_path}" "$@"',
        "journalctl": f'[ "$1" = -u ] && exec cat "{logs}/$2.log"; echo "journalctl stand-in: $*" >&2; exit 2',
        "systemctl": textwrap.dedent(
            f"""\
            set -eu
            case "$1" in
              daemon-reload) exit 0 ;;
              enable)
                [ "$2" = --now ] || exit 2
                shift 2
                for name in "$@"; do
                  case "$name" in
                    # A timer is installed and its service verifiable; the test does not wait for its calendar.
                    *.timer) [ -f "{units}/$name" ] && [ -f "{units}/${{name%.timer}}.service" ] || exit 1; continue ;;
                  esac
                  unit="{units}/$name.service"
                  cmd=$(sed -n 's/^ExecStart=//p' "$unit")
                  user=$(sed -n 's/^User=//p' "$unit"); group=$(sed -n 's/^Group=//p' "$unit")
                  # RuntimeDirectory= and StateDirectory= of the unit: made (or handed over) to its user.
                  mkdir -p -m 0750 "{logs}/run" && chown "$user:$group" "{logs}/run"
                  chown -R "$user:$group" "{state}"
                  setsid setpriv --reuid="$user" --regid="$group" --init-groups $cmd \\
                      >"{logs}/$name.log" 2>&1 </dev/null &
                  echo $! >"{logs}/$name.pid"
                  for _ in $(seq 100); do [ -S "{logs}/run/milter.sock" ] && continue 2; sleep 0.2; done
                  echo "$name did not start:" >&2; cat "{logs}/$name.log" >&2; exit 1
                done ;;
              *) echo "systemctl stand-in: $*" >&2; exit 2 ;;
            esac
            """
        ),
    }
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(0o755)


@pytest.fixture
def world() -> Iterator[Path]:
    # Not pytest's tmp_path: the postroom user must reach the venv, the config and the socket, as under /opt.
    root = Path(tempfile.mkdtemp(prefix="postroom-guide-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        pidfile = root / "logs" / "postroom-milter.pid"
        if pidfile.exists():
            _stop_group(int(pidfile.read_text()))
        shutil.rmtree(root, ignore_errors=True)


def _stop_group(pgid: int) -> None:
    """The stand-in systemctl started the milter with setsid: stop its process group as systemd would."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def test_deploy_milter_md_step_by_step(world: Path) -> None:
    users = [MailUser(SUPPORT)]
    logins = [Login("meier"), Login("mueller"), Login("schulze")]
    with Stack(users=users, logins=logins, domains=("example.test", "customer.example")) as stack:
        units, logs, conf_d = world / "units", world / "logs", world / "dovecot.d"
        for folder in (units, logs, conf_d):
            folder.mkdir()
        # The private Dovecot reads a conf.d as Debian's does, for the guide's snippet.
        with stack.dovecot.config_path.open("a") as conf:
            conf.write(f"\n!include_try {conf_d}/*.conf\n")
        database = world / "db"
        database.mkdir()
        _stand_ins(world / "bin", stack, units, logs, database)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")},
            "PATH": f"{world / 'bin'}:{os.environ['PATH']}",
            "PREFIX": str(world / "opt" / "postroom"),
            "ETC": str(world / "etc" / "postroom"),
            "UNITS": str(units),
            "SOCKET": f"unix:{logs / 'run' / 'milter.sock'}",
            "SUBMISSION": f"127.0.0.1:{stack.postfix.submission_port}",
            "DOVECOT_CONF_D": str(conf_d),
            "MX": f"127.0.0.1:{stack.postfix.smtp_port}",
            "MAILLOG": str(stack.postfix.log_path),
            # What an admin writes into postroom.toml, given here the way the config's documentation allows.
            "POSTROOM_REDIS_URL": stack.redis.url,
            "POSTROOM_DATABASE_URL": f"sqlite:///{database / 'history.sqlite3'}",
            "POSTROOM_MILTER_SOCKET": f"unix:{logs / 'run' / 'milter.sock'}",
        }
        script = "\n".join(shell_blocks(GUIDE.read_text()))
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            check=False,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        milter_log = (logs / "postroom-milter.log").read_text() if (logs / "postroom-milter.log").exists() else ""
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n--- milter log\n{milter_log}"
        # The guide's own checks printed what it promises.
        assert re.search(r"Support #1 .*assigned to meier", proc.stdout) or "assigned to meier" in proc.stdout
        assert "OK (1 mailbox, 3 agents" in proc.stdout
        # Step 4's grep of the milter's log by the queue id Postfix logged found postroom's line about the mail.
        queue_id = re.search(r"cleanup\[\d+\]: ([0-9A-F]+): message-id=<guide-1@", stack.postfix.log_path.read_text())
        assert queue_id and f"{queue_id.group(1)}: mailbox support@example.test ticket #1 opened" in proc.stdout
        try:
            answer = stack.wait_for(SUPPORT, "Meier", 1)[-1]
        except StackError as exc:  # show what the guide printed and what the milter logged
            pytest.fail(f"{exc}\n--- guide output\n{proc.stdout}\n{proc.stderr}\n--- milter log\n{milter_log}")
        assert answer["X-Postroom-Ticket"] == "1 (Support)"
        assert "[Support #1] printer on fire" in answer["Subject"]
        first = stack.fetch(SUPPORT, "INBOX")
        assert [m["X-Postroom-Ticket"] for m in first] == ["1 (Support)"]
    # The venv is a plain (not editable) install: the demo runs from it far from the checkout, with the examples
    # it ships as package data.
    demo = subprocess.run(
        [str(world / "opt" / "postroom" / "bin" / "postroom"), "demo"],
        check=False,
        cwd="/",
        env={k: v for k, v in env.items() if not k.startswith("POSTROOM_")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "demo finished; everything it started is stopped" in demo.stdout
