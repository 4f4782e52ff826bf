"""Commands by mail end to end: agents steer tickets from their own client through Postfix's submission port."""

from __future__ import annotations

import smtplib
import time
from email.message import EmailMessage

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from postroom.history_rows import EventRow, TicketRow
from postroom_testbed import Deployment
from tests.test_inbound_e2e import SUPPORT, customer_mail, deliver, ticket_number
from tests.test_outbound_e2e import ALICE, BOB, _text, agent_mail, bounce_text, received, submit

pytestmark = pytest.mark.e2e


def ticket(d: Deployment, n: int) -> dict[str, str]:
    return {str(k): str(v) for k, v in d.redis_client().hgetall(f"postroom:{{{SUPPORT}}}:t:{n}").items()}


def opened(d: Deployment, sender: str = ALICE, subject: str = "Help") -> tuple[int, EmailMessage]:
    first = customer_mail(sender, subject)
    return ticket_number(deliver(d, first)), first


def note(d: Deployment, login: str, first: EmailMessage, body: str, subject: str = "Re: Help") -> EmailMessage:
    """An agent's mail to the shared address itself, in the thread of ``first``."""
    msg = agent_mail(f"{login}@example.test", SUPPORT, subject, in_reply_to=str(first["Message-ID"]), body=body)
    submit(d, login, msg, [SUPPORT])
    return msg


def refused(d: Deployment, login: str, msg: EmailMessage, rcpts: list[str]) -> str:
    """The refusal the agent gets: the milter's 550 in the SMTP session; after the queue, Postfix's bounce."""
    if d.adapter == "smtpd":
        submit(d, login, msg, rcpts)
        text = bounce_text(d, f"{login}@example.test", msg)
        assert "said: 550 " in text
        return text
    with pytest.raises(smtplib.SMTPDataError) as err:
        submit(d, login, msg, rcpts)
    assert err.value.smtp_code == 550
    return _text(err.value)


