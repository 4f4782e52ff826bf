"""What only the after-queue filter has: a re-injection that can fail, and the login read from Postfix's own
Received header.  Through a real Postfix, the real ``postroom smtpd`` and Dovecot; the behaviour both adapters
share is tested for both in test_inbound_e2e.py, test_outbound_e2e.py and test_bad_input_e2e.py.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import time
from collections.abc import Iterator

import pytest

from postroom.config import to_toml, with_changes
from postroom_testbed import LOOPBACK, Deployment, deploy, free_port
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.test_inbound_e2e import SUPPORT, customer_mail, queue_id, ticket_number
from tests.test_outbound_e2e import ALICE, agent_mail, mid, open_ticket, received, submit

pytestmark = pytest.mark.e2e


@pytest.fixture
def smtpd_deployment() -> Iterator[Deployment]:
    with deploy(e2e_base_config(), CUSTOMERS, adapter="smtpd") as d:
        yield d


def wait_for_log(d: Deployment, pattern: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, d.stack.postfix.log_text()):
        assert time.monotonic() < deadline, f"{pattern!r} not in postfix.log:\n{d.stack.postfix.log_tail()}"
        time.sleep(0.1)


def restart(d: Deployment, config_toml: str) -> None:
    d.daemon.stop()
    d.daemon.reconfigure(config_toml)
    d.daemon.start()


def test_a_failed_reinjection_keeps_the_mail_queued_and_it_is_delivered_once_later(
    smtpd_deployment: Deployment,
) -> None:
    d = smtpd_deployment
    # postroom hands mail back to a port where no Postfix listens (a typo in reinject_port, the listener gone).
    restart(d, to_toml(with_changes(d.config, {"smtpd": {"reinject_port": free_port()}})))
    msg = customer_mail(ALICE, "Kept safe")
    d.stack.send(msg, mail_from=ALICE, rcpts=[SUPPORT])
    qid = queue_id(d, str(msg["Message-ID"]))
    # Postfix shows the mail deferred with postroom's reason, and keeps trying.
    wait_for_log(d, rf"{qid}: .*status=deferred .*451 4\.3\.0 postroom: Postfix did not take the mail back")
    assert qid in d.stack.postfix.queue_ids()
    assert re.search(rf" {qid}: cannot hand mail back to Postfix", d.daemon.log_text())
    assert not d.stack.find_raw(SUPPORT, mid(msg))

    restart(d, to_toml(d.config))
    d.stack.postfix.flush()
    d.stack.wait_for(SUPPORT, "INBOX", 1)
    d.stack.postfix.wait_queue_empty()
    copies = d.stack.find_raw(SUPPORT, mid(msg))
    assert len(copies) == 1, f"delivered {len(copies)} times"
    [got] = [m for m in d.stack.fetch(SUPPORT) if m["Message-ID"] == msg["Message-ID"]]
    n = ticket_number(got)
    assert got["Subject"] == f"[Support #{n}] Kept safe"
    # The failed attempts never reached the pipeline: one mail, one ticket, no half-opened ones before it.
    assert d.redis_client().get(f"postroom:{{{SUPPORT}}}:seq") == str(n)


def test_only_postfixs_own_received_line_names_an_agent_and_no_login_reaches_a_customer(
    smtpd_deployment: Deployment,
) -> None:
    d = smtpd_deployment
    n, first = open_ticket(d, ALICE, "Invoice")
    # A stranger on the MX port claims Meier's login in a Received header of his own, and in the HELO name
    # (which Postfix already writes as "?Authenticated?sender:?meier?").
    forged = agent_mail("Support <support@example.test>", ALICE, f"Re: [Support #{n}] Invoice")
    forged_received = (
        b"Received: from evil.test (evil.test [192.0.2.66])\r\n\t(Authenticated sender: meier)\r\n"
        b"\tby mx.evil.test (Postfix) with ESMTPSA id 1111\r\n\tfor <alice@customer.test>; Tue, 3 Jun 2025\r\n"
    )
    with smtplib.SMTP(LOOPBACK, d.stack.postfix.smtp_port, timeout=30) as smtp:
        smtp.ehlo("(Authenticated sender: meier)")
        data = forged_received + forged.as_bytes(policy=forged.policy.clone(linesep="\r\n"))
        smtp.sendmail("support@example.test", [ALICE], data)
    got = received(d, ALICE, forged)
    assert got["From"] == "Support <support@example.test>"  # not made into Meier's reply
    assert got.get("DKIM-Signature") is None
    assert d.redis_client().hget(f"postroom:{{{SUPPORT}}}:t:{n}", "owner") == ""

    # Meier's real reply: postroom reads his login from Postfix's line, and removes it before the mail goes on.
    reply = agent_mail("meier@example.test", ALICE, f"Re: [Support #{n}] Invoice", in_reply_to=str(first["Message-ID"]))
    submit(d, "meier", reply, [ALICE])
    out = received(d, ALICE, reply)
    assert out["From"] == "Meier via Support <support@example.test>"
    for raw in (*d.stack.find_raw(ALICE, mid(forged)), *d.stack.find_raw(ALICE, mid(reply))):
        assert b"Authenticated sender" not in raw


def test_while_postroom_is_down_mail_waits_in_postfixs_queue_and_nothing_passes_unprocessed(
    smtpd_deployment: Deployment,
) -> None:
    d = smtpd_deployment
    d.daemon.stop()
    msg = customer_mail(ALICE, "Anyone there?")
    d.stack.send(msg, mail_from=ALICE, rcpts=[SUPPORT])
    qid = queue_id(d, str(msg["Message-ID"]))
    wait_for_log(d, rf"{qid}: .*status=deferred \(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: Connection refused")
    assert not d.stack.find_raw(SUPPORT, mid(msg))
    d.daemon.start()
    d.stack.postfix.flush()
    d.stack.wait_for(SUPPORT, "INBOX", 1)
    [got] = [m for m in d.stack.fetch(SUPPORT) if m["Message-ID"] == msg["Message-ID"]]
    assert got["Subject"] == f"[Support #{ticket_number(got)}] Anyone there?"


def wait_for_daemon_log(d: Deployment, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in d.daemon.log_text():
        assert time.monotonic() < deadline, f"{text!r} not in the smtpd log:\n{d.daemon.log_text()}"
        time.sleep(0.05)


def test_sighup_reloads_the_config_and_a_broken_file_keeps_the_running_one(smtpd_deployment: Deployment) -> None:
    d = smtpd_deployment
    assert d.daemon.pid is not None
    box = d.config.mailboxes["support"].model_dump()
    d.daemon.reconfigure(to_toml(with_changes(d.config, {"mailboxes": {"support": {**box, "tag": "Help"}}})))
    os.kill(d.daemon.pid, signal.SIGHUP)
    wait_for_daemon_log(d, "SIGHUP: reloaded")
    first = customer_mail(ALICE, "After the reload")
    d.stack.send(first, mail_from=ALICE, rcpts=[SUPPORT])
    assert [str(m["Subject"]) for m in d.stack.wait_for(SUPPORT, "INBOX", 1)] == ["[Help #1] After the reload"]

    d.daemon.reconfigure(d.daemon.config_path.read_text() + "\n[smtpd]\nlisten_prot = 1\n")
    os.kill(d.daemon.pid, signal.SIGHUP)
    wait_for_daemon_log(d, "keeping the running config and rules")
    d.stack.send(customer_mail(ALICE, "Still fine"), mail_from=ALICE, rcpts=[SUPPORT])
    assert [str(m["Subject"]) for m in d.stack.wait_for(SUPPORT, "INBOX", 2)][1] == "[Help #2] Still fine"
    assert d.daemon.is_running()
    d.daemon.stop()
    log = d.daemon.log_text()
    assert "SIGTERM: stopping" in log and "postroom smtpd stopped" in log and "Traceback" not in log
