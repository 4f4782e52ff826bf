"""Rules and auto-replies end to end: routing into folders, acknowledgements, RFC 3834 loops, the daily cap."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.config import parse_config
from postroom_testbed import ADAPTERS, Deployment, deploy
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.test_inbound_e2e import SALES, SUPPORT, customer_mail, deliver, ticket_number

pytestmark = pytest.mark.e2e

RULES = """
[[rule]]
name = "invoices to Meier"
subject_contains = "invoice"
tag = "billing"
priority = "high"
assign = "meier"

[[rule]]
name = "press into its folder"
sender_domain = "press.test"
folder = "Press"
auto_reply = "none"
"""


@pytest.fixture(params=ADAPTERS)
def ruled(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    data = e2e_base_config().model_dump()
    data["rules_file"] = str(rules)
    data["autoreply"] = {**data["autoreply"], "acknowledge": True, "daily_cap": 3}
    with deploy(parse_config(data, environ={}), (*CUSTOMERS, "reporter@press.test"), adapter=request.param) as d:
        yield d


def settle(d: Deployment, seconds: float = 1.5) -> None:
    """Let Postfix and the mailer finish what they have, then give any loop time to show itself."""
    d.stack.postfix.wait_queue_empty()
    time.sleep(seconds)
    d.stack.postfix.wait_queue_empty()


def test_rule_assigns_and_routes_a_new_ticket_and_acknowledges_it(ruled: Deployment) -> None:
    d = ruled
    msg = customer_mail("alice@customer.test", "Invoice 4711 is wrong")
    got = deliver(d, msg, folder="Meier")
    n = ticket_number(got)
    assert got["X-Postroom-Owner"] == f"meier (Support #{n})"
    assert got["Importance"] == "high" and got["Keywords"] == "billing"
    ack = d.stack.wait_for("alice@customer.test", "INBOX", 1)
    [reply] = [m for m in ack if m["In-Reply-To"] == msg["Message-ID"]]
    assert f"[Support #{n}]" in str(reply["Subject"])
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply["From"].addresses[0].addr_spec == SUPPORT
    assert reply["DKIM-Signature"] is not None
    # The customer answers the acknowledgement: it threads into the ticket, into Meier's folder.
    answer = customer_mail("alice@customer.test", "Re: ack", in_reply_to=str(reply["Message-ID"]))
    assert ticket_number(deliver(d, answer, folder="Meier")) == n


def test_rule_folder_and_no_auto_reply(ruled: Deployment) -> None:
    d = ruled
    got = deliver(d, customer_mail("reporter@press.test", "Interview?"), folder="Press")
    assert ticket_number(got) >= 1
    settle(d)
    assert d.stack.fetch("reporter@press.test") == []


def test_no_auto_reply_to_our_own_mailboxes_or_to_auto_replies(ruled: Deployment) -> None:
    d = ruled
    # One postroom mailbox writing to another: sales would answer support's ack, support sales' ack, and so
    # on; postroom stops at once because mail from its own addresses is never answered.
    d.stack.send(customer_mail(SALES, "Hello from sales"), mail_from=SALES, rcpts=[SUPPORT])
    # Another system's auto-reply (an out-of-office, a ticket system) opens a ticket but gets no answer.
    ooo = customer_mail("bob@customer.test", "Out of office", extra={"Auto-Submitted": "auto-replied"})
    d.stack.send(ooo, mail_from="bob@customer.test", rcpts=[SUPPORT])
    bulk = customer_mail("bob@customer.test", "Newsletter", extra={"Precedence": "bulk"})
    d.stack.send(bulk, mail_from="bob@customer.test", rcpts=[SUPPORT])
    d.stack.wait_for(SUPPORT, "INBOX", 3)
    settle(d)
    assert len(d.stack.fetch(SUPPORT)) == 3
    assert all(str(m["Subject"]).startswith("[Support #") for m in d.stack.fetch(SUPPORT))
    assert d.stack.fetch(SALES) == []
    assert d.stack.fetch("bob@customer.test") == []


def test_daily_cap_per_correspondent(ruled: Deployment) -> None:
    d = ruled
    for i in range(5):
        deliver(d, customer_mail("bob@customer.test", f"Question {i}"))
    settle(d)
    acks = [m for m in d.stack.fetch("bob@customer.test") if m["Auto-Submitted"] == "auto-replied"]
    assert len(acks) == 3
