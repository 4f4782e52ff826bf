"""The outbound path as a pure function, with the in-memory store: claims, policies, commands, #away handover."""

from __future__ import annotations

from typing import Any

import pytest

from postroom import pipeline
from postroom.config import Config, example_config_path, load_config, parse_config
from postroom.parts import Parts
from postroom.pipeline import Message, Outcome
from postroom.rules import MemoryAssignmentState
from postroom.store.memory import MemoryStore
from postroom.tickets import NewTicket, TicketStore
from postroom.verdict import Action, AddRecipient, ChangeSender, Envelope, SetHeader

SUPPORT = "support@example.test"
ALICE = "alice@customer.test"


def process(message: Message, config: Config, store: TicketStore, now: float, **parts: Any) -> Outcome:
    """The dispatcher with these parts; a test names only the parts it needs."""
    return pipeline.process(message, Parts(config, store, **parts), now)


def config(**mailbox: object) -> Config:
    data = load_config(example_config_path(), environ={}).model_dump()
    data["mailboxes"]["support"] = {**data["mailboxes"]["support"], **mailbox}
    return parse_config(data, environ={})


def reply(login: str, body: str = "Hello\n", subject: str = "Re: [Support #1] Help", to: str = ALICE) -> Message:
    headers = [
        ("From", f"{login}@example.test"),
        ("To", to),
        ("Subject", subject),
        ("Message-ID", f"<{login}-{abs(hash(body))}@example.test>"),
        ("Content-Type", "text/plain; charset=utf-8"),
    ]
    env = Envelope(mail_from=f"<{login}@example.test>", rcpts=[f"<{to}>"], queue_id="Q1", auth_login=login)
    return Message(env, headers, body=body.encode)


def open_ticket(store: MemoryStore, owner: str = "") -> None:
    store.open(
        SUPPORT, NewTicket(customer=ALICE, subject="Help", participants=(ALICE,), message_ids=(), owner=owner), 1.0
    )


def edit(out: Outcome, name: str) -> str | None:
    for e in out.verdict.edits:
        if isinstance(e, SetHeader) and e.name == name:
            return e.value
    return None


def test_first_reply_claims_and_rewrites() -> None:
    store = MemoryStore()
    open_ticket(store)
    out = process(reply("meier"), config(), store, 2.0, assign=MemoryAssignmentState())
    assert out.verdict.action is Action.ACCEPT
    assert edit(out, "From") == '"Meier via Support" <support@example.test>'
    assert ChangeSender(SUPPORT) in out.verdict.edits
    assert AddRecipient("support+Meier@example.test") in out.verdict.edits
    assert store.ticket_map[(SUPPORT, 1)].owner == "meier"


@pytest.mark.parametrize(
    ("policy", "action"), [("reject", Action.REJECT), ("warn", Action.ACCEPT), ("allow", Action.ACCEPT)]
)
def test_rival_policies(policy: str, action: Action) -> None:
    store = MemoryStore()
    open_ticket(store, owner="meier")
    out = process(reply("mueller"), config(on_rival_reply=policy), store, 2.0)
    assert out.verdict.action is action
    assert store.ticket_map[(SUPPORT, 1)].owner == "meier"
    assert (AddRecipient("meier@example.test") in out.verdict.edits) is (policy == "warn")


def test_bad_command_refuses_and_changes_nothing() -> None:
    store = MemoryStore()
    open_ticket(store)
    out = process(reply("meier", "#priority high\n#assign ghost\nHi\n"), config(), store, 2.0)
    assert out.verdict.action is Action.REJECT
    assert out.verdict.reply is not None and "'#assign ghost'" in out.verdict.reply.text
    t = store.ticket_map[(SUPPORT, 1)]
    assert (t.owner, t.priority) == ("", "normal")


@pytest.mark.parametrize(
    ("handover", "owners"), [("inbox", ["", "", ""]), ("round-robin", ["mueller", "schulze", "mueller"])]
)
def test_away_hands_open_tickets_over(handover: str, owners: list[str]) -> None:
    store = MemoryStore()
    for _ in range(3):
        open_ticket(store, owner="meier")
    state = MemoryAssignmentState()
    away = reply("meier", "#away\n", subject="Off", to=SUPPORT)
    out = process(away, config(away_handover=handover), store, 2.0, assign=state)
    assert out.verdict.action is Action.ACCEPT
    assert [store.ticket_map[(SUPPORT, n)].owner for n in (1, 2, 3)] == owners
    assert store.away(SUPPORT, ["meier"]) == {"meier"}
    assert [r.event for r in out.records] == ["handed_over"] * 3


def test_redis_down_tempfails_a_reply() -> None:
    store = MemoryStore()
    open_ticket(store)
    store.down = True
    out = process(reply("meier"), config(), store, 2.0)
    assert out.verdict.action is Action.TEMPFAIL
    assert out.verdict.reply is not None and out.verdict.reply.code == 451


def test_a_new_mail_without_message_id_sent_again_after_a_451_keeps_its_ticket() -> None:
    """The agent's client sends the same mail again after a 451 (whose ticket Redis may have opened all the same):
    the same derived Message-ID, so the same ticket, not a second one."""

    def new_mail(subject: str) -> Message:
        headers = [
            ("From", SUPPORT),  # written from the shared address: a new conversation of that mailbox
            ("To", ALICE),
            ("Subject", subject),
            ("Date", "Sun, 29 Nov 2026 10:00:00 +0000"),
        ]
        env = Envelope(mail_from=f"<{SUPPORT}>", rcpts=[f"<{ALICE}>"], queue_id="Q1", auth_login="meier")
        return Message(env, headers, body=lambda: b"Dear Alice\r\n")

    store = MemoryStore()
    first = process(new_mail("Your order"), config(), store, 1.0)
    again = process(new_mail("Your order"), config(), store, 2.0)
    other = process(new_mail("Your invoice"), config(), store, 3.0)
    assert edit(first, "Message-ID") == edit(again, "Message-ID") != edit(other, "Message-ID")
    assert [r.number for r in first.records] == [r.number for r in again.records] == [1]
    assert [r.number for r in other.records] == [2]
