"""postroom sweep: mails that reached the shared mailbox while the milter was down (Postfix delivered them
unmodified) are replaced in place by their ticketed versions, keeping flags and date, over IMAP with postroom's
one Dovecot master user (what ``postroom dovecot-snippet`` sets up, as in production); the customer's next mail
threads into the ticket."""

from __future__ import annotations

import imaplib
import re
import subprocess
import sys
import time

import pytest

from postroom_testbed import LOOPBACK, Deployment
from postroom_testbed.imap import deploy_team
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.test_inbound_e2e import SUPPORT, customer_mail

pytestmark = pytest.mark.e2e
ALICE, BOB = CUSTOMERS[0], CUSTOMERS[1]


def run_sweep(d: Deployment) -> str:
    """``postroom sweep`` with the milter's own config: it logs in as the [imap] master user, the one
    ``postroom dovecot-snippet`` gave this Dovecot (also used by imap-event)."""
    done = subprocess.run(
        [sys.executable, "-m", "postroom", "sweep", "--config", str(d.daemon.config_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def flags_and_dates(d: Deployment) -> list[tuple[str, str, str]]:
    """(subject, flags, internal date) of every mail in the shared INBOX."""
    imap = imaplib.IMAP4(LOOPBACK, d.stack.dovecot.imap_port)
    try:
        imap.login(SUPPORT, "secret")
        imap.select("INBOX")
        _typ, data = imap.fetch("1:*", "(FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        out = []
        for part in data:
            if isinstance(part, tuple):
                meta, header = part
                subject = header.decode().split(":", 1)[1].strip()
                flags = " ".join(sorted(f.decode() for f in imaplib.ParseFlags(meta)))
                date = re.search(rb'INTERNALDATE "([^"]+)"', meta)
                out.append((subject, flags, date.group(1).decode() if date else ""))
        return sorted(out)
    finally:
        imap.logout()


def mark_seen(d: Deployment, subject: str) -> None:
    imap = imaplib.IMAP4(LOOPBACK, d.stack.dovecot.imap_port)
    try:
        imap.login(SUPPORT, "secret")
        imap.select("INBOX")
        _typ, found = imap.search(None, "SUBJECT", f'"{subject}"')
        imap.store(found[0].decode(), "+FLAGS", "(\\Seen \\Flagged)")
    finally:
        imap.logout()


def test_sweep_tickets_mail_that_bypassed_the_milter_in_place() -> None:
    config = e2e_base_config()
    with deploy_team(config, {a: f"{a}-pw" for a in config.agents}, CUSTOMERS) as team:
        d = team.deployment
        d.daemon.stop()  # Postfix delivers unmodified meanwhile (milter_default_action = accept)
        first = customer_mail(ALICE, "Printer on fire")
        d.stack.send(first, mail_from=ALICE, rcpts=[SUPPORT])
        d.stack.send(customer_mail(BOB, "Invoice wrong"), mail_from=BOB, rcpts=[SUPPORT])
        d.stack.wait_for(SUPPORT, "INBOX", 2)
        mark_seen(d, "Printer on fire")
        before = flags_and_dates(d)
        d.daemon.start()

        out = run_sweep(d)
        assert "2 mail(s) ticketed" in out, out
        after = flags_and_dates(d)
        subjects = [s for s, _f, _d in after]
        printer = next(s for s in subjects if s.endswith("Printer on fire"))
        n = re.match(r"\[Support #(\d+)\] Printer on fire$", printer)
        assert n is not None and len(subjects) == 2
        assert {s.split("]")[0] for s in subjects} == {"[Support #1", "[Support #2"}
        # Same flags and internal date as the mails they replace; nothing lost, nothing doubled.
        assert sorted((s.split("] ")[1], f, dt) for s, f, dt in after) == sorted(before)
        assert all(m["X-Postroom-Ticket"] for m in d.stack.fetch(SUPPORT))
        assert "0 mail(s) ticketed" in run_sweep(d)  # nothing left to do

        again = customer_mail(ALICE, "Re: Printer on fire", in_reply_to=str(first["Message-ID"]))
        d.stack.send(again, mail_from=ALICE, rcpts=[SUPPORT])
        got = d.stack.wait_for(SUPPORT, "INBOX", 3)
        assert f"Re: [Support #{n.group(1)}] Printer on fire" in [str(m["Subject"]) for m in got]


def test_mail_delivered_degraded_is_ticketed_in_place_as_soon_as_redis_is_back() -> None:
    """No `postroom sweep` run here: the daemon sweeps by itself once its backlog has ticketed the degraded mail."""
    config = e2e_base_config()
    with deploy_team(config, {a: f"{a}-pw" for a in config.agents}, CUSTOMERS) as team:
        d = team.deployment
        d.stack.redis.stop()
        first = customer_mail(ALICE, "Printer on fire")
        d.stack.send(first, mail_from=ALICE, rcpts=[SUPPORT])
        [got] = d.stack.wait_for(SUPPORT, "INBOX", 1)
        assert got["X-Postroom-Status"] == "degraded"
        mark_seen(d, "Printer on fire")
        d.stack.redis.start()  # back, and empty

        deadline = time.monotonic() + 60
        while [s for s, _f, _d in flags_and_dates(d)] != ["[Support #1] Printer on fire"]:
            assert time.monotonic() < deadline, d.daemon.log_text()
            time.sleep(0.5)
        [(_s, flags, _date)] = flags_and_dates(d)
        assert flags == "\\Flagged \\Seen"  # the agent's flags stay
        assert "sweep after recovery: 1 mail(s) ticketed in place" in d.daemon.log_text()
        again = customer_mail(ALICE, "Re: Printer on fire", in_reply_to=str(first["Message-ID"]))
        d.stack.send(again, mail_from=ALICE, rcpts=[SUPPORT])
        got2 = d.stack.wait_for(SUPPORT, "INBOX", 2)
        assert "Re: [Support #1] Printer on fire" in [str(m["Subject"]) for m in got2]


def original_of(d: Deployment, subject: str) -> tuple[bytes, str, str]:
    """The raw mail, its flags and its internal date, as a sweep fetches them before replacing it."""
    imap = imaplib.IMAP4(LOOPBACK, d.stack.dovecot.imap_port)
    try:
        imap.login(SUPPORT, "secret")
        imap.select("INBOX")
        _typ, found = imap.search(None, "SUBJECT", f'"{subject}"')
        _typ, data = imap.fetch(found[0].decode(), "(FLAGS INTERNALDATE BODY.PEEK[])")
        meta, raw = next(p for p in data if isinstance(p, tuple))
        flags = "(" + " ".join(f.decode() for f in imaplib.ParseFlags(meta) if f.lower() != b"\\recent") + ")"
        date = re.search(rb'INTERNALDATE "([^"]+)"', meta)
        assert date is not None
        return raw, flags, f'"{date.group(1).decode()}"'
    finally:
        imap.logout()


def test_a_sweep_that_stopped_after_storing_the_replacement_is_finished_without_a_second_copy() -> None:
    """Killed between APPENDing the ticketed mail and deleting the original, a sweep leaves both in the folder;
    the next one deletes the original instead of ticketing it again (a second copy in the team's inbox)."""
    config = e2e_base_config()
    with deploy_team(config, {a: f"{a}-pw" for a in config.agents}, CUSTOMERS) as team:
        d = team.deployment
        d.daemon.stop()
        first = customer_mail(ALICE, "Printer on fire")
        d.stack.send(first, mail_from=ALICE, rcpts=[SUPPORT])
        other = customer_mail(BOB, "Invoice wrong")
        d.stack.send(other, mail_from=BOB, rcpts=[SUPPORT])
        d.stack.wait_for(SUPPORT, "INBOX", 2)
        mark_seen(d, "Printer on fire")
        raw, flags, date = original_of(d, "Printer on fire")
        d.daemon.start()
        assert "2 mail(s) ticketed" in run_sweep(d)
        # The state a sweep leaves when it stops after the APPEND: the original is back beside its replacement.
        imap = imaplib.IMAP4(LOOPBACK, d.stack.dovecot.imap_port)
        try:
            imap.login(SUPPORT, "secret")
            assert imap.append("INBOX", flags, date, raw)[0] == "OK"
        finally:
            imap.logout()
        d.stack.send(customer_mail(ALICE, "New question"), mail_from=ALICE, rcpts=[SUPPORT])  # through the milter
        d.stack.wait_for(SUPPORT, "INBOX", 4)

        assert "1 mail(s) ticketed" in run_sweep(d)  # the original's replacement, finished
        mails = d.stack.fetch(SUPPORT)
        subjects = sorted(str(m["Subject"]) for m in mails)
        assert sorted(s.split("] ")[1] for s in subjects) == ["Invoice wrong", "New question", "Printer on fire"]
        assert sorted(s.split("]")[0] for s in subjects) == ["[Support #1", "[Support #2", "[Support #3"]
        assert [str(m["Message-ID"]) for m in mails].count(str(first["Message-ID"])) == 1
        assert ("Printer on fire", "\\Flagged \\Seen") in [(s.split("] ")[1], f) for s, f, _dt in flags_and_dates(d)]
        assert "0 mail(s) ticketed" in run_sweep(d)

        # A mail that reuses the Message-ID with other text is not a replacement's original: it stays, ticketed.
        resent = raw.replace(b"please help.", b"it is still burning.")
        assert resent != raw
        imap = imaplib.IMAP4(LOOPBACK, d.stack.dovecot.imap_port)
        try:
            imap.login(SUPPORT, "secret")
            assert imap.append("INBOX", "()", date, resent)[0] == "OK"
        finally:
            imap.logout()
        assert "1 mail(s) ticketed" in run_sweep(d)
        bodies = [m.get_content() for m in d.stack.fetch(SUPPORT) if str(m["Message-ID"]) == str(first["Message-ID"])]
        assert sorted("still burning" in b for b in bodies) == [False, True]
