"""Redis SIGKILLed and restarted empty (no persistence) between mails, through a real Postfix, Dovecot and the
real postroom daemon: no ticket number is issued a second time, and an old conversation threads again once the
daemon has rebuilt Redis from the history by itself."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from sqlalchemy import func, select

from postroom.history import make_engine
from postroom.history_rows import EventRow, TicketRow
from postroom_testbed import ADAPTERS, Adapter, Deployment, deploy
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.test_inbound_e2e import SUPPORT, customer_mail
from tests.test_outbound_e2e import agent_mail, received, submit

pytestmark = pytest.mark.e2e
ALICE, BOB = CUSTOMERS[0], CUSTOMERS[1]


def wait_until(what: str, ok: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def history_tickets(d: Deployment) -> int:
    engine = make_engine(d.config.database.url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(TicketRow)).scalar_one())
    finally:
        engine.dispose()


def history_events(d: Deployment, kind: str) -> int:
    engine = make_engine(d.config.database.url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(select(func.count()).select_from(EventRow).where(EventRow.kind == kind)).scalar_one()
            )
    finally:
        engine.dispose()


def numbers(d: Deployment) -> list[int]:
    found = [re.search(r"#(\d+)\]", str(m["Subject"])) for m in d.stack.fetch(SUPPORT)]
    return [int(m.group(1)) for m in found if m]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_redis_restarted_empty_issues_no_number_twice_and_old_mail_threads_again(adapter: Adapter) -> None:
    with deploy(e2e_base_config(), CUSTOMERS, adapter=adapter) as d:
        first = customer_mail(ALICE, "Printer on fire")
        d.stack.send(first, mail_from=ALICE, rcpts=[SUPPORT])
        for i in range(5):
            d.stack.send(customer_mail(BOB, f"Question {i}"), mail_from=BOB, rcpts=[SUPPORT])
        d.stack.wait_for(SUPPORT, "INBOX", 6)
        # meier answers Alice, tags the ticket and goes on holiday: tags and #away are in the history too.
        reply = agent_mail(
            "meier@example.test",
            ALICE,
            "Re: Printer on fire",
            in_reply_to=str(first["Message-ID"]),
            body="#tag vip\n#away until 2099-01-31\nWe are on it.\n",
        )
        submit(d, "meier", reply, [ALICE])
        alice = int(re.search(r"#(\d+)\]", str(received(d, ALICE, reply)["Subject"])).group(1))  # type: ignore[union-attr]
        wait_until("six tickets in the history", lambda: history_tickets(d) == 6)
        wait_until("meier's #away in the history", lambda: history_events(d, "away") == 1)

        redis_server = d.stack.redis
        assert redis_server.pid is not None
        os.kill(redis_server.pid, signal.SIGKILL)
        redis_server.stop()
        redis_server.start()  # empty: the test's Redis keeps nothing on disk

        for i in range(4):
            d.stack.send(customer_mail(BOB, f"After {i}"), mail_from=BOB, rcpts=[SUPPORT])
        d.stack.wait_for(SUPPORT, "INBOX", 10)
        issued = numbers(d)
        assert sorted(issued) == list(range(1, 11)), issued  # ten tickets, ten numbers, none twice
        wait_until("the daemon's rebuild", lambda: "rebuild of support@example.test" in d.daemon.log_text())

        answer = customer_mail(ALICE, "Re: Printer on fire", in_reply_to=str(first["Message-ID"]))
        d.stack.send(answer, mail_from=ALICE, rcpts=[SUPPORT])
        got = d.stack.wait_for(SUPPORT, "INBOX", 11)
        subjects = [str(m["Subject"]) for m in got]
        # Its number: Postfix may hand the first six mails to postroom in any order.
        mark = next(x for x in subjects if x.startswith("[") and x.endswith("] Printer on fire")).split("] ")[0] + "]"
        assert f"Re: {mark} Printer on fire" in subjects, (subjects, d.daemon.log_text())
        assert "Redis lost data for support@example.test" in d.daemon.log_text()
        r = d.redis_client()
        assert r.hget(f"postroom:{{{SUPPORT}}}:t:{alice}", "tags") == "vip"
        assert r.exists(f"postroom:{{{SUPPORT}}}:away:meier")  # still on holiday after the loss
        # The test's Redis keeps nothing on disk, which the daemon said when it started.
        assert "Redis runs without AOF persistence" in d.daemon.log_text()
