"""Reliability: what survives a fault while mail flows, one row per fault, a no-fault run as the baseline.

Usage: ``.venv/bin/python bench/reliability.py [--messages N] [--rate R] [--fault-seconds S] [--scenarios a,b]``
(as root; a few minutes with the defaults).

Every scenario starts a fresh private stack (Postfix, Dovecot, Redis, ``postroom milter`` with ``workers = 0``)
with its history in a private PostgreSQL cluster, sends ``--messages`` new customer mails (each its own
conversation, from 20 senders) at ``--rate`` per second over SMTP, breaks one part for ``--fault-seconds`` a third
of the way in, repairs it, runs ``postroom sweep`` once (as its systemd timer does every minute), and then waits
up to 60 s for postroom to catch up.  Faults:

- ``none``: the baseline;
- ``redis-kill``: Redis SIGKILLed and restarted without persistence (comes back empty);
- ``redis-kill-aof``: the same with ``appendonly yes`` / ``appendfsync everysec`` (comes back with its AOF);
- ``redis-freeze``: Redis SIGSTOPped (postroom's calls time out), then SIGCONTed;
- ``pg-stop`` / ``pg-freeze``: PostgreSQL stopped (``pg_ctl -m fast``) or SIGSTOPped, then started/continued;
- ``milter-kill``: the milter SIGKILLed and started again (Postfix delivers unmodified meanwhile:
  ``milter_default_action = accept``).

Columns: sent (Postfix said 250), delivered (mails in the shared mailbox), once (distinct mails delivered exactly
once), degraded (delivered with ``X-Postroom-Status: degraded``, from the daemon's log), ticketed (mails whose
Message-ID Redis's index maps to a ticket at the end: ticketed at once, later by postroom's backlog, or by the
sweep), twice (ticket numbers given to more than one mail, from the subjects' tokens and the history's ``opened``
events), rows lost (sent mails without a message row in the SQL history at the end).  The daemon sweeps by
itself once Redis is back (its backlog has ticketed the degraded mails); the explicit run stands for the timer,
and catches mail that bypassed the milter.
Target: sent = delivered = once, ticketed = sent, twice = 0, rows lost = 0.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid

import redis
from sqlalchemy import create_engine, func, select

from postroom.config import example_config_path, load_config, to_toml, with_changes
from postroom.history_rows import EventRow, MessageRow
from postroom_testbed import Deployment, PostgresServer, postgres_server
from postroom_testbed.imap import deploy_team

SUPPORT = "support@example.test"
SENDERS = [f"customer{i}@customer.test" for i in range(20)]
SCENARIOS = ("none", "redis-kill", "redis-kill-aof", "redis-freeze", "pg-stop", "pg-freeze", "milter-kill")


@dataclass
class Row:
    scenario: str
    sent: int = 0
    delivered: int = 0
    once: int = 0
    degraded: int = 0
    ticketed: int = 0
    twice: int = 0
    rows_lost: int = 0
    seconds: float = 0.0


def mail(i: int) -> EmailMessage:
    msg = EmailMessage()
    sender = SENDERS[i % len(SENDERS)]
    msg["From"] = sender
    msg["To"] = SUPPORT
    msg["Subject"] = f"R{i:05d} question"
    msg["Message-ID"] = make_msgid(idstring=f"r{i}", domain="customer.test")
    msg.set_content("Hello, please help.\n")
    return msg


@contextmanager
def fault(name: str, d: Deployment, pg: PostgresServer, seconds: float) -> Iterator[Callable[[], None]]:
    """Yields the function that breaks the part; the part is repaired after ``seconds`` on a timer."""
    rs = d.stack.redis

    def brk() -> None:
        if name in ("redis-kill", "redis-kill-aof"):
            rs.kill()
            threading.Timer(seconds, rs.start).start()
        elif name == "redis-freeze":
            assert rs.pid is not None
            os.kill(rs.pid, signal.SIGSTOP)
            threading.Timer(seconds, os.kill, (rs.pid, signal.SIGCONT)).start()
        elif name == "pg-stop":
            pg.stop("fast")
            threading.Timer(seconds, pg.start).start()
        elif name == "pg-freeze":
            pg.freeze()
            threading.Timer(seconds, pg.thaw).start()
        elif name == "milter-kill":
            assert d.daemon.pid is not None
            os.killpg(d.daemon.pid, signal.SIGKILL)
            threading.Timer(seconds, restart_daemon, (d,)).start()

    yield brk


def restart_daemon(d: Deployment) -> None:
    d.daemon.stop()
    d.daemon.start()


def send_all(d: Deployment, count: int, rate: float, at_third: Callable[[], None]) -> tuple[list[EmailMessage], int]:
    mails = [mail(i) for i in range(count)]
    accepted = [False] * count
    start = time.monotonic()
    lock = threading.Lock()
    next_i = [0]

    def worker() -> None:
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= count:
                return
            if i == count // 3:
                at_third()
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for _ in range(3):  # a 4xx (tempfail) is retried as a client would
                try:
                    d.stack.send(mails[i], mail_from=str(mails[i]["From"]), rcpts=[SUPPORT])
                    accepted[i] = True
                    break
                except Exception:  # noqa: BLE001 - counted as not sent
                    time.sleep(1.0)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return mails, sum(accepted)


def run_sweep(d: Deployment, pg: PostgresServer) -> None:
    """``postroom sweep`` once, as systemd/postroom-sweep.timer runs it every minute."""
    # It logs in as the [imap] master user that deploy_team's Dovecot has (what dovecot-snippet writes).
    database = {"url": pg.url, "spool_dir": str(d.daemon.workdir / "spool")}
    path = d.daemon.workdir / "sweep.toml"
    path.write_text(to_toml(with_changes(d.config, {"database": database})))
    subprocess.run([sys.executable, "-m", "postroom", "sweep", "--config", str(path)], capture_output=True, check=False)


def measure(row: Row, d: Deployment, pg: PostgresServer, mails: list[EmailMessage]) -> None:
    d.stack.postfix.wait_queue_empty(timeout=120)
    # From the daemon's log: the mails in the mailbox lose their degraded mark when the daemon's own sweep after
    # the recovery replaces them, which may be done by now.
    row.degraded = d.daemon.log_text().count("accept: degraded delivery")
    time.sleep(5)  # the backlog's first round after recovery, before the sweep looks
    run_sweep(d, pg)
    ids = {str(m["Message-ID"]).strip("<>") for m in mails}
    client = redis.Redis.from_url(d.stack.redis.url, decode_responses=True)
    engine = create_engine(pg.url)
    deadline = time.monotonic() + 60
    while True:
        index = [f"postroom:{{{SUPPORT}}}:m:{mid}" for mid in sorted(ids)]
        try:
            ticketed = sum(1 for v in client.mget(index) if v)
            with engine.connect() as conn:
                rows = {m for (m,) in conn.execute(select(MessageRow.message_id))}
        except Exception:  # noqa: BLE001 - still recovering
            ticketed, rows = 0, set()
        if (ticketed == len(ids) and ids <= rows) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    got = d.stack.fetch(SUPPORT)
    names = Counter(re.sub(r"^.*?(R\d{5}).*$", r"\1", str(m["Subject"])) for m in got)
    tokens: dict[int, set[str]] = {}
    for m in got:
        found = re.search(r"#(\d+)\]", str(m["Subject"]))
        if found:
            tokens.setdefault(int(found.group(1)), set()).add(str(m["Message-ID"]))
    with engine.connect() as conn:
        opened = conn.execute(
            select(func.count()).select_from(
                select(EventRow.ticket_id)
                .where(EventRow.kind == "opened")
                .group_by(EventRow.ticket_id)
                .having(func.count() > 1)
                .subquery()
            )
        ).scalar_one()
    engine.dispose()
    row.delivered = len(got)
    row.once = sum(1 for n in names.values() if n == 1)
    row.ticketed = ticketed
    row.twice = max(sum(1 for mids in tokens.values() if len(mids) > 1), int(opened))
    row.rows_lost = len(ids - rows)


def run(name: str, count: int, rate: float, seconds: float, engine: str = "libmilter") -> Row:
    row = Row(name)
    started = time.monotonic()
    base = load_config(example_config_path(), environ={})
    passwords = {agent: f"{agent}-pw" for agent in base.agents}
    with postgres_server() as pg, deploy_team(base, passwords) as team:
        d = team.deployment
        database = {"url": pg.url, "spool_dir": str(d.daemon.workdir / "spool")}
        d.daemon.stop()
        d.daemon.reconfigure(to_toml(with_changes(d.config, {"database": database, "milter": {"engine": engine}})))
        d.daemon.start()
        if name == "redis-kill-aof":
            redis.Redis.from_url(d.stack.redis.url).config_set("appendonly", "yes")
            d.stack.redis.appendonly = True
            time.sleep(1.0)  # the first AOF rewrite
        with fault(name, d, pg, seconds) as brk:
            mails, row.sent = send_all(d, count, rate, brk if name != "none" else lambda: None)
        time.sleep(seconds + 1)
        measure(row, d, pg, mails)
    row.seconds = time.monotonic() - started
    return row


def _stop(signum: int, frame: object) -> None:
    # Killed with SIGTERM, Python would skip the with-blocks and leave the stack and the PostgreSQL cluster running.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--fault-seconds", type=float, default=5.0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument(
        "--engine", choices=("libmilter", "asyncio"), default="libmilter", help="[milter] engine of the milter"
    )
    args = parser.parse_args(argv)
    names = [s for s in args.scenarios.split(",") if s]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    print(
        f"{args.messages} mails at {args.rate:g}/s per scenario, fault {args.fault_seconds:g} s a third of the way in, "
        f"milter engine {args.engine}"
    )
    head = (
        f"{'scenario':<16}{'sent':>6}{'deliv.':>8}{'once':>6}{'degr.':>7}{'ticketed':>10}{'twice':>7}{'rows lost':>11}"
    )
    print(head + f"{'s':>6}")
    for name in names:
        r = run(name, args.messages, args.rate, args.fault_seconds, args.engine)
        print(
            f"{r.scenario:<16}{r.sent:>6}{r.delivered:>8}{r.once:>6}{r.degraded:>7}{r.ticketed:>10}{r.twice:>7}"
            f"{r.rows_lost:>11}{r.seconds:>6.0f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