def events(d: Deployment, n: int, timeout: float = 10.0) -> list[tuple[str, str, str]]:
    """(kind, actor, detail) of the ticket's history, after the background writer caught up."""
    engine = create_engine(d.config.database.url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with Session(engine) as s:
                row = s.scalars(select(TicketRow).where(TicketRow.mailbox == SUPPORT, TicketRow.number == n)).first()
                if row is not None:
                    rows = s.scalars(select(EventRow).where(EventRow.ticket_id == row.id).order_by(EventRow.id))
                    found = [(e.kind, e.actor, e.detail) for e in rows]
                    if time.monotonic() > deadline or found:
                        return found
            if time.monotonic() > deadline:
                return []
            time.sleep(0.1)
    finally:
        engine.dispose()


def wait_event(d: Deployment, n: int, kind: str) -> list[tuple[str, str, str]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = events(d, n)
        if any(k == kind for k, _, _ in found):
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {kind} event for #{n}: {events(d, n)}")


def test_note_with_close_and_priority_reaches_only_the_team(deployment: Deployment) -> None:
    d = deployment
    n, first = opened(d)
    submit(
        d, "meier", agent_mail("meier@example.test", ALICE, "Re: Help", in_reply_to=str(first["Message-ID"])), [ALICE]
    )
    d.stack.postfix.wait_queue_empty()  # the reply above is in Alice's INBOX before she is counted
    before = len(d.stack.fetch(ALICE))
    msg = note(d, "meier", first, "#priority high\n#tag billing vip\nCalled her, waiting for the invoice.\n")
    got = received(d, SUPPORT, msg, folder="Meier")
    assert got["Subject"] == f"[Note] Re: [Support #{n}] Help"
    assert got["X-Postroom-Note"] == f"meier (Support #{n})"
    assert "Called her" in got.get_content()
    t = ticket(d, n)
    assert (t["priority"], t["tags"]) == ("high", "billing,vip")
    assert len(d.stack.fetch(ALICE)) == before  # the customer got nothing
    # Later customer mail shows priority and tags in any mail client.
    later = deliver(d, customer_mail(ALICE, "Re: Help", in_reply_to=str(first["Message-ID"])), folder="Meier")
    assert later["Importance"] == "high" and later["X-Priority"] == "2 (High)"
    assert later["Keywords"] == "billing, vip"
    assert later["X-Postroom-Tags"] == f"billing vip (Support #{n})"
    note(d, "meier", first, "#untag vip\n#close\n")
    d.stack.wait_for(SUPPORT, "Meier", 3)
    assert ticket(d, n)["state"] == "closed" and ticket(d, n)["tags"] == "billing"
    kinds = [(k, a, x) for k, a, x in wait_event(d, n, "close")]
    assert ("priority", "meier", "high") in kinds and ("tag", "meier", "billing vip") in kinds
    assert ("untag", "meier", "vip") in kinds and ("close", "meier", "") in kinds


def test_assign_in_a_reply_is_removed_before_the_customer_sees_it(deployment: Deployment) -> None:
    d = deployment
    n, first = opened(d, BOB, "Wrong size")
    reply = agent_mail(
        "meier@example.test",
        BOB,
        "Re: Wrong size",
        in_reply_to=str(first["Message-ID"]),
        body="#assign mueller\n#pending\n\nDear Bob,\nmy colleague Mueller takes care of it.\n",
    )
    submit(d, "meier", reply, [BOB])
    got = received(d, BOB, reply)
    assert got.get_content() == "Dear Bob,\nmy colleague Mueller takes care of it.\n"
    assert (ticket(d, n)["owner"], ticket(d, n)["state"]) == ("mueller", "pending")
    received(d, SUPPORT, reply, folder="Mueller")  # the team copy follows the new owner
    back = deliver(d, customer_mail(BOB, "Re: Wrong size", in_reply_to=str(reply["Message-ID"])), folder="Mueller")
    assert ticket_number(back) == n


def test_html_and_alternative_parts_lose_the_command_lines(deployment: Deployment) -> None:
    d = deployment
    n, first = opened(d, BOB, "HTML client")
    reply = agent_mail(
        "meier@example.test",
        BOB,
        "Re: HTML client",
        in_reply_to=str(first["Message-ID"]),
        body="#tag html\nDear Bob,\nhere you are.\n",
    )
    reply.add_alternative("<html><body><p>#tag html<br>Dear Bob,<br>here you are.</p></body></html>", subtype="html")
    submit(d, "meier", reply, [BOB])
    got = received(d, BOB, reply)
    plain = got.get_body(("plain",))
    html = got.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content() == "Dear Bob,\nhere you are.\n"
    assert "#tag" not in html.get_content() and "here you are." in html.get_content()
    assert ticket(d, n)["tags"] == "html"


def test_bad_line_refuses_the_whole_mail_and_changes_nothing(deployment: Deployment) -> None:
    d = deployment
    n, first = opened(d, ALICE, "Atomic")
    body = "#priority urgent\n#tag vip\n#assign nobody\nDear Alice\n"
    msg = agent_mail("meier@example.test", ALICE, "Re: Atomic", in_reply_to=str(first["Message-ID"]), body=body)
    text = refused(d, "meier", msg, [ALICE])
    assert "'#assign nobody'" in text and "unknown agent 'nobody'" in text and "Nothing was changed" in text
    t = ticket(d, n)
    assert (t["priority"], t["tags"], t["owner"]) == ("normal", "", "")
    bad = agent_mail(
        "meier@example.test", SUPPORT, "Re: Atomic", in_reply_to=str(first["Message-ID"]), body="#frobnicate now\n"
    )
    assert "'#frobnicate now': unknown command" in refused(d, "meier", bad, [SUPPORT])


def test_customer_cannot_command(deployment: Deployment) -> None:
    d = deployment
    n, first = opened(d, ALICE, "Sneaky")
    msg = customer_mail(ALICE, "Re: Sneaky", in_reply_to=str(first["Message-ID"]))
    msg.set_content("#close\n#assign mallory\nPlease close.\n")
    got = deliver(d, msg)
    assert got.get_content() == "#close\n#assign mallory\nPlease close.\n"
    assert (ticket(d, n)["state"], ticket(d, n)["owner"]) == ("new", "")


def test_take_release_and_takeover_in_notes(deployment: Deployment) -> None:
    d = deployment
    n, first = opened(d, ALICE, "Who takes it")
    note(d, "schulze", first, "#take\n")
    assert ticket(d, n)["owner"] == "schulze"
    assert "belongs to Schulze since" in refused(
        d,
        "mueller",
        agent_mail("mueller@example.test", SUPPORT, "Re: x", in_reply_to=str(first["Message-ID"]), body="#take\n"),
        [SUPPORT],
    )
    note(d, "schulze", first, "#release\n")
    assert ticket(d, n)["owner"] == ""
    assert (
        ticket_number(deliver(d, customer_mail(ALICE, "Re: Who takes it", in_reply_to=str(first["Message-ID"])))) == n
    )
    note(d, "mueller", first, "#take\n")
    note(d, "meier", first, "#takeover\n")
    assert ticket(d, n)["owner"] == "meier"


def test_note_keyword_keeps_a_reply_from_the_customer(deployment: Deployment) -> None:
    d = deployment
    n, first = opened(d, BOB, "Internal")
    before = len(d.stack.fetch(BOB))
    msg = agent_mail(
        "meier@example.test",
        BOB,
        "Re: Internal",
        in_reply_to=str(first["Message-ID"]),
        body="#note\nBob sounds angry, careful.\n",
    )
    submit(d, "meier", msg, [BOB])
    got = received(d, SUPPORT, msg, folder="INBOX")  # unowned ticket: the note waits in the team's inbox
    assert got["Subject"].startswith("[Note] ")
    assert len(d.stack.fetch(BOB)) == before
    plain = agent_mail("meier@example.test", SUPPORT, f"[Support #{n}] Internal", body="Just a thought.\n")
    submit(d, "meier", plain, [SUPPORT])
    assert received(d, SUPPORT, plain)["X-Postroom-Note"] == f"meier (Support #{n})"


def test_canned_reply_is_expanded_for_the_customer(deployment: Deployment) -> None:
    d = deployment
    n, first = opened(d, ALICE, "Money back?")
    reply = agent_mail(
        "meier@example.test",
        "Alice Example <alice@customer.test>",
        "Re: Money back?",
        in_reply_to=str(first["Message-ID"]),
        body="#canned refund\n\nBest regards\nMeier\n",
    )
    submit(d, "meier", reply, [ALICE])
    text = received(d, ALICE, reply).get_content()
    assert text.startswith("Dear Alice Example,\n\nwe have refunded your payment")
    assert f"Please quote Support #{n} if you write" in text
    assert text.endswith("Best regards\nMeier\n") and "#canned" not in text
    bad = agent_mail(
        "meier@example.test", ALICE, "Re: Money back?", in_reply_to=str(first["Message-ID"]), body="#canned nope\n"
    )
    assert "no canned reply 'nope' (known: received, refund)" in refused(d, "meier", bad, [ALICE])


def test_away_hands_tickets_to_the_inbox_and_back_restores_routing(deployment: Deployment) -> None:
    d = deployment
    n, first = opened(d, BOB, "Holiday")
    submit(
        d,
        "schulze",
        agent_mail("schulze@example.test", BOB, "Re: Holiday", in_reply_to=str(first["Message-ID"])),
        [BOB],
    )
    assert ticket(d, n)["owner"] == "schulze"
    away = agent_mail("schulze@example.test", SUPPORT, "Holiday", body="#away until 2099-01-31\n")
    submit(d, "schulze", away, [SUPPORT])
    received(d, SUPPORT, away, folder="Schulze")  # the absent agent's folder keeps its history
    assert ticket(d, n)["owner"] == ""
    assert d.redis_client().exists(f"postroom:{{{SUPPORT}}}:away:schulze")
    assert ticket_number(deliver(d, customer_mail(BOB, "Re: Holiday", in_reply_to=str(first["Message-ID"])))) == n
    submit(d, "schulze", agent_mail("schulze@example.test", SUPPORT, "Back", body="#back\n"), [SUPPORT])
    assert not d.redis_client().exists(f"postroom:{{{SUPPORT}}}:away:schulze")
    assert any(k == "handed_over" for k, _, _ in wait_event(d, n, "handed_over"))
