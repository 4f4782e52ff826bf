"""An empty pymilter milter: the baseline that bench/inbound.py compares postroom against.

It implements the same callbacks as postroom's adapter (src/postroom/milter/adapter.py) with the same action
flags and ``@Milter.noreply`` marks, except on ``body``: postroom answers the first body chunk (SKIP when nothing
reads the body of a customer's mail, so Postfix sends no more of it), while this milter takes every chunk without
an answer, the cheapest way for a milter that keeps the body.  It keeps no state and decides nothing: every mail
is accepted unchanged at end of message.

With ``--floor REDIS_URL HISTORY_FILE`` it is the floor of any milter that tickets mail in Redis, the least a
ticketing milter must do per mail: at end of message one Lua script (a new number from the mailbox's counter, the
ticket's hash, the Message-ID index entry, as postroom's open script writes them, without its threading, owner
index or checks) sent on a pooled redis-py connection without redis-py's command wrappers, the five header edits,
and one JSON line of history appended to a file in the same thread (no database, no log line, no config, no
rules).  bench/inbound.py's ``floor`` configuration: how close to the empty milter postroom could come at all.

Usage: ``python bench/empty_milter.py [--edits | --floor REDIS_URL HISTORY_FILE] /path/to/milter.sock`` (or
``unix:/path``); runs until SIGTERM/SIGINT and then prints how many messages it accepted, which the benchmark checks
against what it sent.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import Milter

# The same actions postroom negotiates (header, recipient, sender and body edits).
ACTION_FLAGS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.ADDRCPT | Milter.DELRCPT | Milter.CHGFROM | Milter.MODBODY
TIMEOUT_SECONDS = 600  # postroom's default milter.timeout_seconds

_count_lock = threading.Lock()
_accepted = 0


def new_ticket_headers(number: int) -> list[tuple[str, str]]:
    """What postroom asks of Postfix for a new ticket of a mail without a Subject (smtp-source's mail)."""
    fields = (("Ticket", number), ("Owner", "unassigned"), ("State", "new"), ("Priority", "normal"))
    return [("Subject", f"[Support #{number}]"), *((f"X-Postroom-{name}", f"{value} (x)") for name, value in fields)]


# KEYS: counter, ticket hash, Message-ID index entry; ARGV: Message-ID, sender, now, index TTL.
FLOOR_OPEN = """#!lua
local n = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2] .. n, 'state', 'new', 'owner', '', 'customer', ARGV[2], 'opened', ARGV[3])
redis.call('SET', KEYS[3] .. ARGV[1], n, 'EX', ARGV[4])
return n
"""
FLOOR_MAILBOX = "support@example.test"
FLOOR_KEYS = (f"floor:{{{FLOOR_MAILBOX}}}:seq", f"floor:{{{FLOOR_MAILBOX}}}:t:", f"floor:{{{FLOOR_MAILBOX}}}:mid:")


class EmptyMilter(Milter.Base):  # type: ignore[misc]
    @Milter.noreply  # type: ignore[untyped-decorator]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def envfrom(self, mail_from: str, *params: str) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envrcpt(self, rcpt: str, *params: str) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    @Milter.noreply  # type: ignore[untyped-decorator]
    def header(self, name: str, value: str) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    @Milter.noreply  # type: ignore[untyped-decorator]
    def body(self, chunk: bytes) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def eom(self) -> int:
        global _accepted  # noqa: PLW0603 - one counter for the whole process, read at exit
        with _count_lock:
            _accepted += 1
            number = _accepted
        if _options.edits:
            for name, value in new_ticket_headers(number):
                self.addheader(name, value)
        return Milter.ACCEPT  # type: ignore[no-any-return]

    def abort(self) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def close(self) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]


class FloorMilter(EmptyMilter):
    """--floor: the sender and Message-ID kept, a ticket opened in Redis at end of message."""

    def __init__(self) -> None:
        self.sender = ""
        self.message_id = ""

    def envfrom(self, mail_from: str, *params: str) -> int:
        self.sender = mail_from
        return Milter.CONTINUE  # type: ignore[no-any-return]

    @Milter.noreply  # type: ignore[untyped-decorator]
    def header(self, name: str, value: str) -> int:
        if name.lower() == "message-id":
            self.message_id = value.strip()
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def eom(self) -> int:
        global _accepted  # noqa: PLW0603 - as in EmptyMilter.eom
        assert _options.floor is not None
        number = _options.floor.open(self.message_id, self.sender)
        with _count_lock:
            _accepted += 1
        for name, value in new_ticket_headers(number):
            self.addheader(name, value)
        return Milter.ACCEPT  # type: ignore[no-any-return]


class Floor:
    """--floor: one script per mail on redis-py's pool, one history line per mail (see the module docstring)."""

    def __init__(self, url: str, history: str) -> None:
        import redis  # noqa: PLC0415 - only here: the empty milter's memory stays that of pymilter alone

        client = redis.Redis.from_url(url, decode_responses=True)
        self.pool = client.connection_pool
        self.sha = str(client.script_load(FLOOR_OPEN))
        self.history = os.open(history, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def open(self, message_id: str, sender: str) -> int:
        now = time.time()
        conn = self.pool.get_connection()
        try:
            conn.send_command("EVALSHA", self.sha, 3, *FLOOR_KEYS, message_id, sender, int(now), 86400)  # type: ignore[no-untyped-call]
            number = int(conn.read_response())
        except BaseException:
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise
        finally:
            self.pool.release(conn)
        record = {"mailbox": FLOOR_MAILBOX, "ticket": number, "message_id": message_id, "from": sender, "at": now}
        os.write(self.history, (json.dumps(record) + "\n").encode())
        return number


class _Options:
    edits = False  # --edits: make postroom's header edits (set once before the milter starts)
    floor: Floor | None = None  # --floor: a ticket per mail (FloorMilter), with the header edits


_options = _Options()


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--edits":
        _options.edits = True
        argv = argv[1:]
    elif argv and argv[0] == "--floor" and len(argv) == 4:
        _options.floor = Floor(argv[1], argv[2])
        argv = argv[3:]
    if len(argv) != 1:
        print("usage: empty_milter.py [--edits | --floor REDIS_URL HISTORY_FILE] SOCKET_PATH", file=sys.stderr)
        return 2
    spec = argv[0] if argv[0].startswith(("unix:", "local:", "inet:", "inet6:")) else f"unix:{argv[0]}"
    # Postfix's smtpd runs as another user than the benchmark (root): the socket must be writable for it.
    os.umask(0)
    Milter.factory = EmptyMilter if _options.floor is None else FloorMilter
    Milter.set_flags(ACTION_FLAGS)
    print(f"empty milter listening on {spec}", file=sys.stderr, flush=True)
    Milter.runmilter("empty", spec, TIMEOUT_SECONDS)
    print(f"empty milter stopped; accepted {_accepted} messages", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
