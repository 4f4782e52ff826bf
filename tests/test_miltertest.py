"""The real `postroom milter` as a libmilter peer: OpenDKIM's miltertest plays Postfix (tests/miltertest/inbound.lua).

Between the TestCtx unit tests (tests/test_milter_callbacks.py) and the whole Postfix stack (tests/test_inbound_e2e.py):
the wire protocol, option negotiation and libmilter's macro handling are real, with nothing but the milter and Redis.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
import redis

from postroom.config import Config, example_config_path, load_config, to_toml, with_changes
from postroom_testbed import MilterDaemon, RedisServer

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).parent / "miltertest" / "inbound.lua"
SUPPORT = "support@example.test"
ALICE = "alice@customer.test"


def miltertest_binary() -> str:
    found = shutil.which("miltertest")
    if found is None:
        # CI installs it; a missing tool must not turn these tests into silent skips.
        pytest.fail(
            "miltertest is not installed: apt-get install miltertest (OpenDKIM's milter test client)", pytrace=False
        )
    return found


# Both milter engines speak the protocol to miltertest: libmilter (pymilter) and postroom's asyncio engine.
ENGINES = ("libmilter", "asyncio")


def milter_config(workdir: Path, socket_path: Path, redis_url: str, engine: str = "libmilter") -> Config:
    """The shipped example config, pointed at a private Redis, a SQLite history and a socket in ``workdir``."""
    return with_changes(
        load_config(example_config_path(), environ={}),
        {
            "milter": {"socket": f"unix:{socket_path}", "socket_umask": 0, "engine": engine},
            "redis": {"url": redis_url},
            "database": {"url": f"sqlite:///{workdir / 'history.sqlite3'}"},
        },
    )


@dataclass
class RunningMilter:
    daemon: MilterDaemon
    socket_path: Path

    def run(self, **values: str) -> str:
        """Run inbound.lua with ``values`` as -D globals; fail the test with both sides' output if it fails."""
        cmd = [miltertest_binary(), "-v", "-D", f"socket=unix:{self.socket_path}"]
        for name, value in values.items():
            cmd += ["-D", f"{name}={value}"]
        cmd += ["-D", f"lib={SCRIPT.parent / 'session.lua'}", "-s", str(SCRIPT)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
        except subprocess.TimeoutExpired as exc:
            self.fail(f"miltertest did not finish within {exc.timeout}s", cmd, _text(exc.stdout), _text(exc.stderr))
        if proc.returncode != 0:
            self.fail(f"miltertest exited with status {proc.returncode}", cmd, proc.stdout, proc.stderr)
        if not self.daemon.is_running():
            self.fail("postroom milter died during the test", cmd, proc.stdout, proc.stderr)
        return proc.stdout

    def fail(self, what: str, cmd: list[str], stdout: str, stderr: str) -> NoReturn:
        pytest.fail(
            f"{what}\n$ {shlex.join(cmd)}\n"
            f"--- miltertest stdout ---\n{stdout}"
            f"--- miltertest stderr ---\n{stderr}"
            f"--- milter log {self.daemon.log_path} ---\n{self.daemon.log_text()}",
            pytrace=False,
        )

    def log_text(self) -> str:
        return self.daemon.log_text()


def _text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def start_milter(workdir: Path, redis_url: str, engine: str = "libmilter") -> RunningMilter:
    socket_path = workdir / "milter.sock"
    config = milter_config(workdir, socket_path, redis_url, engine)
    daemon = MilterDaemon(workdir / "postroom", to_toml(config), socket_path)
    daemon.start()
    return RunningMilter(daemon, socket_path)


@pytest.fixture(params=ENGINES)
def milter(tmp_path: Path, redis_url: str, request: pytest.FixtureRequest) -> Iterator[RunningMilter]:
    """`postroom milter` on a unix socket in tmp_path, with the session's private Redis (emptied for this test)."""
    miltertest_binary()
    running = start_milter(tmp_path, redis_url, request.param)
    try:
        yield running
    finally:
        running.daemon.stop()


@pytest.fixture
def store(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def customer_mail(
    subject: str, *, qid: str, message_id: str, sender: str = ALICE, rcpt: str = SUPPORT
) -> dict[str, str]:
    """The -D values that describe one mail as Postfix hands it to the milter."""
    return {
        "qid": qid,
        "env_from": sender,
        "header_from": sender,
        "rcpt": rcpt,
        "subject": subject,
        "message_id": message_id,
    }


def new_ticket(n: int, subject: str) -> dict[str, str]:
    """What postroom must write for a new, unassigned ticket #n of the support mailbox."""
    return {
        "expect": "ticket",
        "ticket": str(n),
        "tag": "Support",
        "owner": "unassigned",
        "state": "new",
        "new_subject": f"[Support #{n}] {subject}",
    }


def test_new_customer_mail_gets_token_subject_and_ticket_headers(milter: RunningMilter, store: redis.Redis) -> None:
    milter.run(
        **customer_mail("Printer on fire", qid="4MT0001", message_id="<new-1@customer.test>"),
        **new_ticket(1, "Printer on fire"),
    )
    ticket = store.hgetall(f"postroom:{{{SUPPORT}}}:t:1")
    assert (ticket["customer"], ticket["subject"], ticket["owner"]) == (ALICE, "Printer on fire", "")
    # Postfix sends the queue id as macro "i" only from DATA on; the milter read it at end of message.
    assert re.search(rf" 4MT0001: mailbox {re.escape(SUPPORT)} ticket #1 opened", milter.log_text())


def test_forged_owner_header_is_removed(milter: RunningMilter) -> None:
    milter.run(
        **customer_mail("Please hurry", qid="4MT0002", message_id="<forged-1@customer.test>"),
        forged_owner="meier (Support #1)",
        **new_ticket(1, "Please hurry"),
    )


def test_follow_up_to_an_owned_ticket_is_moved_to_the_owners_folder(milter: RunningMilter, store: redis.Redis) -> None:
    first = "<invoice-1@customer.test>"
    milter.run(**customer_mail("Invoice wrong", qid="4MT0003", message_id=first), **new_ticket(1, "Invoice wrong"))
    # Where an agent's claim puts the owner (the outbound path is not under test here).
    store.hset(f"postroom:{{{SUPPORT}}}:t:1", mapping={"owner": "meier", "state": "open"})
    milter.run(
        **customer_mail("AW: Invoice wrong", qid="4MT0004", message_id="<invoice-2@customer.test>"),
        in_reply_to=first,
        expect="ticket",
        ticket="1",
        tag="Support",
        owner="meier",
        state="open",
        new_subject="AW: [Support #1] Invoice wrong",
        reroute_to="support+Meier@example.test",
    )
    assert re.search(r" 4MT0004: mailbox \S+ ticket #1 followup \(references\) owner=meier", milter.log_text())


def test_mail_to_no_shared_mailbox_is_not_edited(milter: RunningMilter, store: redis.Redis) -> None:
    milter.run(
        **customer_mail("Lunch?", qid="4MT0005", message_id="<lunch@customer.test>", rcpt="info@example.test"),
        expect="untouched",
    )
    assert store.dbsize() == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_redis_down_adds_degraded_status_and_accepts(tmp_path: Path, engine: str) -> None:
    miltertest_binary()
    doomed = RedisServer(tmp_path / "doomed-redis")
    doomed.start()
    running: RunningMilter | None = None
    try:
        running = start_milter(tmp_path, doomed.url, engine)
        doomed.stop()  # Redis dies under a running milter
        running.run(
            **customer_mail("Nobody home?", qid="4MT0007", message_id="<down@customer.test>"),
            expect="degraded",
        )
        assert re.search(r" 4MT0007: ticket store unavailable", running.log_text())
    finally:
        if running is not None:
            running.daemon.stop()
        doomed.stop()
