"""Nothing falls through, end to end: real Postfix, Dovecot and Redis, the real daemon, and ``--now`` for the clock.

Reminders, escalations and follow-ups are sent by ``postroom remind`` through the stack's Postfix (and so through
postroom itself, which must let them pass untouched); digests by ``postroom digest``; /metrics is scraped from the
running daemon.
"""

from __future__ import annotations

import datetime as dt
import time
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from postroom.admin.cli import main
from postroom.config import Config, parse_config, to_toml
from postroom_testbed import ADAPTERS, Deployment, deploy, free_port
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.slafix import sla_config, write_history
from tests.test_commands_e2e import note, wait_event
from tests.test_inbound_e2e import SUPPORT, customer_mail, deliver, ticket_number
from tests.test_outbound_e2e import ALICE, BOB, agent_mail, submit

pytestmark = pytest.mark.e2e

LEAD = "schulze@example.test"
MEIER = SUPPORT  # the shared mailbox; Meier's tickets are its folder "Meier"
NO_ENV = {"POSTROOM_REDIS_URL": None, "POSTROOM_DATABASE_URL": None, "POSTROOM_MILTER_SOCKET": None}


def e2e_sla_config() -> Config:
    """Always open (the e2e clock is the real one plus offsets), 1h first response, 2h next response, a lead."""
    data = e2e_base_config().model_dump()
    data["hours"] = {"timezone": "UTC", "holidays": []}
    data["mailboxes"]["support"] |= {
        "leads": ["schulze"],
        "sla": {"normal": {"first_response": "1h", "next_response": "2h"}},
    }
    data["sla"] = {"remind_before": "30m", "unassigned_after": ""}
    data["metrics"] = {"milter_listen": f"127.0.0.1:{free_port()}", "smtpd_listen": f"127.0.0.1:{free_port()}"}
    return parse_config(data, environ={})


@pytest.fixture(scope="module", params=ADAPTERS)
def d(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    with deploy(e2e_sla_config(), CUSTOMERS, adapter=request.param) as dep:
        yield dep


def run(tmp_path: Path, config: Config, *args: str) -> str:
    path = tmp_path / "postroom.toml"
    path.write_text(to_toml(config))
    res = CliRunner().invoke(main, [args[0], "--config", str(path), *args[1:]], env=NO_ENV)
    assert res.exit_code == 0, res.output
    return res.output


def later(minutes: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)).isoformat()


def notices(d: Deployment, address: str, folder: str, mark: str, wanted: int = 0) -> list[EmailMessage]:
    """The notices about ticket ``mark`` in the folder, after waiting (up to 20 s) for ``wanted`` of them."""
    deadline = time.monotonic() + 20
    while True:
        d.stack.postfix.wait_queue_empty()
        got = d.stack.fetch(address, folder) if folder in d.stack.folders(address) else []
        found = [m for m in got if m["Auto-Submitted"] == "auto-generated" and f"[{mark}]" in str(m["Subject"])]
        if len(found) >= wanted or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def arrived(d: Deployment, address: str, subject: str) -> list[EmailMessage]:
    """The mails in ``address``'s INBOX whose subject contains ``subject``, once there is one (up to 20 s)."""
    deadline = time.monotonic() + 20
    while True:
        found = [m for m in d.stack.wait_for(address, "INBOX", 1) if subject in str(m["Subject"])]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def counter(d: Deployment) -> int:
    return int(d.redis_client().get(f"postroom:{{{SUPPORT}}}:counter") or 0)


def test_overdue_ticket_reminds_the_owner_then_escalates_to_the_lead_once(d: Deployment, tmp_path: Path) -> None:
    first = customer_mail(ALICE, "Printer on fire")
    delivered = deliver(d, first)
    n = ticket_number(delivered)
    assert delivered["X-Postroom-Due"]  # the first response is due in an hour
    note(d, "meier", first, "#take\n")
    wait_event(d, n, "take")
    tickets_before = counter(d)

    assert "1 notices sent" in run(tmp_path, d.config, "remind", "--now", later(45))
    mine = notices(d, MEIER, "Meier", f"Support #{n}", wanted=1)
    assert len(mine) == 1
    assert str(mine[0]["Subject"]).startswith(f"[Support #{n}] Reminder: first response due")
    assert mine[0]["Auto-Submitted"] == "auto-generated"
    assert counter(d) == tickets_before  # postroom let its own notice through: no new ticket
    assert "0 notices sent" in run(tmp_path, d.config, "remind", "--now", later(50))

    assert "1 notices sent" in run(tmp_path, d.config, "remind", "--now", later(120))
    assert "0 notices sent" in run(tmp_path, d.config, "remind", "--now", later(125))
    escalations = notices(d, LEAD, "INBOX", f"Support #{n}", wanted=1)
    assert len(escalations) == 1
    assert "Escalation: first response overdue" in str(escalations[0]["Subject"])
    # To the lead's own address, not a shared mailbox: still postroom's notice, headers kept for the lead's filters.
    assert escalations[0]["X-Postroom-Notice"] == f"escalation {n} (Support #{n})"
    assert escalations[0]["X-Postroom-Due"]
    assert len(notices(d, MEIER, "Meier", f"Support #{n}")) == 1
    assert notices(d, ALICE, "INBOX", f"Support #{n}") == []  # never to the customer
    assert ("notice", "postroom") in {(k, a) for k, a, _ in wait_event(d, n, "notice")}


