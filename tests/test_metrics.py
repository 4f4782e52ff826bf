"""The metrics' labels, the Redis error counter, and /metrics when Redis and SQL are not there."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from postroom import metrics
from postroom.mime import STATUS_HEADER
from postroom.parts import Parts
from postroom.pipeline import Message, process
from postroom.replies import S451_TEMPORARY_FAILURE
from postroom.store.memory import MemoryStore
from postroom.verdict import AddHeader, Envelope, Verdict
from postroom_testbed import free_port

from .slafix import sla_config


def test_verdict_labels_tell_degraded_from_accepted_mail() -> None:
    assert metrics.verdict_label(Verdict.accept(AddHeader(STATUS_HEADER, "degraded"))) == "degraded"
    assert metrics.verdict_label(Verdict.accept(AddHeader("X-Postroom-Ticket", "1 (Support)"))) == "accept"
    assert metrics.verdict_label(Verdict.tempfail(S451_TEMPORARY_FAILURE)) == "tempfail"


def test_a_dead_redis_is_counted() -> None:
    store = MemoryStore()
    store.down = True
    before = metrics.REGISTRY.get_sample_value("postroom_redis_errors_total") or 0.0
    mail = Message(
        Envelope(mail_from="<a@customer.test>", rcpts=["<support@example.test>"], queue_id="Q9"),
        [("From", "a@customer.test"), ("Subject", "Hi"), ("Message-ID", "<m9@c>")],
    )
    out = process(mail, Parts(sla_config(), store), 0.0)
    assert metrics.verdict_label(out.verdict) == "degraded" and out.store_unavailable
    # Counted by the adapter from the outcome, in the process that serves /metrics (not in a milter worker).
    metrics.observe(False, metrics.verdict_label(out.verdict), 0.01, store_unavailable=out.store_unavailable)
    assert metrics.REGISTRY.get_sample_value("postroom_redis_errors_total") == before + 1
    store.down = False
    fine = process(mail, Parts(sla_config(), store), 0.0)
    metrics.observe(False, metrics.verdict_label(fine.verdict), 0.01, store_unavailable=fine.store_unavailable)
    assert metrics.REGISTRY.get_sample_value("postroom_redis_errors_total") == before + 1


def test_metrics_answer_without_redis_and_with_an_empty_history(tmp_path: Path) -> None:
    config = sla_config(
        redis={"url": f"redis://127.0.0.1:{free_port()}/0", "timeout_seconds": 0.5},
        database={"url": f"sqlite:///{tmp_path / 'h.sqlite3'}"},
    )
    listen = f"127.0.0.1:{free_port()}"
    stop = metrics.serve(config, listen, lambda: 7)
    try:
        with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        stop()
    names = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert names["postroom_history_queue_depth"] == 7
    # Redis is down: logged, no figures, and no error page.
    assert "postroom_open_tickets" not in names
    assert "postroom_sla_breached_tickets" not in names
