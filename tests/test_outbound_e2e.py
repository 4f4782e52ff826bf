"""Outbound end to end: agents answer through Postfix's submission port with their own login."""

from __future__ import annotations

import re
import smtplib
import threading
import time
import uuid
from email.message import EmailMessage
from email.utils import make_msgid, parseaddr

import pytest

from postroom.dkim import public_txt
from postroom_testbed import Deployment, Login
from tests.dkim_check import assert_verified
from tests.test_inbound_e2e import SUPPORT, customer_mail, deliver, queue_id, ticket_number

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


def submit(d: Deployment, login: str, msg: EmailMessage, rcpts: list[str], *, wait: bool = True) -> None:
    d.stack.send(msg, mail_from=parseaddr(str(msg["From"]))[1], rcpts=rcpts, login=Login(login))
    if wait and d.adapter == "smtpd":
        # After the queue, Postfix says 250 before postroom has seen the mail: wait until it has, so the next step
        # sees the claim this reply made, as it does after the milter's 250.
        d.stack.postfix.wait_queue_empty()


def mid(msg: EmailMessage) -> str:
    return str(msg["Message-ID"]).strip("<>")


def bounce_text(d: Deployment, address: str, msg: EmailMessage, timeout: float = 20.0) -> str:
    """The delivery status notification in ``address``'s INBOX about ``msg``, white space made single spaces."""
    deadline = time.monotonic() + timeout
    while True:
        found = [raw for raw in d.stack.find_raw(address, mid(msg)) if b"<MAILER-DAEMON@" in raw]
        if found:
            assert len(found) == 1, f"{len(found)} bounces about {mid(msg)} in {address}'s INBOX"
            return " ".join(found[0].decode(errors="replace").split())
        assert time.monotonic() < deadline, f"no bounce about {mid(msg)} in {address}'s INBOX"
        time.sleep(0.1)


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
    assert_verified(raw, {f"{key.selector}._domainkey.example.test.": txt})
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
    if d.before_queue:
        # The milter refuses inside Mueller's SMTP session: his mail client shows the reply text at once.
        with pytest.raises(smtplib.SMTPDataError) as err:
            submit(d, "mueller", rival, [ALICE])
        assert err.value.smtp_code == 550
        text = _text(err.value)
        assert text.startswith("5.7.1")
    else:
        # After the queue, Postfix has accepted the mail before postroom sees it; the filter's refusal comes back
        # to Mueller as a bounce from Postfix carrying the same reply text.
        submit(d, "mueller", rival, [ALICE])
        text = bounce_text(d, "mueller@example.test", rival)
        assert "550 5.7.1 postroom:" in text
    assert f"[Support #{n}] belongs to Meier since" in text and "#takeover" in text
    assert owner(d, n) == "meier"
    d.stack.postfix.wait_queue_empty()
    assert not d.stack.find_raw(ALICE, mid(rival))  # Alice never gets the rival reply

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


def _race(d: Deployment, first: EmailMessage, subject: str) -> tuple[dict[str, str], dict[str, EmailMessage]]:
    """Meier and Mueller submit a reply to the same ticket at the same moment; each gets "sent" or a code."""
    results: dict[str, str] = {}
    start = threading.Barrier(2)
    msgs = {
        login: agent_mail(f"{login}@example.test", BOB, f"Re: {subject}", in_reply_to=str(first["Message-ID"]))
        for login in ("meier", "mueller")
    }

    def answer(login: str) -> None:
        start.wait()
        try:
            submit(d, login, msgs[login], [BOB], wait=False)
            results[login] = "sent"
        except smtplib.SMTPDataError as exc:
            results[login] = f"{exc.smtp_code}"

    threads = [threading.Thread(target=answer, args=(a,)) for a in msgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, msgs


def test_two_agents_at_once_exactly_one_wins_50_times(deployment: Deployment) -> None:
    d = deployment
    for round_ in range(50):
        n, first = open_ticket(d, BOB, f"Race {round_}")
        results, msgs = _race(d, first, f"Race {round_}")
        if d.before_queue:
            assert sorted(results.values()) == ["550", "sent"], (round_, results)
            winner = next(a for a, r in results.items() if r == "sent")
            assert owner(d, n) == winner
            continue
        # After the queue both agents' clients get 250; the filter handles both replies at once, lets one
        # through and bounces the other.
        assert results == {"meier": "sent", "mueller": "sent"}, (round_, results)
        d.stack.postfix.wait_queue_empty()
        delivered = [login for login, msg in msgs.items() if d.stack.find_raw(BOB, mid(msg))]
        assert len(delivered) == 1, (round_, delivered)
        winner = delivered[0]
        loser = next(login for login in msgs if login != winner)
        assert owner(d, n) == winner
        assert f"[Support #{n}] belongs to {winner.capitalize()} since" in bounce_text(
            d, f"{loser}@example.test", msgs[loser]
        )


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
    # A production Redis keeps its data over an outage (persistence): so does this one.
    d.redis_client().save()
    d.stack.redis.stop()
    reply = agent_mail("meier@example.test", ALICE, f"Re: [Support #{n}] Down", in_reply_to=str(first["Message-ID"]))
    if d.before_queue:
        # Inside the session: Meier's mail client gets the 451 and tries again later.
        with pytest.raises(smtplib.SMTPDataError) as err:
            submit(d, "meier", reply, [ALICE])
        assert err.value.smtp_code == 451
        assert _text(err.value).startswith("4.3.0")
        d.stack.redis.start()
        return
    # After the queue Meier's client has its 250 already: Postfix keeps the reply deferred and tries again.
    submit(d, "meier", reply, [ALICE], wait=False)
    qid = queue_id(d, str(reply["Message-ID"]))
    deferred = re.compile(rf"{qid}: .*status=deferred .*451 4\.3\.0 postroom: ticket store unavailable")
    deadline = time.monotonic() + 20
    while not deferred.search(d.stack.postfix.log_text()):
        assert time.monotonic() < deadline, d.stack.postfix.log_tail()
        time.sleep(0.1)
    assert qid in d.stack.postfix.queue_ids()
    assert not d.stack.find_raw(ALICE, mid(reply))  # nothing left unrewritten from Meier's own address
    d.stack.redis.start()
    d.stack.postfix.flush()
    got = received(d, ALICE, reply)
    assert got["From"] == "Meier via Support <support@example.test>"
    assert got["Subject"] == f"Re: [Support #{n}] Down"
    assert "d=example.test" in str(got["DKIM-Signature"])
    assert owner(d, n) == "meier"
