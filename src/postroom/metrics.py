"""Prometheus metrics of the milter and the after-queue filter, served on ``[metrics]`` on a loopback address.

The adapters count every mail by path and verdict, time the pipeline, and count the mails for which the pipeline
found Redis unreachable (from its outcome, so with ``[milter] workers`` >= 1 the milter process counts what its
workers met).  Open tickets are read from Redis when Prometheus scrapes, at most every ``_CACHE_SECONDS``,
so a busy scraper costs Redis nothing more.  Tickets past a due time are what the last ``postroom remind`` run
counted and left in Redis: working them out from the history here would cost the daemon's mail threads CPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from postroom.store.redis import RedisStore

from postroom import redis_connect
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


def observe(outbound: bool, label: str, seconds: float, *, store_unavailable: bool = False) -> None:
    path = "outbound" if outbound else "inbound"
    MAILS.labels(path, label).inc()
    LATENCY.labels(path).observe(seconds)
    if store_unavailable:
        REDIS_ERRORS.inc()


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

    def __init__(self, config: Config, store: RedisStore | None = None) -> None:
        self.config = config
        self._cache = _Cached(self._read)
        self._store = store

    def store(self) -> RedisStore:
        """The daemon's own store (one pool per process), or one made at the first scrape where there is none
        (the milter process with workers)."""
        if self._store is None:
            from postroom.admin.common import redis_store  # noqa: PLC0415  (admin imports the daemons' parts)

            self._store = redis_store(self.config)
        return self._store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._cache.get()

    def _read(self) -> list[GaugeMetricFamily]:
        return [*self._open(), *self._overdue()]

    def _open(self) -> Iterable[GaugeMetricFamily]:
        from postroom.tickets import StoreUnavailable  # noqa: PLC0415

        family = GaugeMetricFamily(
            "postroom_open_tickets",
            "Tickets not closed, by mailbox, state and owner.",
            labels=["mailbox", "state", "owner"],
        )
        try:
            store = self.store()
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
        import redis  # noqa: PLC0415

        from postroom.remind import breached_key  # noqa: PLC0415

        family = GaugeMetricFamily(
            "postroom_sla_breached_tickets",
            "Open tickets past a due time (SLA breach), by mailbox, as the last postroom remind run counted them.",
            labels=["mailbox"],
        )
        prefix = self.config.redis.key_prefix
        try:
            for box in self.config.mailboxes.values():
                count = self.store().client.get(breached_key(prefix, box.address))
                if count is not None:
                    family.add_metric([box.tag], float(count))
        except redis.RedisError as exc:
            log.warning("metrics: Redis unavailable (%s): no SLA figures in this scrape", redis_connect.reason(exc))
            return []
        return [family]


def parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def serve(
    config: Config,
    listen: str,
    history_depth: Callable[[], int] | None = None,
    store: RedisStore | None = None,
) -> Callable[[], None]:
    """Start /metrics on ``listen`` (HOST:PORT) in a thread; returns the function that stops it."""
    if not listen:
        return lambda: None
    if history_depth is not None:
        HISTORY_DEPTH.set_function(lambda: float(history_depth()))
    collector = TicketCollector(config, store)
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
