"""What one mail writes to the history, as ``postroom tickets show`` lists it: one message row per mail, one
event per command, a refused submission as refused."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from postroom.history import make_engine, migrate, write
from postroom.history_rows import EventRow, MessageRow
from postroom.rules import MemoryAssignmentState
from postroom.store.memory import MemoryStore
from postroom.tickets import Record
from tests.test_outbound import config, open_ticket, process, reply


def stored(tmp_path: Path, records: list[Record]) -> tuple[list[tuple[str, str]], list[str]]:
    url = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    migrate(url)
    engine = make_engine(url)
    with Session(engine) as s, s.begin():
        write(s, records)
    with Session(engine) as s:
        messages = [(m.direction, m.message_id) for m in s.scalars(select(MessageRow).order_by(MessageRow.id))]
        events = list(s.scalars(select(EventRow.kind).order_by(EventRow.id)))
    engine.dispose()
    return messages, events


def test_a_reply_with_three_commands_is_one_message_and_four_events(tmp_path: Path) -> None:
    store = MemoryStore()
    open_ticket(store)
    mail = reply("meier", "#priority high\n#tag billing\n#pending\nHello Alice\n")
    out = process(mail, config(), store, 2.0, assign=MemoryAssignmentState())
    messages, events = stored(tmp_path, out.records)
    assert len(messages) == 1 and messages[0][0] == "outbound"
    assert sorted(events) == ["pending", "priority", "reply", "tag"]


def test_a_takeover_is_one_message_and_one_takeover_event(tmp_path: Path) -> None:
    store = MemoryStore()
    open_ticket(store, owner="meier")
    out = process(reply("mueller", "#takeover\nI take this.\n"), config(), store, 2.0, assign=MemoryAssignmentState())
    messages, events = stored(tmp_path, out.records)
    assert [d for d, _ in messages] == ["outbound"]
    assert events.count("takeover") == 1
    assert store.ticket_map[("support@example.test", 1)].owner == "mueller"


def test_a_refused_rival_reply_is_recorded_as_refused_not_as_sent(tmp_path: Path) -> None:
    store = MemoryStore()
    open_ticket(store, owner="meier")
    out = process(reply("mueller"), config(), store, 2.0)
    messages, events = stored(tmp_path, out.records)
    assert [d for d, _ in messages] == ["refused"]
    assert events == ["rival_refused"]
