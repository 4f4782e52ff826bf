"""The Redis store: ticket counters, ticket hashes, participants and the Message-ID index.

Every key of one mailbox carries the same hash tag (``postroom:{support@example.test}:...``), so a mailbox
lives in one Redis Cluster slot and the multi-key scripts below stay atomic there.  Round trips per mail: the reads
of :meth:`RedisStore.lookup` (none for a mail with neither references nor a ticket token, one pipeline otherwise,
one more for the ticket a reference names) and one write script (open or touch).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import hiredis
import redis
import redis.exceptions
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.connection import Connection
from redis.exceptions import RedisClusterException

from postroom import coop, redis_connect
from postroom.epoch import EpochGuard, HistoryUnavailable, RestartWatch, is_no_epoch
from postroom.store import keyspace, scripts
from postroom.tickets import (
    Candidate,
    Changes,
    Claim,
    Lookup,
    NewTicket,
    StoreUnavailable,
    Ticket,
    tags_of,
    tags_text,
)


def connect(url: str, *, timeout: float, on_connect: Callable[[Any], None] | None = None) -> redis.Redis | RedisCluster:
    """A client with its own connection pool (per node on Cluster); a process makes one and hands it to every Redis
    adapter.  ``url`` in any of the forms of :mod:`postroom.redis_connect`: one Redis, Sentinel or Cluster.

    ``on_connect`` replaces redis-py's handshake on every new connection (it must call ``conn.on_connect()``):
    the ticket store's restart watch (postroom.epoch); not used on Cluster (see redis_connect.connect).
    """
    return redis_connect.connect(redis_connect.parse(url), timeout, on_connect=on_connect)


def ticket_from_hash(mailbox: str, number: int, h: Mapping[str, str]) -> Ticket:
    """A ticket as its Redis hash stores it (tags comma-separated, times as text)."""
    return Ticket(
        mailbox=mailbox,
        number=number,
        owner=h.get("owner", ""),
        state=h.get("state", "new"),
        priority=h.get("priority", "normal"),
        tags=tags_of(h.get("tags", "")),
        customer=h.get("customer", ""),
        subject=h.get("subject", ""),
        created=float(h.get("created", 0) or 0),
        updated=float(h.get("updated", 0) or 0),
        linked=int(h.get("linked", 0) or 0),
    )


_T = TypeVar("_T")


def _packed(*parts: str | bytes | memoryview | int) -> list[bytes]:
    """One Redis command, encoded as redis-py's encoder would (UTF-8, strict) but in one C call."""
    # hiredis's stub types the argument as a 1-tuple; it takes a command of any length.
    return [hiredis.pack_command(cast(Any, parts))]


