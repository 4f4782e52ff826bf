"""Agents' own IMAP logins and move-to-claim, end to end through real Dovecot, Postfix, Redis and the milter.

Dovecot runs what `postroom dovecot-snippet --write` wrote (public namespace per mailbox, ACLs, master user,
IMAPSieve running `postroom imap-event` as the mail user); agents move mail with imaplib's MOVE and COPY; the
result is read back with `postroom tickets show` and in the headers of the ticket's next mail.
"""

from __future__ import annotations

import imaplib
import json
import os
import smtplib
import threading
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from postroom.admin.cli import main
from postroom.config import Config, example_config_path, load_config, parse_config
from postroom_testbed import imap as testbed_imap

pytestmark = pytest.mark.e2e

ALICE = "alice@customer.test"
PASSWORDS = {"meier": "meier-pw", "mueller": "mueller-pw", "schulze": "schulze-pw"}
# One mailbox per rival policy; schulze is an agent of the config but of none of them.
BOXES = {"support": ("Support", "reject"), "sales": ("Sales", "warn"), "billing": ("Billing", "allow")}


def team_config() -> Config:
    data = load_config(example_config_path(), environ={}).model_dump()
    data["mailboxes"] = {
        key: {**data["mailboxes"]["support"], "address": f"{key}@example.test", "tag": tag, "on_rival_reply": policy}
        for key, (tag, policy) in BOXES.items()
    }
    for box in data["mailboxes"].values():
        box["agents"] = ["meier", "mueller"]
    return parse_config(data, "<team>", environ={})


class Team:
    def __init__(self, team: testbed_imap.Team) -> None:
        self.stack = team.deployment.stack
        self.config = team.deployment.config
        self.config_path = team.deployment.daemon.config_path

    def deliver(self, box: str, subject: str, *, in_reply_to: str = "", folder: str = "INBOX") -> EmailMessage:
        """A customer's mail through Postfix and the milter; returns it as it landed in ``folder``."""
        msg = EmailMessage()
        msg["From"] = f"Alice <{ALICE}>"
        msg["To"] = f"{box}@example.test"
        msg["Subject"] = subject
        msg["Message-ID"] = make_msgid(idstring=uuid.uuid4().hex[:8], domain="customer.test")
        if in_reply_to:
            msg["In-Reply-To"] = msg["References"] = in_reply_to
        msg.set_content("Hello.\n")
        self.stack.send(msg, mail_from=ALICE, rcpts=[f"{box}@example.test"])
        return self.wait(box, folder, str(msg["Message-ID"]))

    def wait(self, box: str, folder: str, message_id: str, timeout: float = 20.0) -> EmailMessage:
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.stack.fetch(f"{box}@example.test", folder) if m["Message-ID"] == message_id]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"{message_id} not in {box}/{folder} after {timeout:.0f}s")
            time.sleep(0.2)

    def claimed(self, box: str, subject: str, login: str) -> tuple[int, str]:
        """A new ticket, taken by ``login`` dragging it into their folder: (number, Message-ID)."""
        first = self.deliver(box, subject)
        tag = self.config.mailboxes[box].tag
        mid = str(first["Message-ID"])
        self.move(login, tag, mid, f"{tag}/{login.capitalize()}")
        return number(first, tag), mid

    def note(self, box: str, text: str, folder: str, timeout: float = 20.0) -> list[bytes]:
        """Wait for postroom's note (written by its IMAP follow-up after the move) in ``folder``."""
        deadline = time.monotonic() + timeout
        while not (found := self.stack.find_raw(f"{box}@example.test", text, folder)):
            assert time.monotonic() < deadline, f"no note {text!r} in {box}/{folder}"
            time.sleep(0.2)
        return found

    def imap(self, login: str) -> imaplib.IMAP4:
        imap = imaplib.IMAP4("127.0.0.1", self.stack.dovecot.imap_port, timeout=30)
        imap.login(login, PASSWORDS[login])
        return imap

    def move(self, login: str, source: str, message_id: str, dest: str, command: str = "MOVE") -> None:
        """``login`` drags the mail from ``source`` to ``dest`` in their client (folders named as they see them)."""
        imap = self.imap(login)
        try:
            assert imap.select(f'"{source}"')[0] == "OK"
            _s, data = imap.uid("SEARCH", "HEADER", "Message-ID", f'"{message_id}"')
            uids = data[0].split()
            assert len(uids) == 1, f"{message_id} in {source}: {data}"
            status, detail = imap.uid(command, uids[0].decode(), f'"{dest}"')
            assert status == "OK", detail
        finally:
            imap.logout()

    def show(self, box: str, number: int) -> dict[str, Any]:
        res = CliRunner().invoke(
            main, ["tickets", "show", str(number), "--mailbox", box, "--json", "--config", str(self.config_path)]
        )
        assert res.exit_code == 0, res.output
        shown: dict[str, Any] = json.loads(res.output)
        return shown

    def events(self, box: str, number: int) -> list[tuple[str, str]]:
        return [(e["kind"], e["actor"]) for e in self.show(box, number)["events"]]


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    if os.geteuid() != 0:
        pytest.skip("needs root for Postfix and Dovecot")
    with testbed_imap.deploy_team(team_config(), PASSWORDS, [ALICE]) as deployed:
        yield Team(deployed)


