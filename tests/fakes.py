"""An in-memory TicketStore for pure pipeline unit tests (the real one is tested against a real Redis)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from postroom.store import Candidate, Claim, Lookup, NewTicket, StoreUnavailable, Ticket


class MemoryStore:
    def __init__(self) -> None:
        self.tickets: dict[tuple[str, int], Ticket] = {}
        self.participants: dict[tuple[str, int], set[str]] = {}
        self.index: dict[tuple[str, str], int] = {}
        self.seq: dict[str, int] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("connection refused (fake)")

    def lookup(self, mailbox: str, message_ids: list[str], numbers: list[int], senders: list[str]) -> Lookup:
        self._check()
        found = Lookup()
        for mid in reversed(message_ids):
            n = self.index.get((mailbox, mid))
            if n:
                found.by_reference = self.tickets[(mailbox, n)]
                break
        for n in numbers:
            t = self.tickets.get((mailbox, n))
            if t:
                known = bool(self.participants[(mailbox, n)] & set(senders))
                found.by_token.append(Candidate(t, known))
        return found

    def open(self, mailbox: str, new: NewTicket, now: float) -> Ticket:
        self._check()
        n = self.seq[mailbox] = self.seq.get(mailbox, 0) + 1
        t = Ticket(mailbox, n, new.owner, new.state, new.priority, (), new.customer, new.subject, now, now, new.linked)
        self.tickets[(mailbox, n)] = t
        self.participants[(mailbox, n)] = set(new.participants)
        for mid in new.message_ids:
            self.index[(mailbox, mid)] = n
        return t

    def touch(
        self, mailbox: str, number: int, message_ids: Iterable[str], participants: Iterable[str], now: float
    ) -> Ticket:
        self._check()
        t = self.tickets[(mailbox, number)] = replace(self.tickets[(mailbox, number)], updated=now)
        self.participants[(mailbox, number)].update(participants)
        for mid in message_ids:
            self.index[(mailbox, mid)] = number
        return t

    def assign(self, mailbox: str, number: int, owner: str) -> None:
        self.tickets[(mailbox, number)] = replace(self.tickets[(mailbox, number)], owner=owner, state="open")

    def claim(self, mailbox: str, number: int, login: str, now: float, *, force: bool = False) -> Claim:
        self._check()
        t = self.tickets[(mailbox, number)]
        previous = t.owner
        won = previous in ("", login) or force
        if won:
            t = self.tickets[(mailbox, number)] = replace(t, owner=login, state="open", updated=now)
        return Claim(won, t, previous, now if won and previous != login else t.created)
