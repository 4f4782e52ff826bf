"""The little Redis state the rules and the auto-replies keep: who is away, whose turn it is, who has how many open
tickets, and how many auto-replies a correspondent got today.

:class:`RedisAssignmentState` is the Redis :class:`postroom.tickets.AssignmentState` (and
:class:`postroom.autoreply.ReplyCap`); it shares the ticket store's client and so its connection pool.  Key names
are in :mod:`postroom.store.keyspace`, scripts in :mod:`postroom.store.scripts`.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
import redis.exceptions
from redis.cluster import RedisCluster

from postroom import redis_connect
from postroom.store import scripts
from postroom.store.keyspace import away_key, open_counts_key, reply_cap_key, round_robin_key
from postroom.store.redis import connect
from postroom.tickets import StoreUnavailable

CAP_WINDOW_SECONDS = 86400


class RedisAssignmentState:
    """:class:`AssignmentState` and :class:`postroom.autoreply.ReplyCap` in Redis.

    Every Redis error becomes StoreUnavailable, so the pipeline applies its failure policy as for the ticket store.
    """

    def __init__(self, client: redis.Redis | RedisCluster, key_prefix: str = "postroom") -> None:
        self._r = client
        self._prefix = key_prefix
        self._round_robin = client.register_script(scripts.ROUND_ROBIN)
        self._least_open = client.register_script(scripts.LEAST_OPEN)
        self._release = client.register_script(scripts.RELEASE)

    @property
    def client(self) -> redis.Redis | RedisCluster:
        return self._r

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str, timeout: float) -> RedisAssignmentState:
        return cls(connect(url, timeout=timeout), key_prefix)

    def _away_keys(self, mailbox: str, agents: Sequence[str]) -> list[str]:
        return [away_key(self._prefix, mailbox, a) for a in agents]

    def away(self, mailbox: str, agents: Sequence[str]) -> set[str]:
        if not agents:
            return set()
        try:
            flags = self._r.mget(self._away_keys(mailbox, agents))
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        return {a for a, f in zip(agents, flags, strict=True) if f is not None}

    def pick_round_robin(self, mailbox: str, group: str, agents: Sequence[str]) -> str:
        if not agents:
            return ""
        keys = [round_robin_key(self._prefix, mailbox, group), open_counts_key(self._prefix, mailbox)]
        try:
            return str(self._round_robin(keys=keys + self._away_keys(mailbox, agents), args=list(agents)) or "")
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc

    def pick_least_open(self, mailbox: str, agents: Sequence[str]) -> str:
        if not agents:
            return ""
        keys = [open_counts_key(self._prefix, mailbox), *self._away_keys(mailbox, agents)]
        try:
            return str(self._least_open(keys=keys, args=list(agents)) or "")
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc

    def count_assigned(self, mailbox: str, agent: str) -> None:
        try:
            self._r.hincrby(open_counts_key(self._prefix, mailbox), agent, 1)
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc

    def count_released(self, mailbox: str, agent: str) -> None:
        try:
            self._release(keys=[open_counts_key(self._prefix, mailbox)], args=[agent])
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc

    def open_counts(self, mailbox: str, agents: Sequence[str]) -> dict[str, int]:
        if not agents:
            return {}
        try:
            values = self._r.hmget(open_counts_key(self._prefix, mailbox), list(agents))
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        return {a: int(v or 0) for a, v in zip(agents, values, strict=True)}

    def allow(self, mailbox: str, correspondent: str, limit: int) -> bool:
        if limit <= 0:
            return False
        key = reply_cap_key(self._prefix, mailbox, correspondent)
        # SET NX starts the 24-hour window with the first reply; INCR in the same transaction counts this one, so
        # two mails at once cannot both be the fifth.
        try:
            pipe = self._r.pipeline(transaction=True)
            pipe.set(key, 0, ex=CAP_WINDOW_SECONDS, nx=True)
            pipe.incr(key)
            _created, count = pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        return int(count) <= limit
