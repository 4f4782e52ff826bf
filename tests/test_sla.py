"""The business-hours clock and the due times read from a ticket's history."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from postroom import sla
from postroom.config import HoursConfig
from postroom.timeline import Event, Timeline

from .slafix import HOURS, sla_config

UTC = dt.UTC
CLOCK = sla.Clock(HoursConfig(**HOURS, holidays=["2026-11-26"]))


def t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_business_time_skips_nights_weekends_and_holidays() -> None:
    assert CLOCK.add(t("2026-11-23T10:00"), 120) == t("2026-11-23T12:00")
    assert CLOCK.add(t("2026-11-23T16:00"), 120) == t("2026-11-24T10:00")  # overnight
    assert CLOCK.add(t("2026-11-27T16:30"), 60) == t("2026-11-30T09:30")  # Friday to Monday
    assert CLOCK.add(t("2026-11-25T16:00"), 120) == t("2026-11-27T10:00")  # Thursday 26th is a holiday
    assert CLOCK.add(t("2026-11-28T12:00"), 1) == t("2026-11-30T09:01")  # from a closed Saturday
    assert CLOCK.between(t("2026-11-23T16:00"), t("2026-11-24T10:30")) == 150


def test_time_zone_and_daylight_saving_follow_the_opening_hours() -> None:
    berlin = sla.Clock(HoursConfig(timezone="Europe/Berlin", monday="08:00-17:00", tuesday="08:00-17:00"))
    # 2026-03-30 is the Monday after the change to summer time: 08:00 Berlin is 06:00 UTC.
    assert berlin.add(t("2026-03-30T05:00"), 60) == t("2026-03-30T07:00")
    assert berlin.add(t("2026-01-05T06:00"), 60) == t("2026-01-05T08:00")


def test_no_opening_hours_means_the_clock_always_runs() -> None:
    always = sla.Clock(HoursConfig())
    assert always.add(t("2026-11-28T23:00"), 90) == t("2026-11-29T00:30")


@given(
    st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2027, 12, 31)),
    st.integers(min_value=0, max_value=60 * 24 * 20),
)
def test_add_and_between_agree(start: dt.datetime, minutes: int) -> None:
    begin = start.replace(tzinfo=UTC, second=0, microsecond=0)
    end = CLOCK.add(begin, minutes)
    assert CLOCK.between(begin, end) == minutes
    assert end >= begin


def _timeline(*events: tuple[str, str], state: str = "open", priority: str = "normal") -> Timeline:
    tl = Timeline("support@example.test", 1, "c@x", "s", "meier", state, priority, t(events[0][1]))
    tl.events = [Event(kind, "", "", t(when)) for kind, when in events]
    return tl


def test_response_targets_come_from_the_history() -> None:
    config = sla_config()
    box = config.mailboxes["support"]
    clock = sla.Clock(config.hours)
    tl = _timeline(
        ("opened", "2026-11-23T16:00"),
        ("followup", "2026-11-23T16:30"),  # a second mail before the answer: still one target, from the first
        ("reply", "2026-11-24T10:30"),
        ("followup", "2026-11-24T12:00"),
    )
    dues = sla.dues(config, box, tl, clock)
    assert [(d.kind, d.at, d.met) for d in dues] == [
        ("first_response", t("2026-11-24T10:00"), t("2026-11-24T10:30")),
        ("next_response", t("2026-11-24T16:00"), None),
        ("resolution", t("2026-11-25T16:00"), None),
    ]
    assert dues[0].breached(t("2026-11-24T11:00"))
    assert not dues[1].breached(t("2026-11-24T15:59"))
    # Waiting on the customer: no clock runs.
    tl.state = "pending"
    assert sla.open_dues(config, box, tl, clock) == []


def test_answer_due_is_the_header_value() -> None:
    config = sla_config()
    box = config.mailboxes["support"]
    due = sla.answer_due(config, box, "high", True, t("2026-11-27T16:30").timestamp())
    assert due == t("2026-11-30T09:30")
    assert sla.answer_due(config, box, "high", False, 0) is None  # "high" has no next-response target
