"""Inbound through one Redis, a Sentinel-watched primary and a Redis Cluster, on one MX host and on two at once.

Usage: ``.venv/bin/python bench/ha.py [--messages N] [--sessions S] [--rounds R] [--configs single,sentinel,...]``

Configurations: ``single`` (one redis-server), ``sentinel`` (primary + replica + 3 sentinels, postroom connects
through ``redis+sentinel://``), ``cluster`` (3 primaries, ``redis+cluster://``), each with one MX host; and
``2mx-single``, ``2mx-sentinel``, ``2mx-cluster``: two MX hosts (a private Postfix and ``postroom milter`` each,
postroom_testbed.ha.MxHosts) sending at once, half the mails each, into one Dovecot, sharing the Redis and the
database.  Every run uses a fresh database on one private PostgreSQL (the production history), the shipped example
config, new-ticket mail of 2 KB from ``smtp-source`` (``--sessions`` per host) to support@example.test, and counts
as finished when every Postfix queue is empty and Dovecot holds every mail.  Each round runs every configuration
once, in turn; the table shows medians over the rounds with the range, and each configuration's ratio to
``single`` of the same run.

Milter CPU is utime + stime of the milter processes of all hosts (bench/runloop.py's /proc reading, settled after
the last delivery so the history writer counts), per mail; Redis CPU is that of the data nodes (sentinels not
counted).  Each run checks that the ticket counter equals the mails sent and that no mail went out degraded.
The whole stack shares this machine's CPUs: compare the configurations of one run, not absolute capacity.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from inbound import RECIPIENT, SENDER, smtp_source_command
from postroom import redis_connect
from postroom.config import example_config_path, load_config
from postroom_testbed import RedisServer
from postroom_testbed.ha import MxHosts, PostgresServer, RedisClusterSet, RedisNode, RedisSentinelSet
from runloop import BenchError, cpu_seconds, median, progress, settled_cpu_seconds, wait_quiet

CONFIGS = ("single", "sentinel", "cluster", "2mx-single", "2mx-sentinel", "2mx-cluster")
SIZE = 2048


@dataclass
class Run:
    config: str
    messages: int
    seconds: float
    milter_cpu: float
    redis_cpu: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def milter_ms(self) -> float:
        return self.milter_cpu * 1000 / self.messages

    @property
    def redis_ms(self) -> float:
        return self.redis_cpu * 1000 / self.messages


@dataclass
class Redises:
    single: RedisServer
    sentinel: RedisSentinelSet
    cluster: RedisClusterSet

    def url(self, mode: str) -> str:
        return {"single": self.single.url, "sentinel": self.sentinel.url, "cluster": self.cluster.url}[mode]

    def data_pids(self, mode: str) -> list[int]:
        nodes: list[RedisNode] = []
        if mode == "sentinel":
            nodes = [self.sentinel.primary, *self.sentinel.replicas]
        elif mode == "cluster":
            nodes = self.cluster.nodes
        pids = [n.pid for n in nodes] if nodes else [self.single.pid]
        return [p for p in pids if p is not None]

    def flush(self, mode: str) -> None:
        if mode == "cluster":
            self.cluster.flush()
        else:
            redis_connect.client_from_url(self.url(mode)).flushall()


@contextmanager
def services(root: Path) -> Iterator[tuple[Redises, PostgresServer]]:
    with ExitStack() as stack:
        single = RedisServer(root / "single")
        single.start()
        stack.callback(single.stop)
        sentinel = stack.enter_context(RedisSentinelSet(root / "sentinel").start())
        cluster = stack.enter_context(RedisClusterSet(root / "cluster").start())
        postgres = PostgresServer().start()
        stack.callback(postgres.remove)
        yield Redises(single, sentinel, cluster), postgres


def delivered(mx: MxHosts) -> int:
    folder = mx.hosts[0].stack.dovecot.mail_dir / RECIPIENT / "Maildir" / "new"
    return len(list(folder.iterdir())) if folder.exists() else 0


def send(mx: MxHosts, per_host: int, sessions: int, expect_total: int, timeout: float) -> float:
    """smtp-source into every host at once; seconds until all is delivered and every queue is empty."""
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            smtp_source_command(h.stack.postfix.smtp_port, per_host, sessions, SIZE),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for h in mx.hosts
    ]
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.05)
        if any(p.returncode != 0 for p in procs):
            raise BenchError(f"smtp-source failed: {[p.returncode for p in procs]}")
        while delivered(mx) < expect_total or not all(h.stack.postfix.queue_empty() for h in mx.hosts):
            if time.monotonic() - start > timeout:
                raise BenchError(f"{delivered(mx)}/{expect_total} delivered after {timeout:.0f}s")
            time.sleep(0.01)
        return time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def run_one(config: str, redises: Redises, postgres: PostgresServer, messages: int, sessions: int) -> Run:
    hosts, _, mode = config.rpartition("-")
    count = 2 if hosts == "2mx" else 1
    redises.flush(mode)
    base = load_config(example_config_path(), environ={})
    warmup = 50 * count
    url = redises.url(mode)
    with MxHosts(base, redis_url=url, database_url=postgres.create_database(), hosts=count, customers=[SENDER],
                 milter_default_action="tempfail") as mx:  # fmt: skip
        send(mx, warmup // count, sessions, warmup, timeout=120)
        wait_quiet()
        pids = [h.daemon.pid for h in mx.hosts if h.daemon.pid is not None]
        milter_before = sum(settled_cpu_seconds(p) for p in pids)
        redis_before = sum(cpu_seconds(p) for p in redises.data_pids(mode))
        seconds = send(mx, messages // count, sessions, warmup + messages, timeout=120 + messages * 0.2)
        milter = sum(settled_cpu_seconds(p) for p in pids) - milter_before
        redis_cpu = sum(cpu_seconds(p) for p in redises.data_pids(mode)) - redis_before
        seq = redis_connect.client_from_url(url).get(f"{base.redis.key_prefix}:{{{RECIPIENT}}}:seq")
        if int(str(seq or 0)) != warmup + messages:
            raise BenchError(f"{config}: ticket counter {seq!r}, expected {warmup + messages} (degraded mail?)")
    return Run(config, messages, seconds, milter, redis_cpu)


def report(results: dict[str, list[Run]]) -> None:
    base = median([r.rate for r in results["single"]]) if "single" in results else None
    print(
        f"\n{'configuration':<14} {'mails/s':>18} {'vs single':>9} {'milter CPU ms/mail':>20} {'Redis CPU ms/mail':>18}"
    )
    for config, runs in results.items():
        rates = [r.rate for r in runs]
        cpu = [r.milter_ms for r in runs]
        ratio = f"{median(rates) / base:.2f}" if base else "-"
        print(
            f"{config:<14} {median(rates):>7.1f} ({min(rates):.0f}-{max(rates):.0f}) {ratio:>9} "
            f"{median(cpu):>9.2f} ({min(cpu):.2f}-{max(cpu):.2f}) {median([r.redis_ms for r in runs]):>18.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=5, help="SMTP sessions per host")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    print(f"bench/ha.py: {args.messages} new-ticket mails of {SIZE} B per run, {args.sessions} sessions per host, "
          f"{args.rounds} rounds; Python {sys.version.split()[0]}")  # fmt: skip
    results: dict[str, list[Run]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="postroom-ha-") as root, services(Path(root)) as (redises, postgres):
        for round_no in range(1, args.rounds + 1):
            for config in configs:
                run = run_one(config, redises, postgres, args.messages, args.sessions)
                results[config].append(run)
                progress(f"round {round_no} {config}: {run.rate:.1f} mails/s, milter {run.milter_ms:.2f} ms/mail")
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
