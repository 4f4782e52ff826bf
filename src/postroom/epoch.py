"""Noticing that Redis lost data, and never issuing a ticket number twice because of it.

Redis restarted without its data (no persistence, an RDB snapshot from minutes ago, a new empty server) still
answers, with counters that start again below numbers customers already have.  Three checks catch it before the
next ticket opens:

* every new connection reads the server's ``run_id`` (``INFO server``): a new one means Redis restarted, and each
  mailbox is checked again before its next ticket opens;
* the first ticket a process opens in a mailbox checks it too (start-up);
* the open script refuses (``NOEPOCH``) when the mailbox's epoch key is missing (a flushed or empty Redis).

The check (:class:`EpochGuard`) raises the mailbox's counter to at least the highest number the SQL history
knows, and this process has issued, in one script, and marks the mailbox with an epoch key.  When the counter was
behind, or the epoch key gone, Redis lost data: the guard calls ``on_loss`` (the daemon starts a rebuild of the
tickets, participants and Message-ID index from the history, in the background).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import redis
import redis.exceptions
from redis.cluster import RedisCluster

from postroom.redis_connect import node_for
from postroom.store.keyspace import epoch_key

log = logging.getLogger("postroom")

NO_EPOCH = "NOEPOCH"

# KEYS: counter, epoch; ARGV: floor, token.  Returns {counter before, epoch existed (0/1)}.
RAISE = """#!lua
local before = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if before < floor then redis.call('SET', KEYS[1], floor) end
local had = redis.call('EXISTS', KEYS[2])
if had == 0 then redis.call('SET', KEYS[2], ARGV[2]) end
return {before, had}
"""


class RestartWatch:
    """A ``redis_connect_func``: the usual handshake, then the server's run_id, to notice a restart."""

    def __init__(self) -> None:
        self.run_id = ""
        self.restarts = 0
        self._listeners: list[Callable[[], None]] = []

    def listen(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def __call__(self, conn: Any) -> None:
        conn.on_connect()
        conn.send_command("INFO", "server")
        info = conn.read_response()
        text = info.decode() if isinstance(info, bytes) else str(info)
        run_id = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("run_id:")), "")
        if self.run_id and run_id and run_id != self.run_id:
            self.restarts += 1
            log.warning(
                "Redis restarted (run_id %s, was %s): checking its data before the next ticket", run_id, self.run_id
            )
            for callback in self._listeners:
                callback()
        if run_id:
            self.run_id = run_id


class HistoryUnavailable(RuntimeError):
    """The history cannot say which numbers were issued (the database is down)."""


Floor = Callable[[str], int]  # mailbox -> highest ticket number the history knows (raises HistoryUnavailable)


class EpochGuard:
    """Checks each mailbox once per process and after every Redis restart; see the module docstring."""

    def __init__(self, client: redis.Redis | RedisCluster, prefix: str) -> None:
        self._r = client
        self._prefix = prefix
        self._raise = client.register_script(RAISE)
        self._checked: set[str] = set()
        self._issued: dict[str, int] = {}  # highest number this process opened, per mailbox
        self._lock = threading.Lock()
        self.floor: Floor = lambda mailbox: 0
        self.on_loss: Callable[[str], None] = lambda mailbox: None
        self.losses = 0

    def forget(self) -> None:
        """Redis restarted: every mailbox is checked again before its next ticket."""
        with self._lock:
            self._checked.clear()

    def issued(self, mailbox: str, number: int) -> None:
        if number > self._issued.get(mailbox, 0):
            self._issued[mailbox] = number

    def needs_check(self, mailbox: str) -> bool:
        return mailbox not in self._checked

    def check(self, mailbox: str, counter_key: str) -> None:
        """Raise the counter above every number issued before; report a loss.

        Raises HistoryUnavailable when the history is down and the epoch key is gone too: then nothing tells which
        numbers are taken, and the mail gets the failure policy rather than a number that may be someone else's.
        Redis errors pass through.
        """
        key = epoch_key(self._prefix, mailbox)
        try:
            floor = max(self.floor(mailbox), self._issued.get(mailbox, 0))
        except HistoryUnavailable as exc:
            if not node_for(self._r, key).exists(key):
                raise
            # Redis still has its epoch: trust it until the next restart rather than stop ticketing for as long
            # as the database is away.
            log.warning("cannot check Redis against the history for %s (%s); its epoch key is there", mailbox, exc)
            with self._lock:
                self._checked.add(mailbox)
            return
        token = uuid.uuid4().hex
        before, had = (
            int(x) for x in self._raise(keys=[counter_key, key], args=[floor, token], client=node_for(self._r, key))
        )
        with self._lock:
            self._checked.add(mailbox)
        if before < floor or (not had and floor > 0):
            self.losses += 1
            log.error(
                "Redis lost data for %s (counter %d, history knows #%d%s): numbering continues at #%d; "
                "rebuilding tickets from the history",
                mailbox,
                before,
                floor,
                "" if had else ", epoch key gone",
                max(before, floor) + 1,
            )
            self.on_loss(mailbox)


def is_no_epoch(exc: redis.exceptions.RedisError) -> bool:
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(NO_EPOCH)


def persistence_problems(client: redis.Redis | RedisCluster) -> list[str]:
    """What in this Redis's settings can lose postroom's state, one sentence each (empty: none found).

    For the start-up log and ``postroom config check``.  Reads ``INFO persistence`` and ``CONFIG GET`` (a server
    that forbids CONFIG is judged on INFO alone).  Raises redis's errors when Redis cannot be asked at all.
    """
    if isinstance(client, RedisCluster):  # every primary holds a share of the mailboxes: each is asked
        found: list[str] = []
        for node in client.get_primaries():  # type: ignore[no-untyped-call]
            for problem in persistence_problems(client.get_redis_connection(node)):
                if problem not in found:
                    found.append(problem)
        return found
    problems: list[str] = []
    info = client.info("persistence")
    if not int(info.get("aof_enabled", 0)):
        problems.append(
            "Redis runs without AOF persistence (appendonly no): a restart loses every change since the last "
            "snapshot; set appendonly yes and appendfsync everysec"
        )
    try:
        config = client.config_get("appendfsync", "maxmemory-policy")
    except redis.exceptions.ResponseError:
        return problems
    if int(info.get("aof_enabled", 0)) and config.get("appendfsync") == "no":
        problems.append("Redis's appendfsync is no: a crash can lose up to 30 s of changes; set everysec")
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        problems.append(
            f"Redis's maxmemory-policy is {policy}: under memory pressure it deletes tickets; set noeviction"
        )
    return problems
