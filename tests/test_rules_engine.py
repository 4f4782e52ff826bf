"""Reading the rule table: order, first-wins, stop, follow-ups, and the two assignment strategies."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from postroom.config import Config, parse_config
from postroom.rules import (
    NO_RULES,
    Decision,
    MemoryAssignmentState,
    MessageFacts,
    Ruleset,
    context_for,
    evaluate,
    parse_rules,
)

NOW = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)
BOX = "support@example.test"


def team(*logins: str) -> Config:
    return parse_config(
        {
            "agents": {login: {"address": f"{login}@example.test"} for login in logins},
            "mailboxes": {"support": {"address": BOX, "tag": "Support", "agents": list(logins)}},
        },
        environ={},
    )


CONFIG = team("meier", "mueller", "schulze")


def rules(text: str, config: Config = CONFIG) -> Ruleset:
    return parse_rules(text, "test.toml", context_for(config))


def mail(subject: str = "Hello", sender: str = "alice@customer.test") -> MessageFacts:
    return MessageFacts(
        mailbox="support",
        mailbox_address=BOX,
        headers=[("From", sender), ("Subject", subject)],
        envelope_sender=sender,
    )


def run(ruleset: Ruleset, facts: MessageFacts, state: MemoryAssignmentState | None = None) -> Decision:
    return evaluate(ruleset, facts, NOW, state or MemoryAssignmentState())


TABLE = """
[[rule]]
name = "vip"
sender_domain = "bigcorp.example"
priority = "high"
tag = "vip"
assign = "meier"

[[rule]]
name = "invoice"
subject_contains = "invoice"
priority = "low"
tag = ["billing", "vip"]
folder = "Billing"
assign = "mueller"

[[rule]]
name = "spam"
subject_contains = "viagra"
folder = "Spam"
auto_reply = "none"
stop = true

