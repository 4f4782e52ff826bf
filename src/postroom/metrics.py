"""Prometheus metrics of the milter and the after-queue filter, served on ``[metrics]`` on a loopback address.

The adapters count every mail by path and verdict and time the pipeline; Redis errors are counted where the
pipeline meets them.  Open tickets (Redis) and tickets past a due time (the history) are read when Prometheus
scrapes, at most every ``_CACHE_SECONDS``, so a busy scraper costs Redis and SQL nothing more.

With ``[milter] workers`` >= 1 the pipeline runs in worker processes: mails, verdicts and latency are still
counted by the milter process, but ``postroom_redis_errors_total`` only counts what the milter process itself met.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from postroom.config import Config
from postroom.mime import STATUS_HEADER
from postroom.verdict import AddHeader, Verdict

log = logging.getLogger("postroom.metrics")

REGISTRY = CollectorRegistry()
MAILS = Counter(
    "postroom_mails", "Mails handled, by path (inbound/outbound) and verdict.", ["path", "verdict"], registry=REGISTRY
)
LATENCY = Histogram(
    "postroom_pipeline_seconds",
    "Time from end of message to verdict (the pipeline, Redis and rules included).",
    ["path"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
    registry=REGISTRY,
)
REDIS_ERRORS = Counter("postroom_redis_errors", "Mails that met an unreachable Redis.", registry=REGISTRY)
HISTORY_DEPTH = Gauge(
    "postroom_history_queue_depth", "Mail batches waiting to be written to the SQL history.", registry=REGISTRY
)
_CACHE_SECONDS = 30.0


def verdict_label(verdict: Verdict) -> str:
    """accept, reject, tempfail, discard, or degraded for mail delivered unmodified by the failure policy."""
    if any(isinstance(e, AddHeader) and e.name == STATUS_HEADER and e.value == "degraded" for e in verdict.edits):
        return "degraded"
    return verdict.action.value


def observe(outbound: bool, label: str, seconds: float) -> None:
    path = "outbound" if outbound else "inbound"
    MAILS.labels(path, label).inc()
    LATENCY.labels(path).observe(seconds)


class _Cached:
    def __init__(self, read: Callable[[], list[GaugeMetricFamily]]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._at = 0.0
        self._value: list[GaugeMetricFamily] = []

    def get(self) -> list[GaugeMetricFamily]:
        with self._lock:
            if time.monotonic() - self._at > _CACHE_SECONDS:
                self._value = self._read()
                self._at = time.monotonic()
            return self._value


class TicketCollector(Collector):
    """Open tickets by mailbox, state and owner (Redis) and tickets past a due time by mailbox (history)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._cache = _Cached(self._read)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._cache.get()

    def _read(self) -> list[GaugeMetricFamily]:
        return [*self._open(), *self._overdue()]

    def _open(self) -> Iterable[GaugeMetricFamily]:
        from postroom.admin.common import redis_store  # noqa: PLC0415  (admin imports the daemons' parts)
        from postroom.tickets import StoreUnavailable  # noqa: PLC0415

        family = GaugeMetricFamily(
            "postroom_open_tickets",
            "Tickets not closed, by mailbox, state and owner.",
            labels=["mailbox", "state", "owner"],
        )
        try:
            store = redis_store(self.config)
            tally = Tally(
                (box.tag, t.state, t.owner or "unassigned")
                for box in self.config.mailboxes.values()
                for t in store.tickets(box.address)
                if t.state != "closed"
            )
        except StoreUnavailable as exc:
            log.warning("metrics: Redis unavailable (%s): no open-ticket figures in this scrape", exc)
            return []
        for labels, count in sorted(tally.items()):
            family.add_metric(list(labels), count)
        return [family]

    def _overdue(self) -> Iterable[GaugeMetricFamily]:
        from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415  (the mail path loads no SQL driver)

        from postroom import sla, timeline  # noqa: PLC0415
        from postroom.history import make_engine  # noqa: PLC0415

        family = GaugeMetricFamily(
            "postroom_sla_breached_tickets",
            "Open tickets past a due time (SLA breach), by mailbox.",
            labels=["mailbox"],
        )
        now = dt.datetime.now(dt.UTC)
        clock = sla.Clock(self.config.hours)
        try:
            engine = make_engine(self.config.database.url)
            timelines = timeline.load(engine, open_only=True)
            engine.dispose()
        except SQLAlchemyError as exc:
            log.warning("metrics: history unavailable (%s): no SLA figures in this scrape", exc)
            return []
        for box in self.config.mailboxes.values():
            late = sum(
                1
                for t in timelines
                if t.mailbox == box.address and any(d.at <= now for d in sla.open_dues(self.config, box, t, clock))
            )
            family.add_metric([box.tag], late)
        return [family]


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def serve(config: Config, listen: str, history_depth: Callable[[], int] | None = None) -> Callable[[], None]:
    """Start /metrics on ``listen`` (HOST:PORT) in a thread; returns the function that stops it."""
    if not listen:
        return lambda: None
    if history_depth is not None:
        HISTORY_DEPTH.set_function(lambda: float(history_depth()))
    collector = TicketCollector(config)
    REGISTRY.register(collector)
    host, port = parse_listen(listen)
    server, thread = start_http_server(port, host, registry=REGISTRY)
    log.info("metrics on http://%s/metrics", listen)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)
        REGISTRY.unregister(collector)

    return stop