class _ScriptRunner:
    """EVALSHA on a pooled connection: the mail path's one Redis call, without redis-py's per-command client layer.

    ``Script.__call__`` goes through the client's retry and observability wrappers, which cost about as much CPU
    as the rest of the call.  This keeps redis-py's pool and connections (URL, AUTH, TLS, RESP3, and Sentinel's
    connections, which ask the sentinels for the primary when they connect) and does not retry: these scripts are
    not idempotent (a retried open would open a second ticket), so a lost connection is a StoreUnavailable for the
    failure policy, and the connection is reset for the next mail.  On Redis Cluster the call goes to the pool of
    the node that holds the first key's slot; every key of a script shares that slot (the mailbox's hash tag).
    """

    def __init__(self, client: redis.Redis | RedisCluster, confirm_replicas: int = 0, wait_ms: int = 1000) -> None:
        self._client = client
        self._confirm = confirm_replicas
        self._wait_ms = wait_ms
        self._pool = None if isinstance(client, RedisCluster) else client.connection_pool
        self._stale_slots = False

    def node(self, key: str) -> redis.Redis:
        """The client of the server that holds ``key``: the client itself, or on Cluster the slot's node.

        Every key of a mailbox is in one slot, so a mailbox's reads go to one node as a plain pipeline (redis-py's
        cluster pipeline refuses MGET even when all keys share a slot).
        """
        if self._pool is not None:
            return cast(redis.Redis, self._client)
        cluster = cast(RedisCluster, self._client)
        if self._stale_slots:
            # A node failed or a slot moved since the last call: ask the cluster for its slot map again.
            self._stale_slots = False
            cluster.nodes_manager.initialize()
        node = cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]
        return cluster.get_redis_connection(node)

    def moved(self) -> None:
        """A node answered MOVED, failed or timed out: refresh the slot map before the next call (Cluster only)."""
        self._stale_slots = self._pool is None

    def _pool_for(self, key: str) -> redis.ConnectionPool:
        return self._pool if self._pool is not None else self.node(key).connection_pool

    def __call__(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int], prepare: Callable[[], None] | None = None
    ) -> Any:
        """Run the script; ``prepare`` runs once the connection is there (a new one has noticed a Redis restart)."""
        return self._routed(keys[0], lambda pool: self._call(pool, script, keys, args, prepare))

    def read(self, key: str, *commands: tuple[str | int, ...]) -> list[Any]:
        """Read-only commands on the server that holds ``key``, sent in one write; their replies in order.

        What a redis-py pipeline of these commands would answer, without its per-command client layer (the mail
        path's look-up of a follow-up's ticket cost about as much there as the script itself), waiting for each
        reply the way a script's is waited for (postroom.coop).  Replies are as the server sends them: a hash is a
        flat list in RESP2 (see :func:`_hash`).  The first error reply is raised once every reply is read.
        """
        return self._routed(key, lambda pool: self._read(pool, commands))

    def _routed(self, key: str, run: Callable[[redis.ConnectionPool], _T]) -> _T:
        try:
            return run(self._pool_for(key))
        except redis.exceptions.MovedError:
            # The slot moved (resharding, a replica promoted): a MOVED reply means the command did not run, so one
            # more try on the node the refreshed map names is safe.
            self.moved()
            return run(self._pool_for(key))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, RedisClusterException):
            self.moved()
            raise

    def _call(
        self,
        pool: redis.ConnectionPool,
        script: Script,
        keys: Sequence[str],
        args: Sequence[str | int],
        prepare: Callable[[], None] | None,
    ) -> Any:
        with _connection(pool) as conn:
            if prepare is not None:
                prepare()
            reply = self._exchange(conn, "EVALSHA", script.sha, keys, args)
            if isinstance(reply, redis.exceptions.NoScriptError):
                # Redis restarted, failed over or SCRIPT FLUSH: EVAL runs the script and caches it for EVALSHA.
                reply = self._exchange(conn, "EVAL", script.script, keys, args)
            if isinstance(reply, redis.exceptions.ResponseError):
                raise reply
            return reply

    def _read(self, pool: redis.ConnectionPool, commands: Sequence[tuple[str | int, ...]]) -> list[Any]:
        with _connection(pool) as conn:
            packed: list[bytes] = []
            for command in commands:
                packed += _packed(*command)
            conn.send_packed_command(packed)  # type: ignore[no-untyped-call]
            replies: list[Any] = []
            error: redis.exceptions.ResponseError | None = None
            for _ in commands:
                _await_reply(conn)
                try:
                    replies.append(conn.read_response())
                except redis.exceptions.ResponseError as exc:
                    error = error or exc
                    replies.append(exc)
            if error is not None:
                raise error
            return replies

    def _exchange(
        self,
        conn: Connection,
        command: str,
        body: str | bytes | memoryview,
        keys: Sequence[str],
        args: Sequence[str | int],
    ) -> Any:
        """Send the script (and WAIT, when replicas must confirm) in one write; the script's reply or its error.

        Both replies are always read, so the connection stays in step whatever the script answered.
        """
        packed = _packed(command, body, len(keys), *keys, *args)
        if self._confirm:
            packed += _packed("WAIT", self._confirm, self._wait_ms)
        conn.send_packed_command(packed)  # type: ignore[no-untyped-call]
        _await_reply(conn)
        try:
            reply = conn.read_response()
        except redis.exceptions.ResponseError as exc:
            reply = exc
        if self._confirm:
            _await_reply(conn)
            confirmed = int(conn.read_response())
            if confirmed < self._confirm and not isinstance(reply, redis.exceptions.ResponseError):
                raise UnconfirmedWrite(
                    f"{confirmed} of {self._confirm} replicas confirmed the write within {self._wait_ms} ms"
                )
        return reply