[[rule]]
name = "all"
tag = "seen"
"""


def test_tags_add_up_and_the_first_rule_to_set_a_value_wins() -> None:
    d = run(rules(TABLE), mail("Invoice 17", "boss@bigcorp.example"))
    assert d.matched_rule_names == ("vip", "invoice", "all")
    assert d.tags == ("vip", "billing", "seen")  # no duplicate "vip"
    assert d.priority == "high"  # vip came first
    assert d.owner == "meier"
    assert d.folder == "Billing"  # only invoice named a folder


def test_stop_ends_the_table() -> None:
    d = run(rules(TABLE), mail("cheap viagra"))
    assert d.matched_rule_names == ("spam",)
    assert d.tags == ()
    assert d.folder == "Spam"
    assert d.auto_reply_template == "none"


def test_no_rule_matching_leaves_everything_unset() -> None:
    d = run(rules('[[rule]]\nname = "x"\nsubject_contains = "nothing like this"\ntag = "t"\n'), mail())
    assert d == Decision()


def test_a_follow_up_is_not_assigned_and_gets_no_auto_reply() -> None:
    table = rules('[[rule]]\nname = "x"\ntag = "t"\nassign_round_robin = "support"\nauto_reply = "ack"\n')
    state = MemoryAssignmentState()
    d = evaluate(table, mail(), NOW, state, new_ticket=False)
    assert d.tags == ("t",)
    assert d.owner == "" and d.auto_reply_template == ""
    assert state.last_turn == {}  # nobody's turn was used up by a follow-up


def test_named_agent_is_counted_as_having_one_more_open_ticket() -> None:
    state = MemoryAssignmentState()
    run(rules('[[rule]]\nname = "x"\nassign = "schulze"\n'), mail(), state)
    assert state.open_counts(BOX, ["schulze"]) == {"schulze": 1}


def test_round_robin_is_fair_over_1000_tickets() -> None:
    table = rules('[[rule]]\nname = "turns"\nassign_round_robin = "support"\n')
    state = MemoryAssignmentState()
    owners = Counter(run(table, mail(), state).owner for _ in range(1000))
    assert owners == {"meier": 334, "mueller": 333, "schulze": 333}


def test_round_robin_skips_absent_agents_and_takes_them_back_in_turn() -> None:
    table = rules('[[rule]]\nname = "turns"\nassign_round_robin = "support"\n')
    state = MemoryAssignmentState()
    assert [run(table, mail(), state).owner for _ in range(2)] == ["meier", "mueller"]
    state.set_away(BOX, "schulze")
    assert [run(table, mail(), state).owner for _ in range(3)] == ["meier", "mueller", "meier"]
    state.set_away(BOX, "schulze", away=False)
    assert [run(table, mail(), state).owner for _ in range(3)] == ["mueller", "schulze", "meier"]
    owners = Counter(run(table, mail(), state).owner for _ in range(999))
    assert set(owners.values()) == {333}


def test_round_robin_with_everybody_away_leaves_the_ticket_unassigned_and_says_why() -> None:
    table = rules('[[rule]]\nname = "turns"\nassign_round_robin = "support"\n')
    state = MemoryAssignmentState({BOX: {"meier", "mueller", "schulze"}})
    d = run(table, mail(), state)
    assert d.owner == ""
    assert d.notes == ("round-robin among support: nobody present, the ticket stays unassigned",)


def test_least_open_picks_the_least_loaded_present_agent() -> None:
    table = rules(
        '[groups]\nteam = ["meier", "mueller", "schulze"]\n[[rule]]\nname = "load"\nassign_least_open = "team"\n'
    )
    state = MemoryAssignmentState()
    state.counts[BOX] = {"meier": 5, "mueller": 1, "schulze": 0}
    state.set_away(BOX, "schulze")  # the least loaded, but on holiday
    assert run(table, mail(), state).owner == "mueller"
    # mueller now has 2; the next three go to mueller (2, 3, 4), then meier and mueller take turns at 5.
    owners = [run(table, mail(), state).owner for _ in range(5)]
    assert owners == ["mueller", "mueller", "mueller", "meier", "mueller"]
    state.count_released(BOX, "meier")
    state.count_released(BOX, "meier")
    assert run(table, mail(), state).owner == "meier"


def test_least_open_spreads_evenly_when_tickets_are_closed_as_fast_as_they_come() -> None:
    table = rules('[[rule]]\nname = "load"\nassign_least_open = "support"\n')
    state = MemoryAssignmentState()
    owners: Counter[str] = Counter()
    for i in range(300):
        owner = run(table, mail(), state).owner
        owners[owner] += 1
        if i % 2:
            state.count_released(BOX, owner)
    assert max(owners.values()) - min(owners.values()) <= 1


def test_time_conditions_read_the_configured_time_zone() -> None:
    config = parse_config(
        {**CONFIG.model_dump(), "hours": {"timezone": "Asia/Tokyo", "monday": "09:00-18:00"}}, environ={}
    )
    table = rules('[[rule]]\nname = "evening"\ntime = "20:00-23:00"\ntag = "evening"\n', config)
    # 12:00 UTC is 21:00 in Tokyo.
    assert run(table, mail()).tags == ("evening",)
    assert evaluate(table, mail(), datetime(2025, 1, 6, 12, 0), MemoryAssignmentState()).tags == ("evening",)


def test_a_rule_set_reads_the_body_only_with_a_body_or_attachment_condition() -> None:
    """The milter skips the body of customer mail when no rule reads it (Ruleset.reads_body)."""
    assert not NO_RULES.reads_body
    assert not rules(TABLE).reads_body
    headers_only = rules(
        '[[rule]]\nname = "h"\nheader = { name = "X-Spam-Flag", contains = "yes" }\nsubject_regex = "x"\n'
        'sender = "a@b.example"\nweekday = ["mon"]\ntime = "08:00-17:00"\nmailbox = "support"\ntag = "t"\n'
    )
    assert not headers_only.reads_body
    for condition in ('body_contains = "refund"', 'body_regex = "re.und"', "has_attachment = true",
                      'attachment_type = ".pdf"'):  # fmt: skip
        assert rules(f'[[rule]]\nname = "b"\nsubject_contains = "x"\n{condition}\ntag = "t"\n').reads_body, condition
