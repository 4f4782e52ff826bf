"""Each step of the outbound path alone, on the in-memory store (the whole path: tests/test_outbound.py)."""

from __future__ import annotations

from email.utils import getaddresses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom import commands, outbound
from postroom.config import Config, example_config_path, load_config, parse_config
from postroom.dkim import Keyring
from postroom.mime import Message, readable
from postroom.outbound import AgentMail, Journal, Step
from postroom.parts import Parts
from postroom.rules import MemoryAssignmentState
from postroom.store.memory import MemoryStore
from postroom.tickets import NewTicket, Ticket
from postroom.verdict import (
    Action,
    AddHeader,
    AddRecipient,
    ChangeSender,
    Envelope,
    RemoveRecipient,
    ReplaceBody,
    SetHeader,
)

SUPPORT = "support@example.test"
ALICE = "alice@customer.test"


def config(**mailbox: object) -> Config:
    data = load_config(example_config_path(), environ={}).model_dump()
    data["mailboxes"]["support"] = {**data["mailboxes"]["support"], **mailbox}
    return parse_config(data, environ={})


def message(
    login: str = "meier",
    body: str = "Hello\n",
    subject: str = "Re: [Support #1] Help",
    rcpts: tuple[str, ...] = (f"<{ALICE}>",),
    to: str = f"Alice Smith <{ALICE}>",
) -> Message:
    headers = [
        ("From", f"{login}@example.test"),
        ("To", to),
        ("Subject", subject),
        ("Message-ID", f"<{login}-1@example.test>"),
        ("Content-Type", "text/plain; charset=utf-8"),
    ]
    env = Envelope(mail_from=f"<{login}@example.test>", rcpts=list(rcpts), queue_id="Q1", auth_login=login)
    return Message(env, headers, body=body.encode)


def step(parts: Parts, msg: Message | None = None, login: str = "meier") -> Step:
    mail = AgentMail.read(msg or message(login), parts, login)
    return Step(mail, parts, parts.config.mailboxes["support"], 2.0, Journal(mail, 2.0))


def open_ticket(store: MemoryStore, owner: str = "", state: str = "new") -> Ticket:
    new = NewTicket(
        customer=ALICE, subject="Help", participants=(ALICE,), message_ids=("c1@c",), owner=owner, state=state
    )
    return store.open(SUPPORT, new, 1.0)


def plan(text: str = "") -> commands.Plan:
    lines, _ = commands.parse_lines(text)
    return commands.plan(lines, agents=["meier", "mueller", "schulze"], canned={}, placeholders={})


def test_agent_mail_sorts_recipients_into_customers_and_shared_mailboxes() -> None:
    parts = Parts(config(), MemoryStore())
    mail = AgentMail.read(message(rcpts=(f"<{ALICE}>", f"<{SUPPORT}>")), parts, "meier")
    assert (mail.external, mail.shared_rcpts) == ([f"<{ALICE}>"], [f"<{SUPPORT}>"])
    assert mail.customer_name(None) == "Alice Smith"
    assert AgentMail.read(message(to=ALICE), parts, "meier").customer_name(None) == "Alice"


def test_find_ticket_by_token_for_any_agent_of_the_mailbox() -> None:
    store = MemoryStore()
    open_ticket(store)
    parts = Parts(config(), store)
    found = outbound.find_ticket(AgentMail.read(message(), parts, "meier"), parts)
    assert found is not None and found.box.address == SUPPORT and found.ticket is not None
    # Not an agent of any mailbox with that ticket: personal mail.
    assert outbound.find_ticket(AgentMail.read(message("ghost"), parts, "ghost"), parts) is None


def test_find_ticket_without_a_ticket_from_or_to_the_shared_address() -> None:
    parts = Parts(config(), MemoryStore())
    new_mail = message(subject="Offer", rcpts=(f"<{ALICE}>",))
    assert outbound.find_ticket(AgentMail.read(new_mail, parts, "meier"), parts) is None
    to_team = AgentMail.read(message(subject="Note", rcpts=(f"<{SUPPORT}>",)), parts, "meier")
    found = outbound.find_ticket(to_team, parts)
    assert found is not None and (found.box.address, found.ticket) == (SUPPORT, None)


