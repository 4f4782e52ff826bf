"""Figures of a period from the history: what ``postroom stats`` prints and the digests mail.

Times are business minutes (the ``[hours]`` clock, as the SLA targets are).  The median is the middle value (the
mean of the two middle ones for an even count); the 90th percentile is the nearest-rank one, a value that
occurred: the smallest that at least 90% of the values do not exceed.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from postroom import sla
from postroom.config import Config, MailboxConfig
from postroom.timeline import Timeline

GROUPS = ("mailbox", "agent", "tag", "priority")
UNASSIGNED = "unassigned"


@dataclass
class Figures:
    opened: int = 0
    closed: int = 0
    backlog: int = 0  # open at the end of the period
    unassigned: int = 0  # of the backlog, without owner
    overdue: int = 0  # of the backlog, past a due time at the end
    breaches: int = 0  # due times within the period that were missed
    first_response_median: float | None = None
    first_response_p90: float | None = None
    resolution_median: float | None = None
    resolution_p90: float | None = None
    _first: list[float] = field(default_factory=list, repr=False)
    _resolution: list[float] = field(default_factory=list, repr=False)

    def add(self, other: Figures) -> None:
        for name in ("opened", "closed", "backlog", "unassigned", "overdue", "breaches"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self._first += other._first
        self._resolution += other._resolution

    def finish(self) -> Figures:
        self.first_response_median, self.first_response_p90 = _summary(self._first)
        self.resolution_median, self.resolution_p90 = _summary(self._resolution)
        return self

    def as_dict(self) -> dict[str, float | int | None]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _summary(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return round(statistics.median(values), 1), round(percentile(values, 0.9), 1)


@dataclass(frozen=True)
class Period:
    start: dt.datetime
    end: dt.datetime

    def __contains__(self, moment: object) -> bool:
        return isinstance(moment, dt.datetime) and self.start <= moment < self.end

    def previous(self) -> Period:
        return Period(self.start - (self.end - self.start), self.start)


Tags = Mapping[tuple[str, int], tuple[str, ...]]


def _keys(t: Timeline, box: MailboxConfig | None, tags: Tags) -> dict[str, list[str]]:
    return {
        "mailbox": [box.tag if box else t.mailbox],
        "agent": [t.owner or UNASSIGNED],
        # Redis's tags where it has the ticket (the newest), else the history's.
        "tag": list(tags.get((t.mailbox, t.number), t.tags)),
        "priority": [t.priority],
    }


def _one(config: Config, box: MailboxConfig | None, t: Timeline, p: Period, clock: sla.Clock) -> Figures:
    """One ticket's share of the figures, computed once and added to the total and to each of its groups."""
    f = Figures()
    f.opened += t.created in p
    closed = t.closed_at
    f.closed += closed in p and t.state_at(p.end) == "closed"
    open_at_end = t.created < p.end and t.state_at(p.end) != "closed"
    dues = sla.dues(config, box, t, clock) if box is not None else []
    f.breaches += sum(1 for d in dues if d.at in p and (d.met is None or d.met > d.at))
    if open_at_end:
        f.backlog += 1
        f.unassigned += not t.owner
        f.overdue += any(d.at <= p.end and (d.met is None or d.met > p.end) for d in dues)
    f._first += [clock.between(d.since, d.met) for d in dues if d.kind == "first_response" and d.met and d.met in p]
    if closed in p and closed is not None and t.state_at(p.end) == "closed":
        f._resolution.append(clock.between(t.created, closed))
    return f


def figures(
    config: Config,
    timelines: Iterable[Timeline],
    period: Period,
    tags: Mapping[tuple[str, int], tuple[str, ...]] | None = None,
) -> dict[str, object]:
    """The figures of the period: "total" and one table per group (mailbox, agent, tag, priority)."""
    clock = sla.Clock(config.hours)
    boxes = {b.address: b for b in config.mailboxes.values()}
    total = Figures()
    groups: dict[str, dict[str, Figures]] = {g: {} for g in GROUPS}
    for t in timelines:
        if t.created >= period.end:
            continue
        box = boxes.get(t.mailbox)
        share = _one(config, box, t, period, clock)
        total.add(share)
        for group, keys in _keys(t, box, tags or {}).items():
            for key in keys:
                groups[group].setdefault(key, Figures()).add(share)
    return {
        "period": {"start": sla.iso(period.start), "end": sla.iso(period.end)},
        "total": total.finish().as_dict(),
        **{g: {k: f.finish().as_dict() for k, f in sorted(table.items())} for g, table in groups.items()},
    }


def as_csv(result: Mapping[str, object]) -> str:
    """One row per group and key ("total" first), one column per figure."""
    out = io.StringIO()
    names = list(Figures().as_dict())
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["group", "key", *names])
    total = result["total"]
    assert isinstance(total, dict)
    writer.writerow(["total", "", *(_cell(total[n]) for n in names)])
    for group in GROUPS:
        table = result[group]
        assert isinstance(table, dict)
        for key, row in table.items():
            writer.writerow([group, key, *(_cell(row[n]) for n in names)])
    return out.getvalue()


def _cell(value: object) -> str:
    return "" if value is None else str(value)
