"""Agents' replies through the real `postroom milter`: OpenDKIM's miltertest plays Postfix's submission port.

tests/miltertest/inbound.lua opens the ticket as a customer's mail does; tests/miltertest/outbound.lua then sends
the agent's reply with the SMTP login as ``{auth_authen}`` at MAIL FROM, as Postfix does after AUTH, and checks the
edits and the reply postroom gives at end of message.  The same behaviour through Postfix and Dovecot is in
tests/test_outbound_e2e.py.

miltertest has no eom_check for the envelope sender change (SMFIR_CHGFROM) and no way to read an edit's or a
reply's bytes but through its checks.  The script runs with ``-vv``, whose trace names every packet the milter
sends with its length; the tests read the sender change and the exact set of end-of-message answers from there.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from postroom_testbed import RedisServer
from tests.test_miltertest import (
    ALICE,
    ENGINES,
    SUPPORT,
    RunningMilter,
    _text,
    customer_mail,
    miltertest_binary,
    new_ticket,
    start_milter,
)

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).parent / "miltertest" / "outbound.lua"
MEIER = "meier@example.test"
MUELLER = "mueller@example.test"
BODY = "Dear Alice,\r\nwe are on it.\r\n"
OWNED_TEXT = (
    "postroom: [Support #1] belongs to Meier since {since}. Your reply was not sent. "
    "To take the ticket over, send it again with the first line #takeover"
)
UNAVAILABLE_TEXT = "postroom: ticket store unavailable, please try again later"
# miltertest -vv prints one line per packet it reads from the milter: the command and the payload length.
READ_TRACE = re.compile(r"mt_milter_read\(\d+\): cmd (.), len (\d+)$", re.MULTILINE)
SMFIR_CHGFROM = "e"
SMFIR_ACCEPT = "a"
SMFIR_REPLYCODE = "y"


def run_outbound(milter: RunningMilter, **values: str) -> str:
    """Run outbound.lua with ``values`` as -D globals under ``-vv``; fail with both sides' output if it fails."""
    cmd = [miltertest_binary(), "-vv", "-D", f"socket=unix:{milter.socket_path}"]
    for name, value in values.items():
        cmd += ["-D", f"{name}={value}"]
    cmd += ["-D", f"lib={SCRIPT.parent / 'session.lua'}", "-s", str(SCRIPT)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    except subprocess.TimeoutExpired as exc:
        milter.fail(f"miltertest did not finish within {exc.timeout}s", cmd, _text(exc.stdout), _text(exc.stderr))
    if proc.returncode != 0:
        milter.fail(f"miltertest exited with status {proc.returncode}", cmd, proc.stdout, proc.stderr)
    if not milter.daemon.is_running():
        milter.fail("postroom milter died during the test", cmd, proc.stdout, proc.stderr)
    return proc.stdout


def eom_answers(stdout: str) -> list[tuple[str, int]]:
    """(command, payload length) of every packet the milter sent in answer to end of message, in order."""
    _, marker, rest = stdout.partition("-- eom --\n")
    assert marker, f"no end-of-message marker in the miltertest output:\n{stdout}"
    eom, marker, _ = rest.partition("-- end of eom --\n")
    assert marker, f"miltertest stopped during end of message:\n{stdout}"
    return [(cmd, int(length)) for cmd, length in READ_TRACE.findall(eom)]


def sender_changes(stdout: str) -> list[int]:
    """Payload lengths of the SMFIR_CHGFROM packets: the new envelope sender, its NUL and any ESMTP arguments."""
    return [length for cmd, length in eom_answers(stdout) if cmd == SMFIR_CHGFROM]


def smtp_reply_only(code: str, status: str, text: str) -> list[tuple[str, int]]:
    """What the milter sends for a refusal with smfi_setreply: one SMFIR_REPLYCODE "code status text" + NUL."""
    return [(SMFIR_REPLYCODE, len(f"{code} {status} {text}") + 1)]


def added(stdout: str, name: str) -> str:
    """The value outbound.lua printed for a header postroom added or inserted."""
    match = re.search(rf"^  added {re.escape(name)}: (.*)$", stdout, re.MULTILINE)
    assert match, f"{name} not among the added headers:\n{stdout}"
    return match.group(1)


def body_hash(body: str) -> str:
    """DKIM bh= of a body under relaxed canonicalization (RFC 6376 3.4.4), sha256."""
    lines = [re.sub(r"[ \t]+", " ", line).rstrip(" \t") for line in body.split("\r\n")]
    while lines and lines[-1] == "":
        lines.pop()
    canonical = "".join(line + "\r\n" for line in lines)
    return base64.b64encode(hashlib.sha256(canonical.encode()).digest()).decode()


def dkim_tags(value: str) -> dict[str, str]:
    tags = (part.partition("=") for part in value.split(";") if part.strip())
    return {name.strip(): "".join(v.split()) for name, _, v in tags}


def assert_signed(stdout: str, body: str) -> None:
    """The inserted DKIM-Signature is the shared domain's, covers From and hashes the body as it leaves."""
    tags = dkim_tags(added(stdout, "DKIM-Signature"))
    assert (tags["d"], tags["s"], tags["a"], tags["c"]) == ("example.test", "postroom", "rsa-sha256", "relaxed/relaxed")
    assert "from" in tags["h"].lower().split(":"), tags["h"]
    assert tags["bh"] == body_hash(body)


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


def open_ticket(milter: RunningMilter, subject: str, *, qid: str, message_id: str) -> None:
    """Ticket #1, opened by Alice's mail through inbound.lua exactly as tests/test_miltertest.py does."""
    milter.run(**customer_mail(subject, qid=qid, message_id=message_id), **new_ticket(1, subject))


def ticket(store: redis.Redis, n: int = 1) -> dict[str, str]:
    return {str(k): str(v) for k, v in store.hgetall(f"postroom:{{{SUPPORT}}}:t:{n}").items()}


def agent_mail(
    subject: str,
    *,
    qid: str,
    message_id: str,
    in_reply_to: str,
    sender: str = MEIER,
    login: str = "",
    body: str = BODY,
    team_copy: str = "support+Meier@example.test",
) -> dict[str, str]:
    """The -D values of an agent's mail to Alice as Postfix hands it to the milter; no login: not authenticated."""
    name = sender.partition("@")[0].capitalize()
    values = {
        "qid": qid,
        "env_from": sender,
        "header_from": f"{name} <{sender}>",
        "rcpt": ALICE,
        "subject": subject,
        "message_id": message_id,
        "in_reply_to": in_reply_to,
        "body": body,
        "team_copy": team_copy,
    }
    if login:
        values["auth_login"] = login
    return values


def sent_as(agent: str, subject: str) -> dict[str, str]:
    """The -D expectations of a reply postroom rewrites: From, Reply-To and subject token of the support mailbox."""
    return {
        "expect": "sent",
        "new_from": f'"{agent} via Support" <{SUPPORT}>',
        "reply_to": SUPPORT,
        "new_subject": subject,
    }


def since(store: redis.Redis) -> str:
    """When the ticket's owner took it, as the 550 reply names it."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(ticket(store)["owned_since"])))


def test_agent_reply_leaves_from_the_shared_address_signed_and_claims_the_ticket(
    milter: RunningMilter, store: redis.Redis
) -> None:
    first = "<printer-1@customer.test>"
    open_ticket(milter, "Printer on fire", qid="4MT0101", message_id=first)
    assert ticket(store)["owner"] == ""
    out = run_outbound(
        milter,
        **agent_mail(
            "AW: Printer on fire", qid="4MT0102", message_id="<reply-1@example.test>", in_reply_to=first, login="meier"
        ),
        forged_owner="meier (Support #1)",
        **sent_as("Meier", "AW: [Support #1] Printer on fire"),
    )
    # smfi_chgfrom("<support@example.test>") without ESMTP arguments: the address and its NUL, exactly once.
    assert sender_changes(out) == [len(f"<{SUPPORT}>") + 1], eom_answers(out)
    assert eom_answers(out)[-1] == (SMFIR_ACCEPT, 0)
    assert_signed(out, BODY)
    t = ticket(store)
    assert (t["owner"], t["state"]) == ("meier", "open")
    assert re.search(r" 4MT0102: .*\[Support #1\] reply by meier", milter.log_text())


def test_rival_reply_is_refused_naming_the_owner_and_the_takeover_line(
    milter: RunningMilter, store: redis.Redis
) -> None:
    first = "<refund-1@customer.test>"
    open_ticket(milter, "Refund", qid="4MT0201", message_id=first)
    run_outbound(
        milter,
        **agent_mail(
            "Re: Refund", qid="4MT0202", message_id="<reply-2@example.test>", in_reply_to=first, login="meier"
        ),
        **sent_as("Meier", "Re: [Support #1] Refund"),
    )
    text = OWNED_TEXT.format(since=since(store))
    out = run_outbound(
        milter,
        **agent_mail(
            "Re: [Support #1] Refund",
            qid="4MT0203",
            message_id="<rival-1@example.test>",
            in_reply_to=first,
            sender=MUELLER,
            login="mueller",
        ),
        expect="refused",
        reply_code="550",
        reply_status="5.7.1",
        reply_text=text,
    )
    assert eom_answers(out) == smtp_reply_only("550", "5.7.1", text)  # no edit, no sender change before it
    assert ticket(store)["owner"] == "meier"
    assert re.search(r" 4MT0203: .* by mueller refused", milter.log_text())


def test_takeover_line_gives_the_rival_the_ticket_and_leaves_the_body(
    milter: RunningMilter, store: redis.Redis
) -> None:
    first = "<router-1@customer.test>"
    open_ticket(milter, "Router", qid="4MT0501", message_id=first)
    run_outbound(
        milter,
        **agent_mail(
            "Re: Router", qid="4MT0502", message_id="<reply-5@example.test>", in_reply_to=first, login="meier"
        ),
        **sent_as("Meier", "Re: [Support #1] Router"),
    )
    kept = "Dear Alice,\r\nI take this over.\r\n"
    out = run_outbound(
        milter,
        **agent_mail(
            "Re: [Support #1] Router",
            qid="4MT0503",
            message_id="<takeover-1@example.test>",
            in_reply_to=first,
            sender=MUELLER,
            login="mueller",
            body="#takeover\r\n\r\n" + kept,
            team_copy="support+Mueller@example.test",
        ),
        **sent_as("Mueller", "Re: [Support #1] Router"),
        new_body=kept,
    )
    assert sender_changes(out) == [len(f"<{SUPPORT}>") + 1], eom_answers(out)
    assert_signed(out, kept)  # signed over the body as it leaves, without the command line
    assert ticket(store)["owner"] == "mueller"


def test_unauthenticated_reply_gets_none_of_the_outbound_edits(milter: RunningMilter, store: redis.Redis) -> None:
    first = "<spoof-1@customer.test>"
    open_ticket(milter, "Spoof target", qid="4MT0301", message_id=first)
    out = run_outbound(
        milter,
        **agent_mail(
            "Re: [Support #1] Spoof target", qid="4MT0302", message_id="<spoof-2@example.test>", in_reply_to=first
        ),
        expect="untouched",
    )
    assert eom_answers(out) == [(SMFIR_ACCEPT, 0)]  # accepted as it is: no sender change, no header, no recipient
    assert ticket(store)["owner"] == ""


@pytest.mark.parametrize("engine", ENGINES)
def test_redis_down_tempfails_an_agent_reply(tmp_path: Path, engine: str) -> None:
    miltertest_binary()
    doomed = RedisServer(tmp_path / "doomed-redis")
    doomed.start()
    running: RunningMilter | None = None
    try:
        running = start_milter(tmp_path, doomed.url, engine)
        first = "<down-1@customer.test>"
        open_ticket(running, "Down", qid="4MT0401", message_id=first)
        doomed.stop()  # Redis dies under a running milter, after the ticket was opened
        out = run_outbound(
            running,
            **agent_mail(
                "Re: [Support #1] Down",
                qid="4MT0402",
                message_id="<down-2@example.test>",
                in_reply_to=first,
                login="meier",
            ),
            expect="tempfail",
            reply_code="451",
            reply_status="4.3.0",
            reply_text=UNAVAILABLE_TEXT,
        )
        # Not sent unrewritten from the agent's own address: the client keeps it and tries again.
        assert eom_answers(out) == smtp_reply_only("451", "4.3.0", UNAVAILABLE_TEXT)
        assert re.search(r" 4MT0402: ticket store unavailable", running.log_text())
    finally:
        if running is not None:
            running.daemon.stop()
        doomed.stop()
