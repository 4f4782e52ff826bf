"""The SLA clock: business time from the ``[hours]`` opening hours, and the due times of a ticket's history.

A target such as "4h" is four hours of opening time: a mail at Friday 15:30 with opening hours until 16:00 and
again from Monday 08:00 is due Monday 11:30.  No opening hours at all means the clock always runs.  Due times are
computed from the history (see :mod:`postroom.timeline`), never stored, so a changed policy applies at once.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postroom.config import WEEKDAYS, Config, HoursConfig, MailboxConfig, SlaPolicy, business_minutes, parse_opening

if TYPE_CHECKING:
    # The mail path computes X-Postroom-Due from here and must not load SQL (tests/test_layers.py).
    from postroom.timeline import Timeline

# A clock with opening hours that never come (every day a holiday) must not loop for ever.
_MAX_DAYS = 3660
_DAY = dt.timedelta(days=1)

# Events that are a customer's message to the team, and those that are an agent's answer to the customer.
CUSTOMER_EVENTS = frozenset({"opened", "linked", "followup", "reopened"})
AGENT_EVENTS = frozenset({"reply", "opened_by_agent", "takeover", "rival_reply_warn", "rival_reply_allow"})


class Clock:
    """Adds and measures business time in the configured time zone, holidays closed all day."""

    def __init__(self, hours: HoursConfig) -> None:
        self.zone = zoneinfo.ZoneInfo(hours.timezone)
        self.always_open = not hours.configured()
        self._ranges = [parse_opening(getattr(hours, day)) for day in WEEKDAYS]
        self._holidays = {dt.date.fromisoformat(d) for d in hours.holidays}

    def _periods(self, start: dt.datetime) -> Iterator[tuple[dt.datetime, dt.datetime]]:
        """Opening periods (aware, local) that end after ``start``, in order."""
        day = start.astimezone(self.zone).date()
        for _ in range(_MAX_DAYS):
            if day not in self._holidays:
                for begin, end in self._ranges[day.weekday()]:
                    a = dt.datetime.combine(day, dt.time(), self.zone) + dt.timedelta(minutes=begin)
                    b = dt.datetime.combine(day, dt.time(), self.zone) + dt.timedelta(minutes=end)
                    if b > start:
                        yield max(a, start), b
            day += _DAY

    def add(self, start: dt.datetime, minutes: int) -> dt.datetime:
        """The moment ``minutes`` of opening time after ``start``."""
        if self.always_open:
            return start + dt.timedelta(minutes=minutes)
        left = dt.timedelta(minutes=minutes)
        for a, b in self._periods(start):
            if left <= b - a:
                return (a + left).astimezone(dt.UTC)
            left -= b - a
        return start + dt.timedelta(days=_MAX_DAYS)

    def between(self, start: dt.datetime, end: dt.datetime) -> float:
        """Minutes of opening time from ``start`` to ``end`` (0 when end is not later)."""
        if end <= start:
            return 0.0
        if self.always_open:
            return (end - start).total_seconds() / 60
        total = dt.timedelta()
        for a, b in self._periods(start):
            if a >= end:
                break
            total += min(b, end) - a
        return total.total_seconds() / 60


@dataclass(frozen=True)
class Due:
    """One target of a ticket: what is due, from when, by when, and when it was met (None: not yet)."""

    kind: str  # first_response | next_response | resolution
    since: dt.datetime
    at: dt.datetime
    met: dt.datetime | None

    def breached(self, now: dt.datetime) -> bool:
        return (self.met or now) > self.at


def policy(box: MailboxConfig, priority: str) -> SlaPolicy:
    """The mailbox's targets for a priority; a priority without its own falls back to "normal"."""
    return box.sla.get(priority) or box.sla.get("normal") or SlaPolicy()  # type: ignore[call-overload]


def responses(t: Timeline, pol: SlaPolicy, clock: Clock) -> list[Due]:
    """Every response target of the ticket's history, the current one last.

    A customer's first message waits for the first response; after each agent answer the next customer message
    starts a next-response target.  Several customer messages before an answer make one target, from the first.
    """
    out: list[Due] = []
    waiting: dt.datetime | None = None
    answered = False
    for e in t.events:
        if e.kind in CUSTOMER_EVENTS and waiting is None:
            waiting = e.at
        elif e.kind in AGENT_EVENTS:
            if waiting is not None:
                out += _due("next_response" if answered else "first_response", pol, clock, waiting, e.at)
            answered, waiting = True, None
    if waiting is not None and t.state != "closed":
        out += _due("next_response" if answered else "first_response", pol, clock, waiting, None)
    return out


def _due(kind: str, pol: SlaPolicy, clock: Clock, since: dt.datetime, met: dt.datetime | None) -> list[Due]:
    minutes = business_minutes(getattr(pol, kind))
    return [Due(kind, since, clock.add(since, minutes), met)] if minutes else []


def resolution(t: Timeline, pol: SlaPolicy, clock: Clock) -> list[Due]:
    """The resolution target from the ticket's creation to its last close (while it is closed)."""
    closed = t.closed_at if t.state == "closed" else None
    return _due("resolution", pol, clock, t.created, closed)


def dues(config: Config, box: MailboxConfig, t: Timeline, clock: Clock) -> list[Due]:
    pol = policy(box, t.priority)
    return [*responses(t, pol, clock), *resolution(t, pol, clock)]


def open_dues(config: Config, box: MailboxConfig, t: Timeline, clock: Clock) -> list[Due]:
    """Targets not met yet.  A pending ticket waits on the customer: none of its clocks run."""
    if t.state in ("closed", "pending"):
        return []
    return [d for d in dues(config, box, t, clock) if d.met is None]


# The mail path's clocks, by the (frozen) [hours] section they were built from; a reload brings a new section.
_clocks: dict[int, tuple[HoursConfig, Clock]] = {}


def clock_for(hours: HoursConfig) -> Clock:
    """The clock of these opening hours, built once per config load rather than once per mail (it parses seven
    weekdays' ranges and the holidays, a fair share of an inbound mail's CPU)."""
    found = _clocks.get(id(hours))
    if found is None or found[0] is not hours:
        if len(_clocks) >= 8:
            _clocks.clear()  # old configs after many reloads; the id check above makes a stale hit impossible
        found = _clocks[id(hours)] = (hours, Clock(hours))
    return found[1]


def answer_due(config: Config, box: MailboxConfig, priority: str, first: bool, now: float) -> dt.datetime | None:
    """When the answer to a customer's mail arriving ``now`` is due (the X-Postroom-Due header), or None."""
    pol = policy(box, priority)
    minutes = business_minutes(pol.first_response if first else pol.next_response)
    if not minutes:
        return None
    return clock_for(config.hours).add(dt.datetime.fromtimestamp(now, dt.UTC), minutes)


def local(config: Config, moment: dt.datetime) -> str:
    """A due time as people read it: in the opening hours' zone, to the minute."""
    return moment.astimezone(zoneinfo.ZoneInfo(config.hours.timezone)).strftime("%Y-%m-%d %H:%M %Z")


def iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
