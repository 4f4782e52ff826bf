"""An empty pymilter milter: the baseline that bench/inbound.py compares postroom against.

It implements the same callbacks as postroom's adapter (src/postroom/milter/adapter.py) with the same action
flags and ``@Milter.noreply`` marks, except on ``body``: postroom answers the first body chunk (SKIP when nothing
reads the body of a customer's mail, so Postfix sends no more of it), while this milter takes every chunk without
an answer, the cheapest way for a milter that keeps the body.  It keeps no state and decides nothing: every mail
is accepted unchanged at end of message.

Usage: ``python bench/empty_milter.py /path/to/milter.sock`` (or ``unix:/path``); runs until SIGTERM/SIGINT and
then prints how many messages it accepted, which the benchmark checks against what it sent.
"""

from __future__ import annotations

import os
import sys
import threading
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


class _Options:
    edits = False  # --edits: make postroom's header edits (set once before the milter starts)


_options = _Options()


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--edits":
        _options.edits = True
        argv = argv[1:]
    if len(argv) != 1:
        print("usage: empty_milter.py [--edits] SOCKET_PATH", file=sys.stderr)
        return 2
    spec = argv[0] if argv[0].startswith(("unix:", "local:", "inet:", "inet6:")) else f"unix:{argv[0]}"
    # Postfix's smtpd runs as another user than the benchmark (root): the socket must be writable for it.
    os.umask(0)
    Milter.factory = EmptyMilter
    Milter.set_flags(ACTION_FLAGS)
    print(f"empty milter listening on {spec}", file=sys.stderr, flush=True)
    Milter.runmilter("empty", spec, TIMEOUT_SECONDS)
    print(f"empty milter stopped; accepted {_accepted} messages", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