def number(msg: EmailMessage, tag: str) -> int:
    value = str(msg["X-Postroom-Ticket"])
    assert value.endswith(f"({tag})"), value
    return int(value.split(maxsplit=1)[0])


def folders(imap: imaplib.IMAP4) -> set[str]:
    _s, data = imap.list('""', '"*"')
    return {item.decode().rsplit(' "/" ', 1)[1].strip('"') for item in data if isinstance(item, bytes)}


def test_agents_log_in_with_their_own_password_and_see_the_team_inbox(team: Team) -> None:
    first = team.deliver("support", "Printer on fire")
    for login in ("meier", "mueller"):
        imap = team.imap(login)
        try:
            seen = folders(imap)
            # The agents' folders and Done exist (auto = subscribe) before any mail was filed into them.
            assert {"Support", "Support/Meier", "Support/Mueller", "Support/Done"} <= seen, seen
            assert imap.select('"Support"')[0] == "OK"
            _s, data = imap.uid("SEARCH", "HEADER", "Message-ID", f'"{first["Message-ID"]}"')
            assert data[0], f"{login} does not see the customer's mail in Support"
            # Thunderbird shows only subscribed folders: the team INBOX and every folder below it are.
            _s, subscribed = imap.lsub('""', '"*"')
            names = {s.decode().rsplit(' "/" ', 1)[1].strip('"') for s in subscribed if isinstance(s, bytes)}
            assert {"Support", "Support/Meier", "Support/Mueller", "Support/Done"} <= names, names
        finally:
            imap.logout()
    outsider = team.imap("schulze")
    try:
        assert not any(f.startswith("Support") for f in folders(outsider))
        assert outsider.select('"Support"')[0] == "NO"
    finally:
        outsider.logout()
    with pytest.raises(imaplib.IMAP4.error):
        imaplib.IMAP4("127.0.0.1", team.stack.dovecot.imap_port).login("meier", "mueller-pw")


def test_move_into_an_agents_folder_assigns_and_later_mail_follows(team: Team) -> None:
    first = team.deliver("support", "Invoice wrong")
    n = number(first, "Support")
    team.move("meier", "Support", str(first["Message-ID"]), "Support/Meier")
    shown = team.show("support", n)
    assert (shown["owner"], shown["state"]) == ("meier", "open")
    assert ("assign", "meier") in team.events("support", n)
    later = team.deliver("support", "Re: Invoice wrong", in_reply_to=str(first["Message-ID"]), folder="Meier")
    assert str(later["X-Postroom-Owner"]) == f"meier (Support #{n})"


def test_done_closes_and_inbox_releases(team: Team) -> None:
    first = team.deliver("support", "Password reset")
    n = number(first, "Support")
    mid = str(first["Message-ID"])
    team.move("mueller", "Support", mid, "Support/Mueller")
    team.move("mueller", "Support/Mueller", mid, "Support/Done", command="COPY")
    assert team.show("support", n)["state"] == "closed"
    assert ("close", "mueller") in team.events("support", n)
    # The customer writes again: the closed ticket is open again, still Mueller's, in his folder.
    again = team.deliver("support", "Re: Password reset", in_reply_to=mid, folder="Mueller")
    assert str(again["X-Postroom-State"]) == f"open (Support #{n})"
    assert str(again["X-Postroom-Owner"]) == f"mueller (Support #{n})"
    deadline = time.monotonic() + 20  # the milter writes its history in batches, off the mail path
    while "reopened" not in [kind for kind, _actor in team.events("support", n)]:
        assert time.monotonic() < deadline, team.events("support", n)
        time.sleep(0.2)
    team.move("mueller", "Support/Mueller", mid, "Support")
    shown = team.show("support", n)
    assert (shown["owner"], shown["state"]) == ("", "open")
    assert ("release", "mueller") in team.events("support", n)
    later = team.deliver("support", "Re: Re: Password reset", in_reply_to=mid)
    assert str(later["X-Postroom-Owner"]) == f"unassigned (Support #{n})"
    assert str(later["X-Postroom-State"]) == f"open (Support #{n})"


def test_reject_moves_a_rivals_ticket_back_and_leaves_a_note(team: Team) -> None:
    n, mid = team.claimed("support", "Refund please", "meier")
    team.move("mueller", "Support/Meier", mid, "Support/Mueller")
    assert team.show("support", n)["owner"] == "meier"
    assert ("move_rejected", "mueller") in team.events("support", n)
    team.wait("support", "Meier", mid)  # moved back by postroom's master user
    notes = team.note("support", f"Support #{n}] not moved", "Mueller")
    assert b"belongs to Meier" in notes[0]
    assert not team.stack.find_raw("support@example.test", mid, "Mueller")
    later = team.deliver("support", "Re: Refund please", in_reply_to=mid, folder="Meier")
    assert str(later["X-Postroom-Owner"]) == f"meier (Support #{n})"


