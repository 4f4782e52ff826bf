"""Restore Redis from the SQL history: ``postroom admin rebuild``, and what the daemon runs after a detected loss.

For each mailbox: the counter raised to the highest number in the history, each ticket's hash (owner, state,
priority, tags, customer, subject, times, link), its participants (the customer and every sender of an inbound mail),
and the Message-ID index (every message row's id -> its ticket); and who is away (an agent whose last ``away``
or ``back`` event, recorded on the ticket of the mail that said it, is ``away``, in every rebuilt mailbox, until
the time it named).  Only what is missing is written (a hash that exists, an index entry that exists, an away flag
that exists, stay as they are): Redis is newer than the history wherever it has data, so the rebuild is safe to
run while mail flows, and to run twice.

Not in the history, so not restored: the round-robin turn, open counts and auto-reply caps (they start again).
Tickets last written before the history kept tags (schema 0003) come back without them.
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TypeVar

import redis
from redis.cluster import RedisCluster
from sqlalchemy import RowMapping, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from postroom.config import Config
from postroom.epoch import RAISE, Floor, HistoryUnavailable
from postroom.history import EVENTS, MESSAGES, TICKETS
from postroom.redis_connect import node_for
from postroom.store.keyspace import away_key, epoch_key, key_base, owned_indexed_key

log = logging.getLogger("postroom")

_CHUNK = 500
_T = TypeVar("_T")


@dataclass
class Rebuilt:
    mailbox: str
    tickets: int = 0  # hashes written (missing before)
    message_ids: int = 0  # index entries written
    highest: int = 0  # the counter is at least this now
    away: int = 0  # away flags written


def scope(config: Config) -> tuple[str, list[str], int]:
    """What a rebuild of ``config``'s Redis covers, as :func:`rebuild` takes it after the client: the key prefix,
    every mailbox's address and the Message-ID index's lifetime in seconds."""
    mailboxes = [box.address for box in config.mailboxes.values()]
    return config.redis.key_prefix, mailboxes, config.redis.message_index_days * 86400


def rebuild(
    engine: Engine, client: redis.Redis | RedisCluster, prefix: str, mailboxes: Iterable[str], ttl_seconds: int
) -> list[Rebuilt]:
    """Restore every mailbox's Redis state from the history; see the module docstring."""
    done = [_mailbox(engine, client, prefix, box, ttl_seconds) for box in mailboxes]
    absent = away_from_history(engine, time.time())
    for rebuilt in done:
        rebuilt.away = _restore_away(client, prefix, rebuilt.mailbox, absent)
    return done


