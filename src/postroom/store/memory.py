"""The stores in dicts: :class:`MemoryStore` (a :class:`postroom.tickets.TicketStore`) and
:class:`MemoryAssignmentState`, for unit tests and the ``postroom rules test`` dry run.

They behave as the Redis adapters do (tests/test_store_contract.py runs the same checks on both), minus the
atomicity that a single thread gets for free.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from postroom.tickets import KEEP, Candidate, Changes, Claim, Lookup, NewTicket, StoreUnavailable, Ticket


class MemoryStore:
    """A ticket store in dicts; ``down = True`` makes every call raise StoreUnavailable, as a dead Redis does."""

    def __init__(self, first_number: int = 1) -> None:
        self._first = first_number  # the dry run of ``rules test`` numbers its one ticket 0
        self.ticket_map: dict[tuple[str, int], Ticket] = {}
        self.participants: dict[tuple[str, int], set[str]] = {}
        self.index: dict[tuple[str, str], int] = {}
        self.disputed: set[tuple[str, str]] = set()
        self.seq: dict[str, int] = {}
        self.owned_since: dict[tuple[str, int], float] = {}  # as the Redis hash's owned_since
        self.down = False
        self.absent: set[tuple[str, str]] = set()

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("connection refused (fake)")

    def lookup(self, mailbox: str, message_ids: list[str], numbers: list[int], senders: list[str]) -> Lookup:
        self._check()
        found = Lookup()
        for mid in reversed(message_ids):
            n = self.index.get((mailbox, mid))
            if not n:
                continue
            if (mailbox, mid) in self.disputed and not self.participants[(mailbox, n)] & set(senders):
                continue  # someone else's Message-ID too: only its ticket's own people follow it
            found.by_reference = self.ticket_map[(mailbox, n)]
            break
        for n in numbers:
            t = self.ticket_map.get((mailbox, n))
            if t:
                known = bool(self.participants[(mailbox, n)] & set(senders))
                found.by_token.append(Candidate(t, known))
        return found

    def open_unless_seen(self, mailbox: str, new: NewTicket, message_id: str, now: float) -> tuple[Ticket, bool]:
        self._check()
        seen = self.index.get((mailbox, message_id)) if message_id else None
        if seen and self.participants[(mailbox, seen)] & set(new.participants):
            return self.ticket_map[(mailbox, seen)], False
        return self.open(mailbox, new, now), True

    def open(self, mailbox: str, new: NewTicket, now: float) -> Ticket:
        self._check()
        n = self.seq[mailbox] = self.seq.get(mailbox, self._first - 1) + 1
        t = Ticket(
            mailbox, n, new.owner, new.state, new.priority, new.tags, new.customer, new.subject, now, now, new.linked
        )
        self.ticket_map[(mailbox, n)] = t
        if new.owner:
            self.owned_since[(mailbox, n)] = now
        self.participants[(mailbox, n)] = set(new.participants)
        for mid in new.message_ids:
            self._index(mailbox, mid, n, new.participants)
        return t

    def _index(self, mailbox: str, mid: str, number: int, senders: Iterable[str]) -> None:
        # As the store's scripts: the first ticket keeps an ID; a stranger's reuse marks it disputed.
        current = self.index.get((mailbox, mid))
        if current is None or current == number:
            self.index[(mailbox, mid)] = number
        elif not self.participants[(mailbox, current)] & set(senders):
            self.disputed.add((mailbox, mid))

    def touch(
        self, mailbox: str, number: int, message_ids: Iterable[str], participants: Iterable[str], now: float
    ) -> Ticket:
        self._check()
        t = self.ticket_map[(mailbox, number)] = replace(self.ticket_map[(mailbox, number)], updated=now)
        senders = list(participants)
        self.participants[(mailbox, number)].update(senders)
        for mid in message_ids:
            self._index(mailbox, mid, number, senders)
        return t

    def assign(self, mailbox: str, number: int, owner: str, now: float) -> Ticket:
        """Give the ticket to ``owner`` (a login, "" to release); raises KeyError for an unknown ticket."""
        self._check()
        if (mailbox, number) not in self.ticket_map:
            raise KeyError(f"{mailbox} #{number}")
        t = replace(self.ticket_map[(mailbox, number)], owner=owner, state="open" if owner else "new", updated=now)
        self.ticket_map[(mailbox, number)] = t
        return t

    def claim(self, mailbox: str, number: int, login: str, now: float, *, force: bool = False) -> Claim:
        self._check()
        t = self.ticket_map[(mailbox, number)]
        previous = t.owner
        won = previous in ("", login) or force
        if won:
            t = self.ticket_map[(mailbox, number)] = replace(t, owner=login, state="open", updated=now)
            if previous != login:
                self.owned_since[(mailbox, number)] = now
        return Claim(won, t, previous, self.owned_since.get((mailbox, number)) or t.created)

    def update(self, mailbox: str, number: int, changes: Changes, now: float) -> Ticket:
        self._check()
        t = self.ticket_map[(mailbox, number)]
        if changes.owner not in (KEEP, t.owner):
            self.owned_since[(mailbox, number)] = now
        tags = [x for x in t.tags if x not in changes.remove_tags]
        tags += [x for x in dict.fromkeys(changes.add_tags) if x not in tags and x not in changes.remove_tags]
        t = replace(
            t,
            owner=t.owner if changes.owner == KEEP else changes.owner,
            state=t.state if changes.state == KEEP else changes.state,
            priority=t.priority if changes.priority == KEEP else changes.priority,
            tags=tuple(tags),
            updated=now,
        )
        self.ticket_map[(mailbox, number)] = t
        return t

    def update_unless_touched(
        self, mailbox: str, number: int, changes: Changes, now: float, updated: float
    ) -> Ticket | None:
        self._check()
        if self.ticket_map[(mailbox, number)].updated != updated:
            return None
        return self.update(mailbox, number, changes, now)

    def set_away(self, mailbox: str, login: str, until: float | None, now: float) -> None:
        self._check()
        self.absent.add((mailbox, login))

    def clear_away(self, mailbox: str, login: str) -> None:
        self._check()
        self.absent.discard((mailbox, login))

    def away(self, mailbox: str, logins: Iterable[str]) -> set[str]:
        self._check()
        return {n for n in logins if (mailbox, n) in self.absent}

    def ticket(self, mailbox: str, number: int) -> Ticket | None:
        self._check()
        return self.ticket_map.get((mailbox, number))

    def owned(self, mailbox: str, login: str) -> list[Ticket]:
        # A scan: fine in a dict; the Redis store keeps an index so the mail path never walks every ticket.
        self._check()
        mine = (t for (m, _), t in self.ticket_map.items() if m == mailbox and t.owner == login)
        return sorted((t for t in mine if t.state != "closed"), key=lambda t: t.number)

    def tickets(self, mailbox: str) -> list[Ticket]:
        return sorted((t for (m, _), t in self.ticket_map.items() if m == mailbox), key=lambda t: -t.number)


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