def test_plan_commands_fills_canned_placeholders() -> None:
    store = MemoryStore()
    ticket = open_ticket(store)
    parts = Parts(config(), store, canned={SUPPORT: {"thanks": "Dear {customer_name}, {ticket}."}})
    lines, _ = commands.parse_lines("#canned thanks\n")
    p = outbound.plan_commands(step(parts), ticket, lines)
    assert p.replacements == ["Dear Alice Smith, Support #1.\n"]


def test_claim_or_open_opens_a_ticket_owned_by_the_agent() -> None:
    store, state = MemoryStore(), MemoryAssignmentState()
    settled = outbound.claim_or_open(step(Parts(config(), store, assign=state)), None, plan(), "own@x")
    assert (settled.event, settled.ticket.owner, settled.ticket.state, settled.ticket.customer) == (
        "opened_by_agent",
        "meier",
        "open",
        ALICE,
    )
    assert state.open_counts(SUPPORT, ["meier"]) == {"meier": 1}


@pytest.mark.parametrize(
    ("policy", "event", "refused"),
    [("reject", "rival_refused", True), ("warn", "rival_reply_warn", False), ("allow", "rival_reply_allow", False)],
)
def test_claim_or_open_applies_the_rival_policy(policy: str, event: str, refused: bool) -> None:
    store = MemoryStore()
    ticket = open_ticket(store, owner="mueller", state="open")
    settled = outbound.claim_or_open(step(Parts(config(on_rival_reply=policy), store)), ticket, plan(), "own@x")
    assert (settled.event, settled.refused is not None, settled.ticket.owner) == (event, refused, "mueller")


def test_claim_or_open_takeover_and_plain_reply() -> None:
    store = MemoryStore()
    ticket = open_ticket(store, owner="mueller", state="open")
    settled = outbound.claim_or_open(step(Parts(config(), store)), ticket, plan("#takeover\n"), "own@x")
    assert (settled.event, settled.ticket.owner) == ("takeover", "meier")
    again = outbound.claim_or_open(step(Parts(config(), store)), settled.ticket, plan(), "own2@x")
    assert again.event == "reply"
    ref = store.lookup(SUPPORT, ["own2@x"], [], []).by_reference
    assert ref is not None and ref.number == ticket.number


def test_refuse_rival_names_owner_and_records() -> None:
    store = MemoryStore()
    ticket = open_ticket(store, owner="mueller", state="open")
    s = step(Parts(config(), store))
    claim = store.claim(SUPPORT, ticket.number, "meier", 2.0)
    verdict = outbound.refuse_rival(s, claim)
    assert verdict.action is Action.REJECT and verdict.reply is not None and verdict.reply.code == 550
    assert "[Support #1]" in verdict.reply.text and "Mueller" in verdict.reply.text
    assert [r.event for r in s.journal.records] == ["rival_refused"]


def test_apply_commands_changes_the_ticket_once_and_records_each_command() -> None:
    store = MemoryStore()
    ticket = open_ticket(store, owner="meier", state="open")
    s = step(Parts(config(), store))
    after = outbound.apply_commands(s, ticket, plan("#priority high\n#tag vip\n#close\n"))
    assert (after.priority, after.tags, after.state) == ("high", ("vip",), "closed")
    assert [r.event for r in s.journal.records] == ["priority", "tag", "close"]
    assert store.owned(SUPPORT, "meier") == []