def away_from_history(engine: Engine, now: float) -> dict[str, float | None]:
    """Agents whose last #away/#back in the history is #away and not over by ``now``: login -> until (None: until
    #back)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(EVENTS.c.actor, EVENTS.c.kind, EVENTS.c.detail)
            .where(EVENTS.c.kind.in_(("away", "back")))
            .order_by(EVENTS.c.at, EVENTS.c.id)
        ).all()
    last: dict[str, tuple[str, str]] = {}
    for actor, kind, detail in rows:
        last[actor] = (kind, detail)
    absent: dict[str, float | None] = {}
    for login, (kind, detail) in last.items():
        if kind != "away":
            continue
        try:
            until = calendar.timegm(time.strptime(detail, "until %Y-%m-%d %H:%M UTC")) if detail else None
        except ValueError:
            until = None  # a detail this version did not write: away until #back, the safe side
        if until is None or until > now:
            absent[login] = None if until is None else float(until)
    return absent


def _restore_away(
    cluster: redis.Redis | RedisCluster, prefix: str, mailbox: str, absent: dict[str, float | None]
) -> int:
    written = 0
    for login, until in absent.items():
        key = away_key(prefix, mailbox, login)
        client = node_for(cluster, key)
        if until is None:
            written += bool(client.set(key, "", nx=True))
        else:
            written += bool(client.set(key, repr(until), exat=int(until), nx=True))
    return written


def _mailbox(engine: Engine, cluster: redis.Redis | RedisCluster, prefix: str, mailbox: str, ttl: int) -> Rebuilt:
    base = key_base(prefix, mailbox)
    client = node_for(cluster, f"{base}seq")  # every key of a mailbox is in its slot, so on its node
    done = Rebuilt(mailbox)
    with engine.connect() as conn:
        tickets = conn.execute(select(TICKETS).where(TICKETS.c.mailbox == mailbox)).mappings().all()
        by_id = {t["id"]: t["number"] for t in tickets}
        messages = conn.execute(
            select(MESSAGES.c.ticket_id, MESSAGES.c.message_id, MESSAGES.c.from_addr, MESSAGES.c.direction).where(
                MESSAGES.c.ticket_id.in_(select(TICKETS.c.id).where(TICKETS.c.mailbox == mailbox))
            )
        ).all()
    senders: dict[int, set[str]] = {}
    for ticket_id, _mid, sender, direction in messages:
        if direction == "inbound" and sender:
            senders.setdefault(by_id[ticket_id], set()).add(sender.lower())
    for ticket_chunk in _chunks(list(tickets)):
        chunk = ticket_chunk
        pipe = client.pipeline(transaction=False)
        for t in chunk:
            pipe.exists(f"{base}t:{t['number']}")
        missing = [t for t, there in zip(chunk, pipe.execute(), strict=True) if not there]
        pipe = client.pipeline(transaction=False)
        for t in missing:
            pipe.hset(f"{base}t:{t['number']}", items=[x for pair in _fields(t).items() for x in pair])
            people = {t["customer"].lower(), *senders.get(t["number"], set())} - {""}
            if people:
                pipe.sadd(f"{base}p:{t['number']}", *people)
        pipe.execute()
        done.tickets += len(missing)
    if done.tickets:
        # Owners of the restored hashes are not in the owner index yet: the next read walks the tickets again.
        client.delete(owned_indexed_key(prefix, mailbox))
    index: list[tuple[str, int]] = [(mid, by_id[tid]) for tid, mid, _s, _d in messages if mid]
    for id_chunk in _chunks(index):
        pipe = client.pipeline(transaction=False)
        for mid, number in id_chunk:
            pipe.set(f"{base}m:{mid}", number, ex=ttl, nx=True)
        done.message_ids += sum(1 for ok in pipe.execute() if ok)
    done.highest = max((t["number"] for t in tickets), default=0)
    client.register_script(RAISE)(keys=[f"{base}seq", epoch_key(prefix, mailbox)], args=[done.highest, "rebuilt"])
    return done


def _fields(row: RowMapping) -> dict[str, str]:
    created, updated = row["created_at"].timestamp(), row["updated_at"].timestamp()
    return {
        "owner": row["owner"],
        "state": row["state"],
        "priority": row["priority"],
        "tags": row["tags"],
        "customer": row["customer"],
        "subject": row["subject"],
        "created": repr(created),
        "updated": repr(updated),
        "linked": str(row["linked"]),
        "owned_since": repr(updated) if row["owner"] else "",
    }


def _chunks(items: Sequence[_T]) -> Iterable[Sequence[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def history_floor(engine: Engine, timeout: float = 5.0) -> Floor:
    """The highest ticket number the history knows for a mailbox: what a counter must never fall below.

    Asked on the mail path (once per mailbox after Redis restarted), so it gives up after ``timeout`` seconds: a
    frozen database holds a query forever, and a mail must not wait for it.
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postroom-floor")

    def query(mailbox: str) -> int:
        with engine.connect() as conn:
            found = conn.execute(select(func.max(TICKETS.c.number)).where(TICKETS.c.mailbox == mailbox))
            return int(found.scalar() or 0)

    def floor(mailbox: str) -> int:
        try:
            return pool.submit(query, mailbox).result(timeout)
        except FutureTimeout:
            raise HistoryUnavailable(f"the database did not answer within {timeout:g} s") from None
        except SQLAlchemyError as exc:
            raise HistoryUnavailable(str(exc).splitlines()[0]) from exc

    return floor


class BackgroundRebuild:
    """Runs :func:`rebuild` on a thread after a detected loss, one at a time; mail keeps flowing meanwhile."""

    def __init__(
        self, engine: Engine, client: redis.Redis | RedisCluster, prefix: str, mailboxes: Sequence[str], ttl: int
    ) -> None:
        self._args = (engine, client, prefix, mailboxes, ttl)
        self._lock = threading.Lock()
        self._running: threading.Thread | None = None
        self._again = False

    def request(self, mailbox: str = "") -> None:
        with self._lock:
            if self._running is not None and self._running.is_alive():
                self._again = True  # another loss during the run: once more after it
                return
            self._running = threading.Thread(target=self._run, name="postroom-rebuild", daemon=True)
            self._running.start()

    def wait(self, timeout: float) -> None:
        thread = self._running
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                for r in rebuild(*self._args):
                    log.warning(
                        "rebuild of %s from the history: %d tickets, %d Message-IDs, %d away flags restored "
                        "(highest #%d)",
                        r.mailbox,
                        r.tickets,
                        r.message_ids,
                        r.away,
                        r.highest,
                    )
            except Exception:
                log.exception("rebuild from the history failed; run postroom admin rebuild once Redis and SQL work")
            with self._lock:
                if not self._again:
                    return
                self._again = False
