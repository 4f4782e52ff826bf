"""The Redis store: ticket counters, ticket hashes, participants and the Message-ID index.

Every key of one mailbox carries the same hash tag (``postroom:{support@example.test}:...``), so a mailbox
lives in one Redis Cluster slot and the multi-key scripts below stay atomic there.  Round trips per mail: the reads
of :meth:`RedisStore.lookup` (none for a mail with neither references nor a ticket token, one pipeline otherwise,
one more for the ticket a reference names) and one write script (open or touch).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import hiredis
import redis
import redis.exceptions
from redis.commands.core import Script

from postroom.keyspace import away_key, key_base


class StoreUnavailable(RuntimeError):
    """Redis did not answer; the caller applies the failure policy."""


@dataclass(frozen=True)
class Ticket:
    mailbox: str
    number: int
    owner: str = ""  # agent login, "" for unassigned
    state: str = "new"
    priority: str = "normal"
    tags: tuple[str, ...] = ()
    customer: str = ""
    subject: str = ""
    created: float = 0.0
    updated: float = 0.0
    linked: int = 0  # the ticket a forward was split from

    @staticmethod
    def from_hash(mailbox: str, number: int, h: Mapping[str, str]) -> Ticket:
        return Ticket(
            mailbox=mailbox,
            number=number,
            owner=h.get("owner", ""),
            state=h.get("state", "new"),
            priority=h.get("priority", "normal"),
            tags=tuple(t for t in h.get("tags", "").split(",") if t),
            customer=h.get("customer", ""),
            subject=h.get("subject", ""),
            created=float(h.get("created", 0) or 0),
            updated=float(h.get("updated", 0) or 0),
            linked=int(h.get("linked", 0) or 0),
        )


@dataclass(frozen=True)
class Candidate:
    """A ticket named by a subject token, and whether the sender may use that token."""

    ticket: Ticket
    sender_known: bool


@dataclass
class Lookup:
    by_reference: Ticket | None = None  # the ticket the first indexed Message-ID points to
    by_token: list[Candidate] = field(default_factory=list)


@dataclass(frozen=True)
class NewTicket:
    customer: str
    subject: str
    participants: tuple[str, ...]
    message_ids: tuple[str, ...]
    owner: str = ""
    state: str = "new"
    priority: str = "normal"
    linked: int = 0
    tags: tuple[str, ...] = ()


class TicketStore(Protocol):
    """What the pipeline needs; :class:`RedisStore` in production, an in-memory fake in unit tests."""

    def lookup(self, mailbox: str, message_ids: list[str], numbers: list[int], senders: list[str]) -> Lookup: ...

    def open(self, mailbox: str, new: NewTicket, now: float) -> Ticket: ...

    def open_unless_seen(self, mailbox: str, new: NewTicket, message_id: str, now: float) -> tuple[Ticket, bool]: ...

    def touch(
        self, mailbox: str, number: int, message_ids: Iterable[str], participants: Iterable[str], now: float
    ) -> Ticket: ...

    def claim(self, mailbox: str, number: int, login: str, now: float, *, force: bool = False) -> Claim: ...

    def update(self, mailbox: str, number: int, changes: Changes, now: float) -> Ticket: ...

    def set_away(self, mailbox: str, login: str, until: float | None, now: float) -> None: ...

    def clear_away(self, mailbox: str, login: str) -> None: ...

    def away(self, mailbox: str, logins: Iterable[str]) -> set[str]: ...

    def tickets(self, mailbox: str) -> list[Ticket]: ...


# Opens a ticket: number from the mailbox counter, hash, participants and Message-ID index in one step.
# The ticket's keys depend on the number INCR returns, so they cannot be declared in KEYS; they share the
# counter's hash tag and so its cluster slot, which is what Redis Cluster needs for the script to run there.
# ARGV[3], when not empty, is the mail's own Message-ID: if it already names a ticket that one of this mail's
# senders takes part in, this is the same mail again (Postfix retrying after a lost "250", a client sending
# twice, two routes to one mailbox) and the script returns {number, that ticket's hash} instead of opening a
# second ticket; checked inside the script, so two copies arriving at once still open one ticket.
_OPEN = """
local base = ARGV[1]
local ttl = tonumber(ARGV[2])
local seen_id = ARGV[3]
local nfields = tonumber(ARGV[4])
local i = 5
local fields = {}
for _ = 1, nfields do
  table.insert(fields, ARGV[i]); table.insert(fields, ARGV[i + 1]); i = i + 2