@contextlib.contextmanager
def _connection(pool: redis.ConnectionPool) -> Iterator[Connection]:
    """A connection of the pool for one exchange, dropped when the exchange failed on the way."""
    conn = pool.get_connection()
    try:
        yield conn
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        # The reply may still come: a connection that gave up waiting must never be read again, or the next
        # command reads this exchange's reply as its own (a wrong ticket).  redis-py's Sentinel connection does not
        # disconnect on a timeout by itself; the pool reconnects on next use.
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise
    finally:
        pool.release(conn)


def _await_reply(conn: Connection) -> None:
    """On the asyncio milter engine's loop: let other mail run until the reply arrives (postroom.coop); elsewhere
    nothing, and the read blocks.  Out of time, the same error a blocking read gives, so the caller drops the
    connection whose reply is still to come."""
    if not coop.in_call():
        return
    # A reply may already sit in the parser's buffer (WAIT's reply read in one go with the script's), where the
    # socket would never turn readable for it.
    if conn.can_read(timeout=0):
        return
    sock = getattr(conn, "_sock", None)  # redis-py's socket; None before connecting (the send connects)
    if sock is not None and not coop.wait_readable(sock, conn.socket_timeout):
        raise redis.exceptions.TimeoutError("Timeout reading from socket")


def _first_allowed(
    mailbox: str, candidates: list[tuple[int, bool]], read: Mapping[int, tuple[dict[str, str], bool]]
) -> Ticket | None:
    """The ticket of the newest reference this mail may follow: an undisputed one, or a disputed one whose ticket a
    sender of this mail takes part in."""
    for number, disputed in candidates:
        h, takes_part = read[number]
        if h and (takes_part or not disputed):
            return ticket_from_hash(mailbox, number, h)
    return None


