"""A config with opening hours, SLA targets and a lead, and a small hand-checked history, for the SLA tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from postroom.config import Config, example_config_path, load_config, parse_config
from postroom.history import make_engine, migrate, write
from postroom.tickets import Record

BOX = "support@example.test"
HOURS = {"timezone": "UTC", **{d: "09:00-17:00" for d in ("monday", "tuesday", "wednesday", "thursday", "friday")}}
SLA = {
    "normal": {"first_response": "2h", "next_response": "4h", "resolution": "16h"},
    "high": {"first_response": "1h", "resolution": "8h"},
}


def sla_config(base: Config | None = None, **changes: dict[str, Any]) -> Config:
    """``base`` (the shipped example) with Mon-Fri 09-17 UTC, the targets above and schulze as the support lead."""
    data = (base or load_config(example_config_path(), environ={})).model_dump()
    data["hours"] = {**data["hours"], **HOURS, "holidays": []}
    data["mailboxes"]["support"] |= {"sla": SLA, "leads": ["schulze"]}
    for section, values in changes.items():
        data[section] = {**data[section], **values}
    return parse_config(data, "<sla test>", environ={})


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def rec(number: int, event: str, when: str, **kw: Any) -> Record:
    kw.setdefault("customer", f"c{number}@customer.test")
    kw.setdefault("actor", kw["customer"] if event in ("opened", "followup") else kw.get("owner", ""))
    return Record(mailbox=BOX, number=number, event=event, at=at(when), **kw)


# Monday 2026-11-23 to Monday 2026-11-30 (a week of Mon-Fri 09:00-17:00 UTC).  Figures of that week, by hand:
# 1: opened Mon 10:00, meier replies 11:00 (first response 60), closed 12:00 (resolution 120).
# 2: opened Mon 16:00, meier replies Tue 10:30 (150: 60 on Monday, 90 on Tuesday; due Tue 10:00: breach),
#    customer answers Tue 12:00 and waits (next response due Tue 16:00: breach), resolution due Wed 16:00: breach.
# 3: high priority, opened Fri 16:30, nobody takes it (first response due Mon 30th 09:30: after the week).
# 4: opened Sun 22nd 20:00 (before the week) for mueller, answered Mon 09:30 (30), closed Wed 09:00 (resolution
#    960, due Tue 17:00: breach).
HISTORY = [
    rec(4, "opened", "2026-11-22T20:00", owner="mueller"),
    rec(1, "opened", "2026-11-23T10:00"),
    rec(4, "reply", "2026-11-23T09:30", owner="mueller", state="open"),
    rec(1, "reply", "2026-11-23T11:00", owner="meier", state="open"),
    rec(1, "close", "2026-11-23T12:00", owner="meier", state="closed"),
    rec(2, "opened", "2026-11-23T16:00"),
    rec(2, "reply", "2026-11-24T10:30", owner="meier", state="open"),
    rec(2, "followup", "2026-11-24T12:00", owner="meier", state="open"),
    rec(4, "close", "2026-11-25T09:00", owner="mueller", state="closed"),
    rec(3, "opened", "2026-11-27T16:30", priority="high"),
]


def write_history(url: str, records: list[Record] = HISTORY) -> None:
    migrate(url)
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        write(session, sorted(records, key=lambda r: r.at))
    engine.dispose()