end
local nparts = tonumber(ARGV[i]); i = i + 1
local parts = {}
for _ = 1, nparts do table.insert(parts, ARGV[i]); i = i + 1 end
if seen_id ~= '' then
  local seen = redis.call('GET', base .. 'm:' .. seen_id)
  if seen then
    local t = redis.call('HGETALL', base .. 't:' .. seen)
    if #t > 0 then
      for _, p in ipairs(parts) do
        if redis.call('SISMEMBER', base .. 'p:' .. seen, p) == 1 then return {tonumber(seen), t} end
      end
    end
  end
end
local n = redis.call('INCR', KEYS[1])
local tkey = base .. 't:' .. n
local pkey = base .. 'p:' .. n
redis.call('HSET', tkey, unpack(fields))
for _, p in ipairs(parts) do redis.call('SADD', pkey, p) end
local nids = tonumber(ARGV[i]); i = i + 1
for _ = 1, nids do redis.call('SET', base .. 'm:' .. ARGV[i], n, 'EX', ttl); i = i + 1 end
return {n}
"""

# Records a follow-up: index its Message-IDs, add participants, bump the time, return the current hash.
_TOUCH = """
local ttl = tonumber(ARGV[1])
local now = ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'updated', now)
local nparts = tonumber(ARGV[3])
local i = 4
for _ = 1, nparts do redis.call('SADD', KEYS[2], ARGV[i]); i = i + 1 end
for k = 3, #KEYS do redis.call('SET', KEYS[k], ARGV[i], 'EX', ttl) end
return redis.call('HGETALL', KEYS[1])
"""

# Sets the owner only of a ticket that exists, so a typo in a number cannot create a half ticket.
_ASSIGN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'state', ARGV[2], 'updated', ARGV[3])
return redis.call('HGETALL', KEYS[1])
"""

# The claim: the first agent to answer an unowned ticket owns it; the owner answering again keeps it; anyone
# else gets the current owner back, unless forced (#takeover).  One script, so two agents answering in the
# same millisecond cannot both win.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local won = 0
if owner == '' or owner == ARGV[1] or ARGV[2] == '1' then
  if owner ~= ARGV[1] then
    redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'owned_since', ARGV[3])
  end
  redis.call('HSET', KEYS[1], 'state', 'open', 'updated', ARGV[3])
  won = 1
end
local t = redis.call('HGETALL', KEYS[1])
table.insert(t, '_won'); table.insert(t, tostring(won))
table.insert(t, '_previous'); table.insert(t, owner)
return t
"""

# Agents' commands change several fields at once: all or nothing, and tag edits computed against the tags as
# they are now (two agents tagging at once must not lose each other's tag).  ARGV: owner, state, priority
# ("\0" leaves a field as it is), now, number of tags to add, the tags, then the tags to remove.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local keep = string.char(0)
local now = ARGV[4]
if ARGV[1] ~= keep then
  local old = redis.call('HGET', KEYS[1], 'owner') or ''
  if old ~= ARGV[1] then redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'owned_since', now) end
end
if ARGV[2] ~= keep then redis.call('HSET', KEYS[1], 'state', ARGV[2]) end
if ARGV[3] ~= keep then redis.call('HSET', KEYS[1], 'priority', ARGV[3]) end
local tags = {}
local order = {}
for t in string.gmatch(redis.call('HGET', KEYS[1], 'tags') or '', '[^,]+') do
  if not tags[t] then tags[t] = true; table.insert(order, t) end
end
local nadd = tonumber(ARGV[5])
local i = 6
for _ = 1, nadd do
  if not tags[ARGV[i]] then tags[ARGV[i]] = true; table.insert(order, ARGV[i]) end
  i = i + 1
end
for j = i, #ARGV do tags[ARGV[j]] = nil end
local out = {}
for _, t in ipairs(order) do if tags[t] then table.insert(out, t) end end
redis.call('HSET', KEYS[1], 'tags', table.concat(out, ','), 'updated', now)
return redis.call('HGETALL', KEYS[1])
"""