def _hash(reply: Any) -> dict[str, str]:
    """A hash as a dict: HGETALL's reply (a flat list of fields and values in RESP2, a map in RESP3), or a script's
    flat list of fields and values."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


class UnconfirmedWrite(redis.exceptions.RedisError):
    """The script ran on the primary, but fewer replicas than ``[redis] confirm_replicas`` have it: a failover now
    could lose it, so its result is not used (the failure policy applies, as when Redis is unreachable)."""


class RedisStore:
    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        key_prefix: str = "postroom",
        message_index_days: int = 400,
        *,
        confirm_replicas: int = 0,
        confirm_timeout: float = 1.0,
    ) -> None:
        self._r = client
        self._prefix = key_prefix
        self._ttl = message_index_days * 86400
        self._open = client.register_script(scripts.with_owner_index(scripts.OPEN))
        self._touch = client.register_script(scripts.TOUCH)
        self._assign = client.register_script(scripts.with_owner_index(scripts.ASSIGN))
        self._claim = client.register_script(scripts.with_owner_index(scripts.CLAIM))
        self._update = client.register_script(scripts.with_owner_index(scripts.UPDATE))
        # confirm_replicas: each write script is followed by WAIT in the same round trip (see UnconfirmedWrite).
        self._run = _ScriptRunner(client, confirm_replicas, max(1, int(confirm_timeout * 1000)))
        self.guard = EpochGuard(client, key_prefix)

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str, message_index_days: int, timeout: float) -> RedisStore:
        watch = RestartWatch()
        store = cls(connect(url, timeout=timeout, on_connect=watch), key_prefix, message_index_days)
        watch.listen(store.guard.forget)
        return store

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The client (and so the connection pool) this store uses; the assignment state shares it."""
        return self._r

    # -- keys: one hash tag per mailbox --

    def base(self, mailbox: str) -> str:
        return keyspace.key_base(self._prefix, mailbox)

    def ticket_key(self, mailbox: str, number: int) -> str:
        return keyspace.ticket_key(self._prefix, mailbox, number)

    def participants_key(self, mailbox: str, number: int) -> str:
        return keyspace.participants_key(self._prefix, mailbox, number)

    def message_key(self, mailbox: str, message_id: str) -> str:
        return keyspace.message_key(self._prefix, mailbox, message_id)

    def counter_key(self, mailbox: str) -> str:
        return keyspace.counter_key(self._prefix, mailbox)

    def _at(self, mailbox: str) -> redis.Redis:
        """Where the mailbox's keys are (one node of a Cluster: they share a hash tag)."""
        return self._run.node(self.counter_key(mailbox))

    # -- operations --

    def ping(self) -> None:
        try:
            self._r.ping()  # Cluster: every node
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc

    def lookup(self, mailbox: str, message_ids: list[str], numbers: list[int], senders: list[str]) -> Lookup:
        try:
            return self._lookup(mailbox, message_ids, numbers, senders)
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc

    def _lookup(self, mailbox: str, message_ids: list[str], numbers: list[int], senders: list[str]) -> Lookup:
        if not (message_ids or numbers):
            return Lookup()  # a new conversation (most customer mail): nothing to read
        commands: list[tuple[str | int, ...]] = []
        if message_ids:
            commands.append(("MGET", *(self.message_key(mailbox, m) for m in message_ids)))
            commands.append(("MGET", *(keyspace.disputed_key(self._prefix, mailbox, m) for m in message_ids)))
        for n in numbers:
            commands.append(("HGETALL", self.ticket_key(mailbox, n)))
            commands.append(("SMISMEMBER", self.participants_key(mailbox, n), *(senders or [""])))
        results = self._run.read(self.counter_key(mailbox), *commands)
        found = Lookup()
        pos = 0
        candidates: list[tuple[int, bool]] = []
        if message_ids:
            candidates = reference_candidates(results[0], results[1])
            pos = 2
        read: dict[int, tuple[dict[str, str], bool]] = {}  # number -> (its hash, a sender takes part)
        for n in numbers:
            h, known = _hash(results[pos]), any(results[pos + 1])
            pos += 2
            read[n] = (h, known)
            if h:
                found.by_token.append(Candidate(ticket_from_hash(mailbox, n, h), known))
        # A reply whose subject token names its ticket (most customers' replies) has it read already.
        unread = [(number, disputed) for number, disputed in candidates if number not in read]
        if unread:
            read.update(self._read_tickets(mailbox, unread, senders))
        if candidates:
            found.by_reference = _first_allowed(mailbox, candidates, read)
        return found

    def _read_tickets(
        self, mailbox: str, candidates: list[tuple[int, bool]], senders: list[str]
    ) -> dict[int, tuple[dict[str, str], bool]]:
        """These tickets' hashes, and for a disputed one whether a sender takes part in it."""
        commands: list[tuple[str | int, ...]] = []
        for number, disputed in candidates:
            commands.append(("HGETALL", self.ticket_key(mailbox, number)))
            if disputed:
                commands.append(("SMISMEMBER", self.participants_key(mailbox, number), *(senders or [""])))
        results = iter(self._run.read(self.counter_key(mailbox), *commands))
        read: dict[int, tuple[dict[str, str], bool]] = {}
        for number, disputed in candidates:
            h = _hash(next(results))
            read[number] = (h, any(next(results)) if disputed else False)
        return read

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
            "tags": tags_text(new.tags),
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
            counter = self.counter_key(mailbox)

            def check() -> None:
                if self.guard.needs_check(mailbox):
                    self.guard.check(mailbox, counter)

            try:
                reply = cast(list[Any], self._run(self._open, [counter], args, check))
            except redis.exceptions.ResponseError as exc:
                if not is_no_epoch(exc):
                    raise
                self.guard.forget()
                self.guard.check(mailbox, self.counter_key(mailbox))
                reply = cast(list[Any], self._run(self._open, [self.counter_key(mailbox)], args))
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        except HistoryUnavailable as exc:
            raise StoreUnavailable(f"Redis lost its data and the history cannot tell the last number: {exc}") from exc
        number = int(reply[0])
        self.guard.issued(mailbox, number)
        if len(reply) > 1:
            flat = reply[1]
            return ticket_from_hash(mailbox, number, _hash(flat)), False
        return ticket_from_hash(mailbox, number, fields), True

    def touch(
        self, mailbox: str, number: int, message_ids: Iterable[str], participants: Iterable[str], now: float
    ) -> Ticket:
        parts = list(participants)
        ids = list(message_ids)
        args: list[str | int] = [self._ttl, repr(now), len(parts), *parts, number, self.base(mailbox), *ids]
        keys = [self.ticket_key(mailbox, number), self.participants_key(mailbox, number)]
        keys += [self.message_key(mailbox, m) for m in ids]
        try:
            flat = self._run(self._touch, keys, args)
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        if not flat:
            raise StoreUnavailable(f"ticket {mailbox} #{number} vanished from Redis")
        h = _hash(flat)
        return ticket_from_hash(mailbox, number, h)

    def assign(self, mailbox: str, number: int, owner: str, now: float) -> Ticket:
        """Give the ticket to ``owner`` (a login, "" to release); raises KeyError for an unknown ticket."""
        state = "open" if owner else "new"
        try:
            flat = self._run(self._assign, [self.ticket_key(mailbox, number)], [owner, state, repr(now)])
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        if not flat:
            raise KeyError(f"{mailbox} #{number}")
        return ticket_from_hash(mailbox, number, _hash(flat))

    def claim(self, mailbox: str, number: int, login: str, now: float, *, force: bool = False) -> Claim:
        """Atomically make ``login`` the owner unless another agent owns the ticket (``force`` takes it over)."""
        try:
            flat = self._run(self._claim, [self.ticket_key(mailbox, number)], [login, "1" if force else "0", repr(now)])
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        if not flat:
            raise KeyError(f"{mailbox} #{number}")
        h = _hash(flat)
        return Claim(
            won=h.pop("_won") == "1",
            previous_owner=h.pop("_previous"),
            ticket=ticket_from_hash(mailbox, number, h),
            owned_since=float(h.get("owned_since") or h.get("created") or 0),
        )

    def update(self, mailbox: str, number: int, changes: Changes, now: float) -> Ticket:
        """Apply an agent's changes in one step; raises KeyError for an unknown ticket."""
        ticket = self._update_ticket(mailbox, number, changes, now, "")
        assert ticket is not None  # no condition: always applied
        return ticket

    def update_unless_touched(
        self, mailbox: str, number: int, changes: Changes, now: float, updated: float
    ) -> Ticket | None:
        """Apply the changes only if the ticket was not touched since ``updated`` (its time then); None if it was."""
        return self._update_ticket(mailbox, number, changes, now, repr(updated))

    def _update_ticket(self, mailbox: str, number: int, changes: Changes, now: float, if_updated: str) -> Ticket | None:
        args: list[str | int] = [changes.owner, changes.state, changes.priority, repr(now), if_updated]
        args += [len(changes.add_tags), *changes.add_tags, *changes.remove_tags]
        try:
            flat = self._run(self._update, [self.ticket_key(mailbox, number)], args)
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        if not flat:
            raise KeyError(f"{mailbox} #{number}")
        if flat == "CHANGED":
            return None
        return ticket_from_hash(mailbox, number, _hash(flat))

    def away_key(self, mailbox: str, login: str) -> str:
        # One name for the flag, shared with the rules' assignment (which skips absent agents).
        return keyspace.away_key(self._prefix, mailbox, login)

    @contextlib.contextmanager
    def sweeping(self, mailbox: str, seconds: float = 600.0) -> Iterator[bool]:
        """Hold the mailbox's sweep lock while the block runs; yields False when another sweep holds it.

        redis-py's Lock: SET NX with an expiry (a sweep that dies frees the mailbox after ``seconds``) and a release
        that deletes only our own token.  Raises StoreUnavailable when Redis does not answer.
        """
        lock = self._at(mailbox).lock(keyspace.sweep_lock_key(self._prefix, mailbox), timeout=seconds, blocking=False)
        try:
            held = bool(lock.acquire())
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        try:
            yield held
        finally:
            if held:
                with contextlib.suppress(redis.exceptions.RedisError):  # LockError too: it expired, it is free
                    lock.release()

    def set_away(self, mailbox: str, login: str, until: float | None, now: float) -> None:
        """Mark an agent absent for a mailbox, until a time (the key expires then) or until #back."""
        try:
            if until is not None:
                self._at(mailbox).set(self.away_key(mailbox, login), repr(until), exat=int(until))
            else:
                self._at(mailbox).set(self.away_key(mailbox, login), "")
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc

    def clear_away(self, mailbox: str, login: str) -> None:
        try:
            self._at(mailbox).delete(self.away_key(mailbox, login))
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc

    def away(self, mailbox: str, logins: Iterable[str]) -> set[str]:
        """Which of these agents are absent from this mailbox now."""
        names = list(logins)
        if not names:
            return set()
        try:
            flags = self._at(mailbox).mget([self.away_key(mailbox, n) for n in names])
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        return {n for n, f in zip(names, flags, strict=True) if f is not None}

    def tickets(self, mailbox: str) -> list[Ticket]:
        """Every ticket of a mailbox, newest first: admin and demo listings, and the owner index's one catch-up per
        mailbox after an upgrade; the mail path otherwise never walks every ticket."""
        try:
            node = self._at(mailbox)
            last = int(cast(str, node.get(self.counter_key(mailbox))) or 0)
            pipe = node.pipeline(transaction=False)
            for n in range(last, 0, -1):
                pipe.hgetall(self.ticket_key(mailbox, n))
            hashes = pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        return [ticket_from_hash(mailbox, last - i, h) for i, h in enumerate(hashes) if h]

    def owned(self, mailbox: str, login: str) -> list[Ticket]:
        """``login``'s open tickets (owned and not closed), oldest first, read from the owner index: the cost
        grows with the agent's tickets, not with the mailbox's."""
        try:
            self._index_owners_once(mailbox)
            node = self._at(mailbox)
            numbers = sorted(
                int(n) for n in cast(set[str], node.smembers(keyspace.owned_key(self._prefix, mailbox, login)))
            )
            pipe = node.pipeline(transaction=False)
            for n in numbers:
                pipe.hgetall(self.ticket_key(mailbox, n))
            hashes = pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        found = [ticket_from_hash(mailbox, n, h) for n, h in zip(numbers, hashes, strict=True) if h]
        # The scripts keep the index exact; the check only guards against a ticket deleted by hand.
        return [t for t in found if t.owner == login and t.state != "closed"]

    def _index_owners_once(self, mailbox: str) -> None:
        # Tickets opened before the owner index existed are not in it: the first read after an upgrade walks the
        # mailbox's tickets once and adds them; later reads find the flag and skip this.
        flag = keyspace.owned_indexed_key(self._prefix, mailbox)
        node = self._at(mailbox)
        if node.exists(flag):
            return
        pipe = node.pipeline(transaction=False)
        for t in self.tickets(mailbox):
            if t.owner and t.state != "closed":
                pipe.sadd(keyspace.owned_key(self._prefix, mailbox, t.owner), t.number)
        pipe.set(flag, "1")
        pipe.execute()

    def ticket(self, mailbox: str, number: int) -> Ticket | None:
        try:
            h = cast(dict[str, str], self._at(mailbox).hgetall(self.ticket_key(mailbox, number)))
        except redis.exceptions.RedisError as exc:
            raise StoreUnavailable(redis_connect.reason(exc)) from exc
        return ticket_from_hash(mailbox, number, h) if h else None


def reference_candidates(numbers: Sequence[str | None], disputed: Sequence[str | None]) -> list[tuple[int, bool]]:
    """(ticket, disputed) for the indexed references, newest first, up to the first undisputed one: the newest
    reference is the most specific one (a reply to a forwarded split names the new ticket)."""
    out: list[tuple[int, bool]] = []
    for value, mark in zip(reversed(numbers), reversed(disputed), strict=True):
        if value:
            out.append((int(value), bool(mark)))
            if not mark:
                break
    return out


def now() -> float:
    return time.time()