def test_follow_up_fires_when_the_customer_is_silent_and_not_when_they_answer(d: Deployment, tmp_path: Path) -> None:
    silent = customer_mail(ALICE, "Where is my refund")
    quiet = ticket_number(deliver(d, silent))
    answering = customer_mail(BOB, "Login fails")
    talk = ticket_number(deliver(d, answering))
    until = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).strftime("%Y-%m-%d %H:%M")
    for msg, rcpt, command in ((silent, ALICE, "#remind 2d"), (answering, BOB, f"#pending until {until}")):
        reply = agent_mail(
            "meier@example.test",
            rcpt,
            f"Re: {msg['Subject']}",
            in_reply_to=str(msg["Message-ID"]),
            body=f"{command}\nDear customer,\nplease send us the details.\n",
        )
        submit(d, "meier", reply, [rcpt])
        if rcpt == BOB:
            bob_reply = reply
    wait_event(d, quiet, "remind")
    wait_event(d, talk, "pending")
    d.stack.wait_for(BOB, "INBOX", 1)
    deliver(d, customer_mail(BOB, "Re: Login fails", in_reply_to=str(bob_reply["Message-ID"])), folder="Meier")
    wait_event(d, talk, "followup")

    run(tmp_path, d.config, "remind", "--now", later(2 * 24 * 60 + 5))
    fired = notices(d, MEIER, "Meier", f"Support #{quiet}", wanted=1)
    assert [str(m["Subject"]).split(":")[0] for m in fired] == [f"[Support #{quiet}] Followup"]
    assert [m for m in notices(d, MEIER, "Meier", f"Support #{talk}") if "Followup" in str(m["Subject"])] == []
    assert d.redis_client().hget(f"postroom:{{{SUPPORT}}}:t:{talk}", "state") == "open"  # Bob's answer reopened it


def test_digests_arrive_with_the_figures_of_a_known_history(d: Deployment, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fixture.sqlite3'}"
    write_history(url)
    config = sla_config(d.config, database={"url": url}, sla={"lead_digest": "weekly"})
    assert "2 digests sent" in run(tmp_path, config, "digest", "--now", "2026-11-30T00:00:00Z")
    lead = arrived(d, LEAD, "weekly figures")
    assert len(lead) == 1
    plain = lead[0].get_body(("plain",))
    html = lead[0].get_body(("html",))
    assert plain is not None and html is not None
    rows = {" ".join(line.split()[:-2]): line.split()[-2:] for line in plain.get_content().splitlines()[3:13]}
    assert rows["New tickets"] == ["3", "1"]  # 4 was opened the Sunday before
    assert rows["Closed"] == ["2", "0"]
    assert rows["Backlog (open at the end)"] == ["2", "1"]  # 4 was open at the end of the week before
    assert rows["SLA breaches"] == ["4", "0"]
    assert rows["First response, median (business min)"] == ["60.0", "-"]
    images = [p for p in lead[0].walk() if p.get_content_type() == "image/png"]
    assert len(images) == 1
    cid = str(images[0]["Content-ID"]).strip("<>")
    assert f"cid:{cid}" in html.get_content()
    assert images[0].get_content().startswith(b"\x89PNG\r\n\x1a\n")
    mine = arrived(d, "meier@example.test", "Your tickets")
    assert len(mine) == 1
    body = mine[0].get_body(("plain",))
    assert body is not None and "#2" in body.get_content() and "#1 " not in body.get_content()


def _scrape(d: Deployment) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    listen = d.config.metrics.milter_listen if d.before_queue else d.config.metrics.smtpd_listen
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_parse_and_move_with_the_mails(d: Deployment, tmp_path: Path) -> None:
    run(tmp_path, d.config, "remind", "--now", later(3 * 24 * 60))  # counts the breached tickets for the metrics
    key = ("postroom_mails_total", (("path", "inbound"), ("verdict", "accept")))
    latency = ("postroom_pipeline_seconds_count", (("path", "inbound"),))
    before = _scrape(d)
    for i in range(3):
        deliver(d, customer_mail(ALICE, f"Metrics {i}"))
    deadline = time.monotonic() + 10
    after = _scrape(d)
    while after.get(key, 0) < before.get(key, 0) + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        after = _scrape(d)
    assert after[key] == before.get(key, 0) + 3
    assert after[latency] == before.get(latency, 0) + 3
    assert any(name == "postroom_open_tickets" for name, _ in after)
    assert after[("postroom_sla_breached_tickets", (("mailbox", "Support"),))] >= 1  # test 1's ticket at least
    assert ("postroom_redis_errors_total", ()) in after