KEEP = "\0"


@dataclass(frozen=True)
class Changes:
    """What an agent's commands do to one ticket; KEEP leaves a field unchanged."""

    owner: str = KEEP
    state: str = KEEP
    priority: str = KEEP
    add_tags: tuple[str, ...] = ()
    remove_tags: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self != Changes()


@dataclass(frozen=True)
class Claim:
    won: bool
    ticket: Ticket  # after the claim: owned by the claimer when won, by the rival otherwise
    previous_owner: str  # "" when the ticket was unowned
    owned_since: float  # when the current owner took it


def _packed(*parts: str | bytes | memoryview | int) -> list[bytes]:
    """One Redis command, encoded as redis-py's encoder would (UTF-8, strict) but in one C call."""
    # hiredis's stub types the argument as a 1-tuple; it takes a command of any length.
    return [hiredis.pack_command(cast(Any, parts))]


class _ScriptRunner:
    """EVALSHA on a pooled connection: the mail path's one Redis call, without redis-py's per-command client layer.

    ``Script.__call__`` goes through the client's retry and observability wrappers, which cost about as much CPU
    as the rest of the call.  This keeps redis-py's pool and connections (URL, AUTH, TLS, RESP3)
    and does not retry: these scripts are not idempotent (a retried open would open a second ticket), so a lost
    connection is a StoreUnavailable for the failure policy, and the connection is reset for the next mail.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool

    def __call__(self, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        conn = self._pool.get_connection()
        try:
            conn.send_packed_command(_packed("EVALSHA", script.sha, len(keys), *keys, *args))  # type: ignore[no-untyped-call]
            try:
                return conn.read_response()
            except redis.exceptions.NoScriptError:
                # Redis restarted or SCRIPT FLUSH: EVAL runs the script and caches it again for EVALSHA.
                conn.send_packed_command(_packed("EVAL", script.script, len(keys), *keys, *args))  # type: ignore[no-untyped-call]
                return conn.read_response()
        finally:
            # A connection that failed was disconnected by redis-py; the pool reconnects it on next use.
            self._pool.release(conn)


class RedisStore:
    def __init__(self, client: redis.Redis, key_prefix: str = "postroom", message_index_days: int = 400) -> None:
        self._r = client
        self._prefix = key_prefix
        self._ttl = message_index_days * 86400
        self._open = client.register_script(_OPEN)
        self._touch = client.register_script(_TOUCH)
        self._assign = client.register_script(_ASSIGN)
        self._claim = client.register_script(_CLAIM)
        self._update = client.register_script(_UPDATE)
        self._run = _ScriptRunner(client)

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str, message_index_days: int, timeout: float) -> RedisStore:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        return cls(client, key_prefix, message_index_days)

    # -- keys: one hash tag per mailbox --

    def base(self, mailbox: str) -> str:
        return key_base(self._prefix, mailbox)

    def ticket_key(self, mailbox: str, number: int) -> str:
        return f"{self.base(mailbox)}t:{number}"

    def participants_key(self, mailbox: str, number: int) -> str:
        return f"{self.base(mailbox)}p:{number}"

    def message_key(self, mailbox: str, message_id: str) -> str:
        return f"{self.base(mailbox)}m:{message_id}"

    def counter_key(self, mailbox: str) -> str:
        return f"{self.base(mailbox)}seq"

    # -- operations --

    def ping(self) -> None:
        try:
            self._r.ping()
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def lookup(self, mailbox: str, message_ids: list[str], numbers: list[int], senders: list[str]) -> Lookup:
        try:
            return self._lookup(mailbox, message_ids, numbers, senders)
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def _lookup(self, mailbox: str, message_ids: list[str], numbers: list[int], senders: list[str]) -> Lookup:
        if not (message_ids or numbers):
            return Lookup()  # a new conversation (most customer mail): nothing to read
        pipe = self._r.pipeline(transaction=False)
        if message_ids:
            pipe.mget([self.message_key(mailbox, m) for m in message_ids])
        for n in numbers:
            pipe.hgetall(self.ticket_key(mailbox, n))
            pipe.smismember(self.participants_key(mailbox, n), senders or [""])
        results = pipe.execute()
        found = Lookup()
        pos = 0
        ref_number = 0
        if message_ids:
            # The newest reference is the most specific one: a reply to a forwarded split names the new ticket.
            for value in reversed(results[0]):
                if value:
                    ref_number = int(value)
                    break
            pos = 1
        for n in numbers:
            h, known = results[pos], results[pos + 1]
            pos += 2
            if h:
                found.by_token.append(Candidate(Ticket.from_hash(mailbox, n, h), any(known)))
        if ref_number:
            h = cast(dict[str, str], self._r.hgetall(self.ticket_key(mailbox, ref_number)))
            if h:
                found.by_reference = Ticket.from_hash(mailbox, ref_number, h)
        return found

    def open(self, mailbox: str, new: NewTicket, now: float) -> Ticket:
        return self._open_ticket(mailbox, new, "", now)[0]

    def open_unless_seen(self, mailbox: str, new: NewTicket, message_id: str, now: float) -> tuple[Ticket, bool]:
        """Open a ticket, unless ``message_id`` already opened or joined one a sender of this mail takes part in.

        An empty ``message_id`` (a mail without one) always opens a ticket.  Returns (ticket, True) for a new
        ticket, (the existing ticket, False) for the same mail again.
        """
        return self._open_ticket(mailbox, new, message_id, now)

    def _open_ticket(self, mailbox: str, new: NewTicket, seen_id: str, now: float) -> tuple[Ticket, bool]:
        fields = {
            "owner": new.owner,
            "state": new.state,
            "priority": new.priority,
            "tags": ",".join(new.tags),
            "customer": new.customer,
            "subject": new.subject,
            "created": repr(now),
            "updated": repr(now),
            "linked": str(new.linked),
            "owned_since": repr(now) if new.owner else "",
        }
        args: list[str | int] = [self.base(mailbox), self._ttl, seen_id, len(fields)]
        for k, v in fields.items():
            args += [k, v]
        args.append(len(new.participants))
        args += list(new.participants)
        args.append(len(new.message_ids))
        args += list(new.message_ids)
        try:
            reply = cast(list[Any], self._run(self._open, [self.counter_key(mailbox)], args))
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        number = int(reply[0])
        if len(reply) > 1:
            flat = reply[1]
            return Ticket.from_hash(mailbox, number, dict(zip(flat[::2], flat[1::2], strict=True))), False
        return Ticket.from_hash(mailbox, number, fields), True

    def touch(
        self, mailbox: str, number: int, message_ids: Iterable[str], participants: Iterable[str], now: float
    ) -> Ticket:
        parts = list(participants)
        ids = list(message_ids)
        args: list[str | int] = [self._ttl, repr(now), len(parts), *parts, number]
        keys = [self.ticket_key(mailbox, number), self.participants_key(mailbox, number)]
        keys += [self.message_key(mailbox, m) for m in ids]
        try:
            flat = self._run(self._touch, keys, args)
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not flat:
            raise StoreUnavailable(f"ticket {mailbox} #{number} vanished from Redis")
        h = dict(zip(flat[::2], flat[1::2], strict=True))
        return Ticket.from_hash(mailbox, number, h)

    def assign(self, mailbox: str, number: int, owner: str, now: float) -> Ticket:
        """Give the ticket to ``owner`` (a login, "" to release); raises KeyError for an unknown ticket."""
        state = "open" if owner else "new"
        try:
            flat = self._run(self._assign, [self.ticket_key(mailbox, number)], [owner, state, repr(now)])
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not flat:
            raise KeyError(f"{mailbox} #{number}")
        return Ticket.from_hash(mailbox, number, dict(zip(flat[::2], flat[1::2], strict=True)))

    def claim(self, mailbox: str, number: int, login: str, now: float, *, force: bool = False) -> Claim:
        """Atomically make ``login`` the owner unless another agent owns the ticket (``force`` takes it over)."""
        try:
            flat = self._run(self._claim, [self.ticket_key(mailbox, number)], [login, "1" if force else "0", repr(now)])
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not flat:
            raise KeyError(f"{mailbox} #{number}")
        h = dict(zip(flat[::2], flat[1::2], strict=True))
        return Claim(
            won=h.pop("_won") == "1",
            previous_owner=h.pop("_previous"),
            ticket=Ticket.from_hash(mailbox, number, h),
            owned_since=float(h.get("owned_since") or h.get("created") or 0),
        )

    def update(self, mailbox: str, number: int, changes: Changes, now: float) -> Ticket:
        """Apply an agent's changes in one step; raises KeyError for an unknown ticket."""
        args: list[str | int] = [changes.owner, changes.state, changes.priority, repr(now), len(changes.add_tags)]
        args += [*changes.add_tags, *changes.remove_tags]
        try:
            flat = self._run(self._update, [self.ticket_key(mailbox, number)], args)
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        if not flat:
            raise KeyError(f"{mailbox} #{number}")
        return Ticket.from_hash(mailbox, number, dict(zip(flat[::2], flat[1::2], strict=True)))

    def away_key(self, mailbox: str, login: str) -> str:
        # One name for the flag, shared with the rules' assignment (which skips absent agents).
        return away_key(self._prefix, mailbox, login)

    def set_away(self, mailbox: str, login: str, until: float | None, now: float) -> None:
        """Mark an agent absent for a mailbox, until a time (the key expires then) or until #back."""
        try:
            if until is not None:
                self._r.set(self.away_key(mailbox, login), repr(until), exat=int(until))
            else:
                self._r.set(self.away_key(mailbox, login), "")
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def clear_away(self, mailbox: str, login: str) -> None:
        try:
            self._r.delete(self.away_key(mailbox, login))
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc

    def away(self, mailbox: str, logins: Iterable[str]) -> set[str]:
        """Which of these agents are absent from this mailbox now."""
        names = list(logins)
        if not names:
            return set()
        try:
            flags = self._r.mget([self.away_key(mailbox, n) for n in names])
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return {n for n, f in zip(names, flags, strict=True) if f is not None}

    def tickets(self, mailbox: str) -> list[Ticket]:
        """Every ticket of a mailbox, newest first (admin and demo listings; not for the mail path)."""
        try:
            last = int(cast(str, self._r.get(self.counter_key(mailbox))) or 0)
            pipe = self._r.pipeline(transaction=False)
            for n in range(last, 0, -1):
                pipe.hgetall(self.ticket_key(mailbox, n))
            hashes = pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [Ticket.from_hash(mailbox, last - i, h) for i, h in enumerate(hashes) if h]

    def ticket(self, mailbox: str, number: int) -> Ticket | None:
        try:
            h = cast(dict[str, str], self._r.hgetall(self.ticket_key(mailbox, number)))
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(str(exc)) from exc
        return Ticket.from_hash(mailbox, number, h) if h else None


def now() -> float:
    return time.time()
