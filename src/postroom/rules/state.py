"""The little Redis state the rules and the auto-replies keep: who is away, whose turn it is, who has how many open
tickets, and how many auto-replies a correspondent got today.

Every key carries the mailbox's hash tag (``postroom:{support@example.test}:...``) like the ticket store's, so one
mailbox stays in one Redis Cluster slot and each script below is atomic there.  The key names live in
:mod:`postroom.keyspace`, shared with the ticket store and the #away command.

:class:`AssignmentState` is what :func:`postroom.rules.evaluate` is handed; :class:`RedisAssignmentState` in
production, :class:`MemoryAssignmentState` in unit tests and in the ``postroom rules test`` dry run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import redis
import redis.exceptions

from postroom.keyspace import away_key, key_base, open_counts_key, reply_cap_key, round_robin_key
from postroom.store import StoreUnavailable, Ticket

__all__ = [
    "AssignmentState",
    "MemoryAssignmentState",
    "RedisAssignmentState",
    "away_key",
    "key_base",
    "open_counts_key",
    "recount",
    "reply_cap_key",
    "round_robin_key",
]

CAP_WINDOW_SECONDS = 86400


class AssignmentState(Protocol):
    """Presence, turns and loads of agents, per mailbox (its shared address).

    The two ``pick_*`` methods choose among the agents who are not away and count the ticket for the chosen one in
    the same atomic step, so two mails at once never get the same turn; they return "" when nobody is present.
    """

    def away(self, mailbox: str, agents: Sequence[str]) -> set[str]: ...

    def pick_round_robin(self, mailbox: str, group: str, agents: Sequence[str]) -> str: ...

    def pick_least_open(self, mailbox: str, agents: Sequence[str]) -> str: ...

    def count_assigned(self, mailbox: str, agent: str) -> None: ...

    def count_released(self, mailbox: str, agent: str) -> None: ...

    def open_counts(self, mailbox: str, agents: Sequence[str]) -> dict[str, int]: ...

    def allow(self, mailbox: str, correspondent: str, limit: int) -> bool: ...


# The agent after the one who had the last turn, skipping absent agents; a newly absent agent never costs anyone
# a turn and a returning one rejoins in place.  KEYS: last-turn key, open-count hash, then one away key per agent
# in ARGV order.
_ROUND_ROBIN = """
local last = redis.call('GET', KEYS[1]) or ''
local start = 0
for i = 1, #ARGV do if ARGV[i] == last then start = i end end
for step = 1, #ARGV do
  local i = ((start + step - 1) % #ARGV) + 1
  if redis.call('EXISTS', KEYS[i + 2]) == 0 then
    redis.call('SET', KEYS[1], ARGV[i])
    redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
    return ARGV[i]
  end
end
return ''
"""

# The present agent with the fewest open tickets; a tie goes to the one listed first.  KEYS: open-count hash,
# then one away key per agent in ARGV order.
_LEAST_OPEN = """
local best = ''
local best_n = nil
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    local n = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
    if best_n == nil or n < best_n then best = ARGV[i]; best_n = n end
  end
end
if best ~= '' then redis.call('HINCRBY', KEYS[1], best, 1) end
return best
"""

# A released ticket lowers the count, never below zero (counts from before a Redis rebuild may be missing).
_RELEASE = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n < 0 then redis.call('HSET', KEYS[1], ARGV[1], 0) end
return n
"""


class RedisAssignmentState:
    """:class:`AssignmentState` and :class:`postroom.autoreply.ReplyCap` in Redis.

    Every Redis error becomes StoreUnavailable, so the pipeline applies its failure policy as for the ticket store.
    """

    def __init__(self, client: redis.Redis, key_prefix: str = "postroom") -> None:
        self._r = client
        self._prefix = key_prefix
        self._round_robin = client.register_script(_ROUND_ROBIN)
        self._least_open = client.register_script(_LEAST_OPEN)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str, timeout: float) -> RedisAssignmentState:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        return cls(client, key_prefix)

    def _away_keys(self, mailbox: str, agents: Sequence[str]) -> list[str]:
        return [away_key(self._prefix, mailbox, a) for a in agents]

    def away(self, mailbox: str, agents: Sequence[str]) -> set[str]:
        if not agents:
            return set()
        try:
            flags = self._r.mget(self._away_keys(mailbox, agents))
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return {a for a, f in zip(agents, flags, strict=True) if f is not None}

    def pick_round_robin(self, mailbox: str, group: str, agents: Sequence[str]) -> str:
        if not agents:
            return ""
        keys = [round_robin_key(self._prefix, mailbox, group), open_counts_key(self._prefix, mailbox)]
        try:
            return str(self._round_robin(keys=keys + self._away_keys(mailbox, agents), args=list(agents)) or "")
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def pick_least_open(self, mailbox: str, agents: Sequence[str]) -> str:
        if not agents:
            return ""
        keys = [open_counts_key(self._prefix, mailbox), *self._away_keys(mailbox, agents)]
        try:
            return str(self._least_open(keys=keys, args=list(agents)) or "")
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def count_assigned(self, mailbox: str, agent: str) -> None:
        try:
            self._r.hincrby(open_counts_key(self._prefix, mailbox), agent, 1)
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def count_released(self, mailbox: str, agent: str) -> None:
        try:
            self._release(keys=[open_counts_key(self._prefix, mailbox)], args=[agent])
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def open_counts(self, mailbox: str, agents: Sequence[str]) -> dict[str, int]:
        if not agents:
            return {}
        try:
            values = self._r.hmget(open_counts_key(self._prefix, mailbox), list(agents))
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
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
            raise StoreUnavailable(str(exc)) from exc
        return int(count) <= limit


