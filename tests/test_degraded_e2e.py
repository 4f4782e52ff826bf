"""A customer's mail delivered degraded while Redis is down gets its ticket once Redis is back: the customer's next
mail threads into it, and an agent's reply to it leaves rewritten from the shared address with the token."""

from __future__ import annotations

import time

import pytest

from postroom_testbed import ADAPTERS, Adapter, deploy
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.test_inbound_e2e import SUPPORT, customer_mail
from tests.test_outbound_e2e import agent_mail, received, submit

pytestmark = pytest.mark.e2e
ALICE = CUSTOMERS[0]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_mail_delivered_degraded_is_ticketed_when_redis_is_back(adapter: Adapter) -> None:
    with deploy(e2e_base_config(), CUSTOMERS, adapter=adapter) as d:
        d.stack.redis.stop()
        first = customer_mail(ALICE, "Printer on fire")
        d.stack.send(first, mail_from=ALICE, rcpts=[SUPPORT])
        got = d.stack.wait_for(SUPPORT, "INBOX", 1)
        assert got[0]["X-Postroom-Status"] == "degraded"
        d.stack.redis.start()  # back, and empty

        deadline = time.monotonic() + 60
        while "for the mail delivered degraded" not in d.daemon.log_text():
            assert time.monotonic() < deadline, d.daemon.log_text()
            time.sleep(0.2)

        # The degraded mail holds #1 now: a new conversation gets #2, and Alice's answer threads into #1.
        bob = customer_mail(CUSTOMERS[1], "Invoice wrong")
        d.stack.send(bob, mail_from=CUSTOMERS[1], rcpts=[SUPPORT])
        assert str(received(d, SUPPORT, bob)["Subject"]) == "[Support #2] Invoice wrong"
        again = customer_mail(ALICE, "Re: Printer on fire", in_reply_to=str(first["Message-ID"]))
        d.stack.send(again, mail_from=ALICE, rcpts=[SUPPORT])
        assert str(received(d, SUPPORT, again)["Subject"]) == "Re: [Support #1] Printer on fire"

        reply = agent_mail("meier@example.test", ALICE, "Re: Printer on fire", in_reply_to=str(first["Message-ID"]))
        submit(d, "meier", reply, [ALICE])
        out = received(d, ALICE, reply)
        assert "support@example.test" in str(out["From"]) and "[Support #1]" in str(out["Subject"])
        assert out["DKIM-Signature"] is not None
