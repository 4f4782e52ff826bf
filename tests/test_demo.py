"""The README's main command runs to its end and shows what it promises."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from postroom.bundle import load_all
from postroom.demo import demo_rules_path, write_config


def _run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160", "TERM": "dumb"}
    return subprocess.run(
        [sys.executable, "-m", "postroom", "demo", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def test_demo_plays_the_story_and_ends_with_the_ticket_table_and_folders(tmp_path: Path) -> None:
    # --workdir so the test can see what was left behind: only files, no process.
    proc = _run_demo("--workdir", str(tmp_path / "demo"))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "lands in support@example.test/Meier as [Support #1] Printer on fire" in out
    assert "the rule 'key account' routes it to Meier" in out
    assert "lands in support@example.test/INBOX as [Support #2] Invoice wrong" in out
    assert "lands in alice@bigcorp.example/INBOX as Re: [Support #1] Printer on fire" in out
    assert "From: Meier via Support <support@example.test>" in out
    assert "DKIM signature verifies" in out
    # The rival reply is refused with the pipeline's own SMTP reply, as the agent's mail client would show it.
    assert re.search(
        r"his mail client shows: 550 5\.7\.1 postroom: \[Support #1\] belongs to Meier since .* UTC\. "
        r"Your reply was not sent\. To take the ticket over, send it again with the first line #takeover",
        out,
    )
    assert "lands in support@example.test/Meier as AW: Re: [Support #1] Printer on fire" in out
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^│ (\d) │.*$", out, re.M)}
    assert set(rows) == {"1", "2"}
    assert re.search(
        r"alice@bigcorp.example\s+│ Printer on fire\s+│ meier\s+│ open\s+│ high\s+│ key-account", rows["1"]
    )
    # Meier took Bob's ticket with "#take" and "#remind 2d".
    assert re.search(r"bob@customer.test\s+│ Invoice wrong\s+│ meier\s+│ open\s+│ normal", rows["2"])
    # One reminder (the follow-up Bob's silence fires) and one lead digest with its chart.
    assert "followup (followup) for Support #2 to support+Meier@example.test" in out
    assert re.search(r"lands in support@example.test/Meier as \[Support #2\] Followup: follow-up due", out)
    assert "lands in schulze@example.test/INBOX as Support daily figures: backlog 2" in out
    assert "parts: multipart/alternative, text/plain, multipart/related, text/html, image/png" in out
    tree = out[out.index("Maildir folders in") :]
    assert re.search(r"alice@bigcorp.example\n.*INBOX \(1 message\)", tree)
    assert re.search(r"support@example.test\n.*INBOX \(1 message\)\n.*Meier \(5 messages\)", tree)
    assert "everything it started is stopped" in out
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "demo" / "maildir" / "support@example.test" / "Meier" / "new").is_dir()


def test_the_demo_config_and_rules_load_as_a_daemon_loads_them(tmp_path: Path) -> None:
    path = write_config(tmp_path, "redis://127.0.0.1:1/0", 2525)
    loaded = load_all(path, environ={})
    assert loaded.config.rules_file == str(demo_rules_path())
    assert [rule.name for rule in loaded.rules.rules] == ["key account"]
    assert loaded.config.redis.url == "redis://127.0.0.1:1/0"
    assert loaded.config.mailer.port == 2525
    assert loaded.keys.for_address("support@example.test") is not None


@pytest.mark.e2e
def test_postfix_demo_plays_the_story_and_ends_with_the_ticket_table() -> None:
    # A short folder: unix socket paths inside it are limited to 107 bytes.
    tmp_path = Path(tempfile.mkdtemp(prefix="pr-demo-"))
    tmp_path.chmod(0o755)  # Postfix and Dovecot run parts of the stack as their own users
    try:
        proc = _run_demo("--postfix", "--workdir", str(tmp_path))
        _check_postfix_demo(proc, tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _check_postfix_demo(proc: subprocess.CompletedProcess[str], tmp_path: Path) -> None:
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "lands in support@example.test/Meier as AW: [Support #1] Printer on fire" in out
    assert "as [Support #3] send me the invoice" in out
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^│ (\d) │.*$", out, re.M)}
    assert re.search(r"alice@customer.test\s+│ Printer on fire\s+│ meier\s+│ open", rows["1"])
    assert re.search(r"mallory@customer.test\s+│ send me the invoice\s+│ unassigned", rows["3"])
    assert re.search(r"│ 1\s+│$", rows["4"])  # the forward is linked to ticket 1
    # Meier took ticket 1 by dragging its mail into Support/Meier over IMAP, logged in with his own password.
    assert "drags it into Support/Meier: ticket #1 is now meier's" in out
    assert re.search(r"│ meier\s+│ meier-[0-9a-f]{6}\s+│ 127\.0\.0\.1:\d+\s+│ 127\.0\.0\.1:\d+\s+│ Support", out)
    assert "INBOX (3 messages)" in out and "Meier (2 messages)" in out
    assert "everything it started is stopped" in out
    # --workdir is honoured, and the milter's log it names is still there to read.
    log = re.search(r"the milter's log stays in (\S+)", out)
    assert log, out
    assert Path(log.group(1)).is_file() and Path(log.group(1)).is_relative_to(tmp_path)
    assert "opened (new)" in Path(log.group(1)).read_text()


def test_sigterm_to_a_kept_demo_stops_its_redis_server(tmp_path: Path) -> None:
    """`./dev demo --keep` ended by SIGTERM (kill, systemd, a closed terminal) leaves no redis-server behind, and
    a mail sent to it meanwhile is logged under the id the dev server gave it."""
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "postroom", "demo", "--keep", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Running until Ctrl-C"):
                break
        hint = next(x for x in proc.stdout if x.strip().startswith("swaks --server"))
        port = int(re.search(r"--server 127\.0\.0\.1:(\d+)", hint).group(1))  # type: ignore[union-attr]
        redis_pid = int((tmp_path / "redis" / "redis.pid").read_text())
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            reply = smtp.sendmail("carol@customer.test", ["support@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
        assert reply == {}
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "everything it started is stopped" in out, "".join(lines) + out
    # The dev server's line about carol's mail, with the id it gave the mail (the 250 reply names it too).
    assert re.search(r" INFO [0-9A-F]{10}: accept: .*filed into", out), out
    deadline = time.monotonic() + 10
    while Path(f"/proc/{redis_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{redis_pid}").exists(), "the demo's redis-server outlived it"
