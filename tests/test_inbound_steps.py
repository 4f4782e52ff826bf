"""Each step of the inbound path alone, on the in-memory store (the whole path: tests/test_pipeline.py)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from postroom import inbound
from postroom.autoreply import load_templates
from postroom.config import Config, example_config_path, load_config, parse_config, with_changes
from postroom.inbound import Applied, CustomerMail, Step, Thread
from postroom.mime import Message
from postroom.parts import Parts
from postroom.rules import Decision, MemoryAssignmentState, context_for, parse_rules
from postroom.store.memory import MemoryStore
from postroom.tickets import NewTicket, Ticket
from postroom.verdict import AddHeader, AddRecipient, Envelope, RemoveRecipient, SetHeader

SUPPORT = "support@example.test"
ALICE = "alice@customer.test"


@pytest.fixture
def config() -> Config:
    base = load_config(example_config_path(), environ={}).model_dump()
    base["mailboxes"]["sales"] = {"address": "sales@example.test", "tag": "Sales", "agents": ["schulze"]}
    return parse_config(base, environ={})


def mail(
    subject: str = "Hello",
    *,
    sender: str = ALICE,
    rcpts: Iterable[str] = (f"<{SUPPORT}>",),
    msgid: str = "m1@customer.test",
    extra: Iterable[tuple[str, str]] = (),
) -> CustomerMail:
    headers = [("From", f"Alice <{sender}>"), ("To", SUPPORT), ("Subject", subject), ("Message-ID", f"<{msgid}>")]
    headers += list(extra)
    return CustomerMail.read(Message(Envelope(mail_from=f"<{sender}>", rcpts=list(rcpts), queue_id="Q1"), headers))


def step(config: Config, the_mail: CustomerMail, store: MemoryStore | None = None, **parts: object) -> Step:
    [routed] = [r for r in inbound.route(the_mail.message.envelope, config) if r.box.address == SUPPORT]
    return Step(the_mail, routed, Parts(config, store or MemoryStore(), **parts), 1000.0)  # type: ignore[arg-type]


def opened(store: MemoryStore, owner: str = "", state: str = "new") -> Ticket:
    new = NewTicket(ALICE, "Hello", (ALICE,), ("m1@customer.test",), owner=owner, state=state)
    return store.open(SUPPORT, new, 1.0)


def test_customer_mail_reads_senders_once_each_and_the_customer_from_from() -> None:
    m = mail("AW: [Support #7] Hi", extra=[("From", "ALICE@customer.test"), ("References", "<a@x> <b@x>")])
    assert (m.customer, m.senders, m.refs, m.own_id) == (ALICE, [ALICE], ["a@x", "b@x"], "m1@customer.test")
    assert m.text_subject == "AW: [Support #7] Hi" and not m.info.is_forward


def test_route_names_each_mailbox_once_with_its_recipients(config: Config) -> None:
    env = Envelope(
        mail_from="<alice@customer.test>",
        rcpts=[f"<{SUPPORT}>", "<support+x@example.test>", "<sales@example.test>", "<bob@else.test>"],
    )
    assert [(r.key, r.rcpts) for r in inbound.route(env, config)] == [
        ("support", (f"<{SUPPORT}>", "<support+x@example.test>")),
        ("sales", ("<sales@example.test>",)),
    ]
    assert inbound.route(Envelope(mail_from="<alice@customer.test>", rcpts=["<bob@else.test>"]), config) == []


def test_find_thread_by_reference_token_or_none(config: Config) -> None:
    store = MemoryStore()
    opened(store)
    assert inbound.find_thread(step(config, mail(), store)) == Thread(None)
    by_ref = inbound.find_thread(
        step(config, mail("Re", msgid="m2@c", extra=[("In-Reply-To", "<m1@customer.test>")]), store)
    )
    assert (by_ref.ticket is not None and by_ref.ticket.number, by_ref.why) == (1, "references")
    by_token = inbound.find_thread(step(config, mail("AW: [Support #1] Hi", msgid="m2@c"), store))
    assert (by_token.ticket is not None and by_token.ticket.number, by_token.why) == (1, "subject token")


def test_find_thread_never_lets_a_stranger_into_a_ticket_by_token(config: Config) -> None:
    store = MemoryStore()
    opened(store)
    thread = inbound.find_thread(step(config, mail("[Support #1] data?", sender="mallory@evil.test"), store))
    assert thread.ticket is None and "#1 from a sender who is not a participant" in thread.why


def test_find_thread_links_a_forward_instead_of_joining(config: Config) -> None:
    store = MemoryStore()
    opened(store)
    assert inbound.find_thread(step(config, mail("WG: [Support #1] Hi", msgid="m2@c"), store)) == Thread(
        None, 1, "forward"
    )


def test_decide_without_rules_decides_nothing(config: Config) -> None:
    assert inbound.decide(step(config, mail()), new_ticket=True) == Decision()


def test_decide_runs_the_rules_and_counts_a_new_owner(config: Config) -> None:
    rules = parse_rules(
        '[[rule]]\nname = "billing"\nsubject_contains = ["invoice"]\nassign = "meier"\n',
        "rules.toml",
        context_for(config),
    )
    state = MemoryAssignmentState()
    decision = inbound.decide(step(config, mail("Your invoice"), rules=rules, assign=state), new_ticket=True)
    assert (decision.owner, decision.matched_rule_names) == ("meier", ("billing",))
    assert state.open_counts(SUPPORT, ["meier"]) == {"meier": 1}
    follow_up = inbound.decide(step(config, mail("Your invoice"), rules=rules, assign=state), new_ticket=False)
    assert follow_up.owner == ""  # a follow-up is never reassigned by a rule


def test_apply_to_store_opens_with_the_decision(config: Config) -> None:
    store = MemoryStore()
    decision = Decision(owner="meier", priority="high", tags=("vip",))
    applied = inbound.apply_to_store(step(config, mail(), store), Thread(None, 0, "new"), decision)
    t = applied.ticket
    assert (applied.event, t.number, t.owner, t.state, t.priority, t.tags, t.customer) == (
        "opened",
        1,
        "meier",
        "open",  # owned is open, as after #assign
        "high",
        ("vip",),
        ALICE,
    )
    assert applied.outgoing == [] and applied.auto_reply is None
    unowned = inbound.apply_to_store(step(config, mail(), MemoryStore()), Thread(None, 0, "new"), Decision()).ticket
    assert (unowned.owner, unowned.state) == ("", "new")


def test_apply_to_store_strips_a_strangers_token_from_the_new_subject(config: Config) -> None:
    store = MemoryStore()
    applied = inbound.apply_to_store(step(config, mail("[Support #9] Hi"), store), Thread(None), Decision())
    assert applied.ticket.subject == "Hi"


def test_apply_to_store_finds_the_same_mail_again(config: Config) -> None:
    store = MemoryStore()
    opened(store)
    applied = inbound.apply_to_store(step(config, mail(), store), Thread(None), Decision())
    assert (applied.event, applied.ticket.number, store.seq[SUPPORT]) == ("duplicate", 1, 1)


def test_apply_to_store_reopens_a_closed_ticket_and_adds_new_tags(config: Config) -> None:
    store = MemoryStore()
    ticket = opened(store, owner="meier", state="closed")
    applied = inbound.apply_to_store(
        step(config, mail(msgid="m2@c"), store), Thread(ticket, 0, "references"), Decision(tags=("late",))
    )
    assert (applied.event, applied.why, applied.ticket.state, applied.ticket.tags) == (
        "reopened",
        "references",
        "open",
        ("late",),
    )
    ref = store.lookup(SUPPORT, ["m2@c"], [], []).by_reference
    assert ref is not None and ref.number == 1


def test_apply_to_store_plain_follow_up_changes_no_state(config: Config) -> None:
    store = MemoryStore()
    ticket = opened(store, owner="meier", state="open")
    applied = inbound.apply_to_store(step(config, mail(msgid="m2@c"), store), Thread(ticket, 0, "x"), Decision())
    assert (applied.event, applied.ticket.state) == ("followup", "open")


def test_acknowledge_only_when_asked_and_threads_the_answer(config: Config) -> None:
    store = MemoryStore()
    ticket = opened(store)
    assert inbound.acknowledge(step(config, mail(), store), ticket, Decision()) is None
    acking = with_changes(config, {"autoreply": {"acknowledge": True}})
    the_step = step(acking, mail(), store, templates=load_templates(acking), assign=MemoryAssignmentState())
    plan = inbound.acknowledge(the_step, ticket, Decision())
    assert plan is not None and plan.mail is not None
    ref = store.lookup(SUPPORT, [plan.message_id], [], []).by_reference
    assert ref is not None and ref.number == ticket.number
    bulk = mail(extra=[("Precedence", "bulk")])
    plan = inbound.acknowledge(
        step(acking, bulk, store, templates=load_templates(acking), assign=MemoryAssignmentState()), ticket, Decision()
    )
    assert plan is not None and plan.mail is None and plan.reason


def test_mailbox_edits_file_into_the_owners_folder_unless_away(config: Config) -> None:
    store = MemoryStore()
    ticket = opened(store, owner="meier", state="open")
    headers, rcpts = inbound.mailbox_edits(step(config, mail(), store), ticket, Decision())
    assert AddHeader("X-Postroom-Owner", "meier (Support #1)") in headers
    assert rcpts == [RemoveRecipient(f"<{SUPPORT}>"), AddRecipient("support+Meier@example.test")]
    store.set_away(SUPPORT, "meier", None, 1.0)
    _, rcpts = inbound.mailbox_edits(step(config, mail(), store), ticket, Decision(folder="Billing"))
    assert rcpts == [RemoveRecipient(f"<{SUPPORT}>"), AddRecipient("support+Billing@example.test")]


def test_record_names_event_actor_and_why(config: Config) -> None:
    store = MemoryStore()
    ticket = opened(store)
    rec = inbound.record(step(config, mail(), store), Applied(ticket, "opened", "new"))
    assert (rec.event, rec.actor, rec.detail, rec.queue_id, rec.direction, rec.at) == (
        "opened",
        ALICE,
        "new",
        "Q1",
        "inbound",
        1000.0,
    )


def test_assemble_puts_every_mailboxs_token_headers_and_recipients_in_one_verdict(config: Config) -> None:
    store = MemoryStore()
    the_mail = mail(rcpts=[f"<{SUPPORT}>", "<sales@example.test>"])
    results = [
        inbound.through_mailbox(Step(the_mail, r, Parts(config, store), 1.0))
        for r in inbound.route(the_mail.message.envelope, config)
    ]
    out = inbound.assemble(the_mail, results)
    subjects = [e.value for e in out.verdict.edits if isinstance(e, SetHeader) and e.name == "Subject"]
    assert subjects == ["[Sales #1] [Support #1] Hello"]
    assert out.verdict.summary == "Support #1 opened; Sales #1 opened"
    assert [r.mailbox for r in out.records] == [SUPPORT, "sales@example.test"]


def test_reroute_keeps_one_delivery_per_address() -> None:
    rcpts = ["<support@example.test>", "<support+Meier@example.test>"]
    assert inbound.reroute(rcpts, "+", "Meier") == [
        RemoveRecipient("<support@example.test>"),
        AddRecipient("support+Meier@example.test"),
    ]
    assert inbound.reroute(["<support@example.test>"], "+", "") == []