class MemoryAssignmentState:
    """The same behaviour in a dict, for unit tests and the dry run (``postroom rules test``)."""

    def __init__(self, away: dict[str, set[str]] | None = None) -> None:
        self.absent: dict[str, set[str]] = {k: set(v) for k, v in (away or {}).items()}
        self.last_turn: dict[tuple[str, str], str] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.replies: dict[tuple[str, str], int] = {}

    def set_away(self, mailbox: str, agent: str, away: bool = True) -> None:
        group = self.absent.setdefault(mailbox, set())
        if away:
            group.add(agent)
        else:
            group.discard(agent)

    def away(self, mailbox: str, agents: Sequence[str]) -> set[str]:
        return set(agents) & self.absent.get(mailbox, set())

    def pick_round_robin(self, mailbox: str, group: str, agents: Sequence[str]) -> str:
        if not agents:
            return ""
        last = self.last_turn.get((mailbox, group), "")
        start = max((i + 1 for i, a in enumerate(agents) if a == last), default=0)
        absent = self.away(mailbox, agents)
        for step in range(len(agents)):
            agent = agents[(start + step) % len(agents)]
            if agent not in absent:
                self.last_turn[(mailbox, group)] = agent
                self.count_assigned(mailbox, agent)
                return agent
        return ""

    def pick_least_open(self, mailbox: str, agents: Sequence[str]) -> str:
        absent = self.away(mailbox, agents)
        counts = self.counts.get(mailbox, {})
        present = [a for a in agents if a not in absent]
        if not present:
            return ""
        best = min(present, key=lambda a: counts.get(a, 0))  # min keeps the first of equals, as the script does
        self.count_assigned(mailbox, best)
        return best

    def count_assigned(self, mailbox: str, agent: str) -> None:
        box = self.counts.setdefault(mailbox, {})
        box[agent] = box.get(agent, 0) + 1

    def count_released(self, mailbox: str, agent: str) -> None:
        box = self.counts.setdefault(mailbox, {})
        box[agent] = max(0, box.get(agent, 0) - 1)

    def open_counts(self, mailbox: str, agents: Sequence[str]) -> dict[str, int]:
        box = self.counts.get(mailbox, {})
        return {a: box.get(a, 0) for a in agents}

    def allow(self, mailbox: str, correspondent: str, limit: int) -> bool:
        if limit <= 0:
            return False
        key = (mailbox, correspondent.lower())
        self.replies[key] = self.replies.get(key, 0) + 1
        return self.replies[key] <= limit


def recount(assign: AssignmentState | None, mailbox: str, before: Ticket, after: Ticket) -> None:
    """Keep the open-ticket counts that least-open assignment reads in step with an ownership change."""
    if assign is None:
        return
    was = before.owner if before.owner and before.state != "closed" else ""
    now = after.owner if after.owner and after.state != "closed" else ""
    if was == now:
        return
    if was:
        assign.count_released(mailbox, was)
    if now:
        assign.count_assigned(mailbox, now)