def test_warn_applies_the_move_and_tells_the_owner(team: Team) -> None:
    n, mid = team.claimed("sales", "Quote", "meier")
    team.move("mueller", "Sales/Meier", mid, "Sales/Mueller")
    assert team.show("sales", n)["owner"] == "mueller"
    assert ("rival_move_warn", "mueller") in team.events("sales", n)
    team.note("sales", f"Sales #{n}] moved by mueller", "Meier")
    later = team.deliver("sales", "Re: Quote", in_reply_to=mid, folder="Mueller")
    assert str(later["X-Postroom-Owner"]) == f"mueller (Sales #{n})"


def test_allow_applies_the_move_silently(team: Team) -> None:
    n, mid = team.claimed("billing", "Dunning", "meier")
    team.move("mueller", "Billing/Meier", mid, "Billing/Mueller")
    assert team.show("billing", n)["owner"] == "mueller"
    assert [k for k, _a in team.events("billing", n) if k == "rival_move_warn"] == []
    later = team.deliver("billing", "Re: Dunning", in_reply_to=mid, folder="Mueller")
    assert str(later["X-Postroom-Owner"]) == f"mueller (Billing #{n})"


def test_mail_that_bypassed_postroom_gets_a_ticket_when_moved(team: Team) -> None:
    # Delivered straight over LMTP, as mail is while the milter is down: no ticket, no X-Postroom headers.
    mid = make_msgid(idstring=uuid.uuid4().hex[:8], domain="customer.test")
    raw = f"From: Alice <{ALICE}>\r\nTo: support@example.test\r\nSubject: While you were down\r\n"
    raw += f"Message-ID: {mid}\r\n\r\nHello.\r\n"
    with smtplib.LMTP("127.0.0.1", team.stack.dovecot.lmtp_port) as lmtp:
        lmtp.sendmail(ALICE, ["support@example.test"], raw.encode())
    team.wait("support", "INBOX", mid)
    team.move("meier", "Support", mid, "Support/Meier")
    later = team.deliver("support", "Re: While you were down", in_reply_to=mid, folder="Meier")
    n = number(later, "Support")
    assert str(later["X-Postroom-Owner"]) == f"meier (Support #{n})"
    events = team.events("support", n)
    assert events[0] == ("opened", ALICE) and ("assign", "meier") in events


def test_two_agents_dragging_one_mail_at_once_one_wins(team: Team) -> None:
    first = team.deliver("support", "Both want it")
    n = number(first, "Support")
    mid = str(first["Message-ID"])
    sessions = {login: team.imap(login) for login in ("meier", "mueller")}
    uids = {}
    for login, imap in sessions.items():
        assert imap.select('"Support"')[0] == "OK"
        uids[login] = imap.uid("SEARCH", "HEADER", "Message-ID", f'"{mid}"')[1][0].decode()
    start = threading.Barrier(2)

    def drag(login: str) -> None:
        start.wait()
        sessions[login].uid("COPY", uids[login], f'"Support/{login.capitalize()}"')

    threads = [threading.Thread(target=drag, args=(login,)) for login in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for imap in sessions.values():
        imap.logout()
    owner = team.show("support", n)["owner"]
    loser = "mueller" if owner == "meier" else "meier"
    assert owner in ("meier", "mueller")
    kinds = team.events("support", n)
    assert ("assign", owner) in kinds and ("move_rejected", loser) in kinds
    assert ("assign", loser) not in kinds
    # The loser copied rather than moved: postroom removes the copy instead of filing the mail twice.
    deadline = time.monotonic() + 20
    while team.stack.find_raw("support@example.test", mid, loser.capitalize()):
        assert time.monotonic() < deadline, f"the refused copy is still in {loser.capitalize()}"
        time.sleep(0.2)
    assert len(team.stack.find_raw("support@example.test", mid, owner.capitalize())) == 1


def test_a_move_back_that_fails_is_in_the_ticket_history(team: Team) -> None:
    first = team.deliver("support", "Master password rotated")
    n = number(first, "Support")
    mid = str(first["Message-ID"])
    team.move("meier", "Support", mid, "Support/Meier")
    secret = Path(team.config.imap.master_password_file)
    good = secret.read_text()
    secret.write_text("not-the-master-password\n")
    try:
        team.move("mueller", "Support/Meier", mid, "Support/Mueller")
        deadline = time.monotonic() + 20
        while ("imap_followup_failed", "postroom") not in team.events("support", n):
            assert time.monotonic() < deadline, team.events("support", n)
            time.sleep(0.3)
    finally:
        secret.write_text(good)
    detail = next(e["detail"] for e in team.show("support", n)["events"] if e["kind"] == "imap_followup_failed")
    assert "moving it back into Meier" in detail
    team.wait("support", "Mueller", mid)  # where mueller left it: the move back could not be made


def test_agents_cannot_delete_the_team_folders(team: Team) -> None:
    imap = team.imap("meier")
    try:
        status, _detail = imap.delete('"Support/Mueller"')
        assert status == "NO"
        assert "Support/Mueller" in folders(imap)
    finally:
        imap.logout()
