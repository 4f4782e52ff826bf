"""Two MX hosts sharing one team inbox: a private Postfix and postroom milter each, one Dovecot behind both, one
Redis (Sentinel-watched primary or a 3-primary Cluster) and one private PostgreSQL between them."""

from __future__ import annotations

import smtplib
import threading
from collections.abc import Iterator

import pytest

from postroom_testbed.ha import MxHosts, PostgresServer
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.test_commands_e2e import ticket
from tests.test_inbound_e2e import SUPPORT, customer_mail, deliver, queue_id, ticket_number
from tests.test_outbound_e2e import ALICE, BOB, _text, agent_mail, received, submit

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=["sentinel", "cluster"])
def mx(request: pytest.FixtureRequest, postgres_server: PostgresServer) -> Iterator[MxHosts]:
    servers = request.getfixturevalue(f"{request.param}_set")
    if request.param == "cluster":
        servers.flush()
    else:
        servers.primary.client().flushall()
    database = postgres_server.create_database()
    with MxHosts(e2e_base_config(), redis_url=servers.url, database_url=database, customers=CUSTOMERS) as hosts:
        yield hosts


def test_ticket_numbers_are_unique_across_both_hosts(mx: MxHosts) -> None:
    a, b = mx.hosts
    mails = [customer_mail(CUSTOMERS[i % 3], f"Order {i}") for i in range(20)]
    errors: list[BaseException] = []

    def send(host_index: int) -> None:
        host = mx.hosts[host_index]
        try:
            for msg in mails[host_index::2]:
                host.stack.send(msg, mail_from=CUSTOMERS[0], rcpts=[SUPPORT])
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = {str(m["Message-ID"]) for m in mails}
    inbox = a.stack.wait_for(SUPPORT, "INBOX", 20)
    ours = [m for m in inbox if str(m["Message-ID"]) in ids]
    assert len(ours) == 20
    numbers = [ticket_number(m) for m in ours]
    assert len(set(numbers)) == 20, sorted(numbers)
    # Both hosts did their share: each Postfix logged its ten.
    for host, sent in ((a, mails[0::2]), (b, mails[1::2])):
        assert all(queue_id(host, str(m["Message-ID"])) for m in sent)


def test_a_reply_at_host_b_threads_into_the_ticket_opened_at_host_a(mx: MxHosts) -> None:
    a, b = mx.hosts
    first = customer_mail(ALICE, "Router broken")
    n = ticket_number(deliver(a, first))
    follow_up = customer_mail(ALICE, "Re: Router broken", in_reply_to=str(first["Message-ID"]))
    got = deliver(b, follow_up)
    assert ticket_number(got) == n
    assert got["Subject"] == f"Re: [Support #{n}] Router broken"
    assert queue_id(b, str(follow_up["Message-ID"]))


def test_a_rival_reply_through_host_b_is_refused_when_host_a_took_the_ticket(mx: MxHosts) -> None:
    a, b = mx.hosts
    first = customer_mail(BOB, "Invoice")
    n = ticket_number(deliver(a, first))
    mine = agent_mail("meier@example.test", BOB, "Re: Invoice", in_reply_to=str(first["Message-ID"]))
    submit(a, "meier", mine, [BOB])
    assert ticket(a, n)["owner"] == "meier"
    rival = agent_mail("mueller@example.test", BOB, "Re: Invoice", in_reply_to=str(first["Message-ID"]))
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(b, "mueller", rival, [BOB])
    assert refused.value.smtp_code == 550
    assert "Meier" in _text(refused.value)
    received(a, BOB, mine)
    assert ticket(b, n)["owner"] == "meier"


def test_away_set_through_one_host_holds_on_the_other(mx: MxHosts) -> None:
    a, b = mx.hosts
    first = customer_mail(BOB, "Holiday plans")
    n = ticket_number(deliver(a, first))
    answer = agent_mail("schulze@example.test", BOB, "Re: Holiday plans", in_reply_to=str(first["Message-ID"]))
    submit(a, "schulze", answer, [BOB])
    assert ticket(a, n)["owner"] == "schulze"
    away = agent_mail("schulze@example.test", SUPPORT, "Away", body="#away until 2099-01-31\n")
    submit(b, "schulze", away, [SUPPORT])
    received(b, SUPPORT, away, folder="Schulze")
    assert ticket(a, n)["owner"] == ""
    # The customer's next mail reaches host A, which reads the same absence: the team inbox, not Schulze's folder.
    later = deliver(a, customer_mail(BOB, "Re: Holiday plans", in_reply_to=str(first["Message-ID"])))
    assert ticket_number(later) == n
    submit(a, "schulze", agent_mail("schulze@example.test", SUPPORT, "Back", body="#back\n"), [SUPPORT])
    assert not b.redis_client().exists(f"postroom:{{{SUPPORT}}}:away:schulze")
