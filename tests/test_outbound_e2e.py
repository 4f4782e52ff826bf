"""Outbound end to end: agents answer through Postfix's submission port with their own login."""

from __future__ import annotations

import smtplib
import threading
import uuid
from email.message import EmailMessage
from email.utils import make_msgid, parseaddr

import dkim
import pytest

from postroom.dkim import dns_answer, public_txt
from postroom.testbed import Deployment, Login
from tests.test_inbound_e2e import SUPPORT, customer_mail, deliver, ticket_number

pytestmark = pytest.mark.e2e

ALICE = "alice@customer.test"
BOB = "bob@customer.test"


def agent_mail(
    frm: str,
    to: str,
    subject: str,
    *,
    in_reply_to: str = "",
    body: str = "Dear customer,\nwe are on it.\n",
    extra: dict[str, str] | None = None,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = frm
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(idstring=uuid.uuid4().hex[:8], domain="example.test")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    for k, v in (extra or {}).items():
        msg[k] = v
    msg.set_content(body)
    return msg


def _text(err: smtplib.SMTPResponseException) -> str:
    raw = err.smtp_error
    return raw.decode() if isinstance(raw, bytes) else raw


def submit(d: Deployment, login: str, msg: EmailMessage, rcpts: list[str]) -> None:
    d.stack.send(msg, mail_from=parseaddr(str(msg["From"]))[1], rcpts=rcpts, login=Login(login))


def received(d: Deployment, address: str, msg: EmailMessage, folder: str = "INBOX") -> EmailMessage:
    for _ in range(3):
        got = [m for m in d.stack.wait_for(address, folder, 1) if m["Message-ID"] == msg["Message-ID"]]
        if got:
            assert len(got) == 1
            return got[0]
        d.stack.postfix.wait_queue_empty()
    raise AssertionError(f"{msg['Message-ID']} not in {address}/{folder}")


def open_ticket(d: Deployment, sender: str = ALICE, subject: str = "Router broken") -> tuple[int, EmailMessage]:
    first = customer_mail(sender, subject)
    return ticket_number(deliver(d, first)), first


def owner(d: Deployment, n: int, box: str = SUPPORT) -> str:
    return str(d.redis_client().hget(f"postroom:{{{box}}}:t:{n}", "owner") or "")


def test_reply_leaves_from_the_shared_address_signed_and_threaded(deployment: Deployment) -> None:
    d = deployment
    n, first = open_ticket(d)
    reply = agent_mail(
        "Meier <meier@example.test>",
        ALICE,
        f"Re: [Support #{n}] Router broken",
        in_reply_to=str(first["Message-ID"]),
        extra={"Thread-Index": "AQHZx1234abcd==", "X-Postroom-Owner": "forged by the client"},
    )
    submit(d, "meier", reply, [ALICE])
    got = received(d, ALICE, reply)
    raw = next(r for r in d.stack.fetch_raw(ALICE) if str(reply["Message-ID"]).encode() in r)
    assert b'\r\nFrom: "Meier via Support" <support@example.test>\r\n' in raw
    assert got["Reply-To"] == SUPPORT
    assert got["Return-Path"] == f"<{SUPPORT}>"
    assert got["Subject"] == f"Re: [Support #{n}] Router broken"
    assert got["In-Reply-To"] == first["Message-ID"] and got["References"] == first["Message-ID"]
    assert got["Thread-Index"] == "AQHZx1234abcd=="
    assert not [k for k in got if k.lower().startswith("x-postroom")], got.items()
    assert "meier@example.test" not in str(got)  # nothing leaks the agent's personal address
    # DKIM: d=example.test, verified against the example key's public record.
    key = d.config.dkim["example.test"]
    with open(key.key_file, "rb") as fh:
        txt = public_txt(fh.read())
    assert "d=example.test" in str(got["DKIM-Signature"])
    assert dkim.verify(raw, dnsfunc=dns_answer({f"{key.selector}._domainkey.example.test.": txt}))
    # The ticket is Meier's now, and the team has the reply in his folder.
    assert owner(d, n) == "meier"
    copy = received(d, SUPPORT, reply, folder="Meier")
    assert copy["From"] == got["From"]


def test_customer_answer_to_the_reply_threads_into_the_owners_folder(deployment: Deployment) -> None:
    d = deployment
    n, first = open_ticket(d, BOB, "Password reset")
    reply = agent_mail("meier@example.test", BOB, "Re: Password reset", in_reply_to=str(first["Message-ID"]))
    submit(d, "meier", reply, [BOB])
    got = received(d, BOB, reply)
    assert got["Subject"] == f"Re: [Support #{n}] Password reset"
    answer = customer_mail(BOB, "Re: Password reset", in_reply_to=str(reply["Message-ID"]))
    back = deliver(d, answer, folder="Meier")
    assert ticket_number(back) == n


def test_rival_reply_is_refused_with_owner_and_takeover_hint(deployment: Deployment) -> None:
    d = deployment
    n, first = open_ticket(d, ALICE, "Refund")
    submit(
        d, "meier", agent_mail("meier@example.test", ALICE, "Re: Refund", in_reply_to=str(first["Message-ID"])), [ALICE]
    )
    rival = agent_mail(
        "mueller@example.test", ALICE, f"Re: [Support #{n}] Refund", in_reply_to=str(first["Message-ID"])
    )
    with pytest.raises(smtplib.SMTPDataError) as err:
        submit(d, "mueller", rival, [ALICE])
    assert err.value.smtp_code == 550
    text = _text(err.value)
    assert text.startswith("5.7.1")
    assert f"[Support #{n}] belongs to Meier since" in text and "#takeover" in text
    assert owner(d, n) == "meier"

    takeover = agent_mail(
        "mueller@example.test",
        ALICE,
        f"Re: [Support #{n}] Refund",
        in_reply_to=str(first["Message-ID"]),
        body="#takeover\n\nDear Alice,\nI take this over.\n",
    )
    submit(d, "mueller", takeover, [ALICE])
    got = received(d, ALICE, takeover)
    assert got.get_content() == "Dear Alice,\nI take this over.\n"
    assert owner(d, n) == "mueller"
    assert received(d, SUPPORT, takeover, folder="Mueller")


def test_warn_policy_delivers_and_tells_the_owner(deployment: Deployment) -> None:
    d = deployment
    first = customer_mail(ALICE, "Quote", to="sales@example.test")
    n = ticket_number(deliver(d, first, rcpts=["sales@example.test"], mailbox="sales@example.test"), "Sales")
    submit(
        d,
        "schulze",
        agent_mail("schulze@example.test", ALICE, "Re: Quote", in_reply_to=str(first["Message-ID"])),
        [ALICE],
    )
    rival = agent_mail("mueller@example.test", ALICE, "Re: Quote", in_reply_to=str(first["Message-ID"]))
    submit(d, "mueller", rival, [ALICE])
    assert received(d, ALICE, rival)["From"] == "Mueller via Sales <sales@example.test>"
    assert owner(d, n, "sales@example.test") == "schulze"
    assert received(d, "schulze@example.test", rival)


def _race(d: Deployment, first: EmailMessage, subject: str) -> dict[str, str]:
    """Meier and Mueller submit a reply to the same ticket at the same moment; each gets "sent" or a code."""
    results: dict[str, str] = {}
    start = threading.Barrier(2)

    def answer(login: str) -> None:
        msg = agent_mail(f"{login}@example.test", BOB, f"Re: {subject}", in_reply_to=str(first["Message-ID"]))
        start.wait()
        try:
            submit(d, login, msg, [BOB])
            results[login] = "sent"
        except smtplib.SMTPDataError as exc:
            results[login] = f"{exc.smtp_code}"

    threads = [threading.Thread(target=answer, args=(a,)) for a in ("meier", "mueller")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_agents_at_once_exactly_one_wins_50_times(deployment: Deployment) -> None:
    d = deployment
    for round_ in range(50):
        n, first = open_ticket(d, BOB, f"Race {round_}")
        results = _race(d, first, f"Race {round_}")
        assert sorted(results.values()) == ["550", "sent"], (round_, results)
        winner = next(a for a, r in results.items() if r == "sent")
        assert owner(d, n) == winner


def test_new_mail_from_the_shared_identity_opens_a_ticket_owned_by_the_agent(deployment: Deployment) -> None:
    d = deployment
    msg = agent_mail("support@example.test", BOB, "Your order 4711")
    submit(d, "schulze", msg, [BOB])
    got = received(d, BOB, msg)
    n = int(str(got["Subject"]).split("#")[1].split("]")[0])
    assert got["Subject"] == f"[Support #{n}] Your order 4711"
    assert got["From"] == "Schulze via Support <support@example.test>"
    assert owner(d, n) == "schulze"


def test_personal_mail_of_an_agent_is_left_alone(deployment: Deployment) -> None:
    d = deployment
    msg = agent_mail("Meier <meier@example.test>", BOB, "Lunch?")
    submit(d, "meier", msg, [BOB])
    got = received(d, BOB, msg)
    assert got["From"] == "Meier <meier@example.test>" and got["Subject"] == "Lunch?"
    assert got.get("DKIM-Signature") is None


def test_unauthenticated_mail_claiming_to_be_an_agent_is_not_trusted(deployment: Deployment) -> None:
    d = deployment
    n, _first = open_ticket(d, ALICE, "Spoof target")
    spoof = customer_mail("meier@example.test", f"Re: [Support #{n}] Spoof target")
    got = deliver(d, spoof)  # arrives as customer mail from a stranger: a new ticket, in the INBOX
    assert ticket_number(got) != n
    assert owner(d, n) == ""
    spoof_out = agent_mail("Support <support@example.test>", ALICE, "Pay here")
    d.stack.send(spoof_out, mail_from="support@example.test", rcpts=[ALICE])  # MX port, no login
    got = received(d, ALICE, spoof_out)
    assert got["From"] == "Support <support@example.test>"  # not rewritten into a trusted reply
    assert got.get("DKIM-Signature") is None


def test_redis_down_tempfails_replies_instead_of_sending_them_unrewritten(own_deployment: Deployment) -> None:
    d = own_deployment
    n, first = open_ticket(d, ALICE, "Down")
    d.stack.redis.stop()
    reply = agent_mail("meier@example.test", ALICE, f"Re: [Support #{n}] Down", in_reply_to=str(first["Message-ID"]))
    with pytest.raises(smtplib.SMTPDataError) as err:
        submit(d, "meier", reply, [ALICE])
    assert err.value.smtp_code == 451
    assert _text(err.value).startswith("4.3.0")
    d.stack.redis.start()