def test_away_hands_over_only_the_agents_open_tickets() -> None:
    store, state = MemoryStore(), MemoryAssignmentState()
    mine = open_ticket(store, owner="meier", state="open")
    open_ticket(store, owner="mueller", state="open")
    closed = open_ticket(store, owner="meier", state="closed")
    s = step(Parts(config(away_handover="least-open"), store, assign=state))
    outbound.apply_agent_commands(s, plan("#away\n"))
    assert store.ticket_map[(SUPPORT, mine.number)].owner in ("mueller", "schulze")
    assert store.ticket_map[(SUPPORT, closed.number)].owner == "meier"  # closed stays with its owner
    assert [r.number for r in s.journal.records] == [mine.number]
    assert store.away(SUPPORT, ["meier"]) == {"meier"}
    outbound.apply_agent_commands(s, plan("#back\n"))
    assert store.away(SUPPORT, ["meier"]) == set()


def test_rewrite_sends_from_the_shared_address_without_command_lines() -> None:
    store = MemoryStore()
    ticket = open_ticket(store, owner="meier", state="open")
    s = step(Parts(config(), store), message(body="#close\nHello\n"))
    edits = outbound.rewrite(s, ticket, plan("#close\n"))
    assert edits[:4] == [
        SetHeader("From", '"Meier via Support" <support@example.test>'),
        SetHeader("Reply-To", SUPPORT),
        SetHeader("Subject", "Re: [Support #1] Help"),
        ChangeSender(SUPPORT),
    ]
    [body] = [e for e in edits if isinstance(e, ReplaceBody)]
    assert b"#close" not in body.body and b"Hello" in body.body


def test_team_copy_into_the_owners_folder_and_the_owner_warned() -> None:
    store = MemoryStore()
    ticket = open_ticket(store, owner="mueller", state="open")
    s = step(Parts(config(), store), message(rcpts=(f"<{ALICE}>", f"<{SUPPORT}>")))
    assert outbound.team_copy(s, ticket, "rival_reply_warn") == [
        RemoveRecipient(f"<{SUPPORT}>"),
        AddRecipient("support+Mueller@example.test"),
        AddRecipient("mueller@example.test"),
    ]
    no_copy = step(Parts(config(copy_replies=False), store))
    assert outbound.team_copy(no_copy, ticket, "reply") == []


def test_sign_adds_a_signature_only_with_a_key() -> None:
    store = MemoryStore()
    cfg = config()
    assert outbound.sign(step(Parts(cfg, store)), []) == []
    [signature] = outbound.sign(step(Parts(cfg, store, keys=Keyring.from_config(cfg))), [ChangeSender(SUPPORT)])
    assert isinstance(signature, AddHeader) and signature.top and "d=example.test" in signature.value


def test_to_team_files_a_note_into_the_owners_folder_and_refuses_ticket_commands_without_a_ticket() -> None:
    store = MemoryStore()
    ticket = open_ticket(store, owner="mueller", state="open")
    s = step(Parts(config(), store), message(body="#note\nCall her\n", rcpts=(f"<{SUPPORT}>",)))
    out = outbound.to_team(s, ticket, plan("#note\n"))
    assert out.verdict.action is Action.ACCEPT
    assert AddRecipient("support+Mueller@example.test") in out.verdict.edits
    assert SetHeader("Subject", "[Note] Re: [Support #1] Help") in out.verdict.edits
    assert [r.event for r in out.records] == ["note"]
    lonely = step(Parts(config(), store), message(body="#close\n", subject="Hi", rcpts=(f"<{SUPPORT}>",)))
    refused = outbound.to_team(lonely, None, plan("#close\n"))
    assert refused.verdict.action is Action.REJECT
    assert refused.verdict.reply is not None and "#close" in refused.verdict.reply.text


@given(st.text(max_size=60))
def test_display_from_is_always_one_line(name: str) -> None:
    value = outbound.display_from(name, SUPPORT)
    assert "\r" not in value and "\n" not in value


# Agent names come from the config (admins write them), so printable text is what they are.
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=60))
def test_display_from_reads_back_as_the_name_and_the_shared_address(name: str) -> None:
    [(shown, address)] = getaddresses([outbound.display_from(name, SUPPORT)])
    assert address == SUPPORT
    assert " ".join(readable(shown).split()) == " ".join(name.split())
