"""SIGHUP reloads the config and rules without dropping a connection; a broken file keeps the running ones.

With [milter] workers = 1 the pipeline runs in a worker process, so a reload has to reach the worker: the mail after
it must show the new config, on a new connection and on one that stayed open (tested in both modes).
"""

from __future__ import annotations

import os
import signal
import smtplib
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from postroom.config import to_toml, with_changes
from postroom.history import make_engine
from postroom.history_rows import MessageRow
from postroom_testbed import MILTER_ADAPTERS, Adapter, Deployment, MilterDaemon, deploy
from tests.conftest import CUSTOMERS, e2e_base_config
from tests.test_inbound_e2e import SUPPORT, customer_mail

pytestmark = pytest.mark.e2e


@pytest.fixture(params=MILTER_ADAPTERS)
def milter_deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    with deploy(e2e_base_config(), CUSTOMERS, adapter=request.param) as d:
        yield d


def wait_log(d: Deployment, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in d.daemon.log_text():
        assert time.monotonic() < deadline, f"{text!r} not in the milter log:\n{d.daemon.log_text()}"
        time.sleep(0.05)


def subjects(d: Deployment) -> list[str]:
    return [str(m["Subject"]) for m in d.stack.fetch(SUPPORT)]


@pytest.mark.parametrize("adapter", MILTER_ADAPTERS)
@pytest.mark.parametrize("workers", [1, 0], ids=["worker-process", "in-process"])
def test_sighup_applies_to_the_next_mail_and_keeps_open_connections(workers: int, adapter: Adapter) -> None:
    base = with_changes(e2e_base_config(), {"milter": {"workers": workers}})
    with deploy(base, CUSTOMERS, adapter=adapter) as d:
        sighup_then_mail(d)


def sighup_then_mail(d: Deployment) -> None:
    assert isinstance(d.daemon, MilterDaemon) and d.daemon.pid is not None
    box = d.config.mailboxes["support"].model_dump()
    renamed = with_changes(d.config, {"mailboxes": {"support": {**box, "tag": "Help"}}})
    with smtplib.SMTP("127.0.0.1", d.stack.postfix.smtp_port) as open_session:
        open_session.sendmail("alice@customer.test", [SUPPORT], customer_mail("alice@customer.test", "One").as_bytes())
        d.stack.wait_for(SUPPORT, "INBOX", 1)
        d.daemon.config_path.write_text(to_toml(renamed))
        os.kill(d.daemon.pid, signal.SIGHUP)
        wait_log(d, "SIGHUP: reloaded")
        if d.config.milter.workers:
            wait_log(d, "worker: reloaded")
        # The session that was open was not dropped; its next mail has the new config.
        open_session.sendmail("alice@customer.test", [SUPPORT], customer_mail("alice@customer.test", "Two").as_bytes())
        d.stack.wait_for(SUPPORT, "INBOX", 2)
    d.stack.send(customer_mail("bob@customer.test", "Three"), mail_from="bob@customer.test", rcpts=[SUPPORT])
    d.stack.wait_for(SUPPORT, "INBOX", 3)
    assert subjects(d) == ["[Support #1] One", "[Help #2] Two", "[Help #3] Three"]
    assert d.daemon.is_running()


def test_broken_config_on_sighup_keeps_the_running_one(milter_deployment: Deployment) -> None:
    d = milter_deployment
    assert isinstance(d.daemon, MilterDaemon) and d.daemon.pid is not None
    d.daemon.config_path.write_text(d.daemon.config_path.read_text() + "\n[milter]\nsokcet = 'oops'\n")
    os.kill(d.daemon.pid, signal.SIGHUP)
    wait_log(d, "reload of")
    assert "keeping the running config and rules" in d.daemon.log_text()
    d.stack.send(customer_mail("bob@customer.test", "Still fine"), mail_from="bob@customer.test", rcpts=[SUPPORT])
    d.stack.wait_for(SUPPORT, "INBOX", 1)
    assert subjects(d) == ["[Support #1] Still fine"]
    assert d.daemon.is_running()


def test_sigterm_stops_cleanly_and_flushes_history(milter_deployment: Deployment) -> None:
    d = milter_deployment
    d.stack.send(customer_mail("bob@customer.test", "Last one"), mail_from="bob@customer.test", rcpts=[SUPPORT])
    d.stack.wait_for(SUPPORT, "INBOX", 1)
    d.daemon.stop()
    log = d.daemon.log_text()
    assert "SIGTERM: stopping" in log and "postroom milter stopped" in log
    assert "Traceback" not in log
    # The last mail's history row is in SQL, not only promised by a log line.
    engine = make_engine(d.config.database.url)
    with Session(engine) as s:
        assert s.scalars(select(MessageRow.subject)).all() == ["Last one"]
    engine.dispose()
