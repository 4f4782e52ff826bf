"""commands.plan: what each command line means, and every way a line is refused before anything changes."""

from __future__ import annotations

import calendar
from datetime import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom import commands
from postroom.tickets import PRIORITIES

AGENTS = ["meier", "mueller"]
CANNED = {"thanks": "Dear {customer_name}, about {ticket}: {unknown} stays.", "bye": "Bye\n"}


def plan(text: str) -> commands.Plan:
    lines, _ = commands.parse_lines(text)
    return commands.plan(lines, agents=AGENTS, canned=CANNED, placeholders={"customer_name": "Alice", "ticket": "T#1"})


def refusal(text: str) -> commands.CommandError:
    with pytest.raises(commands.CommandError) as caught:
        plan(text)
    return caught.value


def test_every_known_command_has_a_meaning() -> None:
    for name in sorted(commands.KNOWN):
        args = {
            "assign": " meier",
            "priority": " high",
            "tag": " x",
            "untag": " x",
            "canned": " bye",
            "remind": " 3d",
        }.get(name, "")
        assert plan(f"#{name}{args}\n").events == [(name, args.strip())], name


def test_ownership_commands() -> None:
    assert plan("#assign MEIER\n").owner == "meier"
    assert plan("#release\n").owner == ""
    assert plan("#take\n").take and plan("#takeover\n").takeover
    assert plan("#close\n").owner is None  # unchanged, not released


@pytest.mark.parametrize(("name", "state"), [("close", "closed"), ("reopen", "open"), ("pending", "pending")])
def test_state_commands(name: str, state: str) -> None:
    p = plan(f"#{name}\n")
    assert (p.state, p.touches_ticket, p.ticket_lines) == (state, True, [f"#{name}"])


def test_priority_and_tags_are_lower_cased_and_add_up() -> None:
    p = plan("#priority URGENT\n#tag Billing vip\n#untag old\n#tag more\n")
    assert (p.priority, p.add_tags, p.remove_tags) == ("urgent", ["billing", "vip", "more"], ["old"])


def test_agent_commands_touch_no_ticket() -> None:
    p = plan("#away\n")
    assert (p.away, p.away_until, p.touches_ticket, p.ticket_lines) == (True, None, False, [])
    until = plan("#away until 2030-01-02 13:30\n").away_until
    assert until == calendar.timegm(datetime(2030, 1, 2, 13, 30).timetuple())
    assert plan("#away 2030-01-02\n").away_until == calendar.timegm(datetime(2030, 1, 2).timetuple())
    assert plan("#back\n").back and plan("#note\n").note


def test_canned_fills_our_placeholders_only_and_ends_in_a_newline() -> None:
    p = plan("#canned thanks\n#close\n")
    assert p.replacements == ["Dear Alice, about T#1: {unknown} stays.\n", ""]
    assert p.ticket_lines == ["#canned thanks", "#close"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("#assign\n", "write #assign LOGIN"),
        ("#assign ghost\n", "unknown agent 'ghost'; agents of this mailbox: meier, mueller"),
        ("#priority\n", f"write #priority {'|'.join(PRIORITIES)}"),
        ("#priority asap\n", "write #priority"),
        ("#tag\n", "write #tag TAG [TAG ...]"),
        ("#untag a,b\n", "tag 'a,b' must match"),
        ("#canned\n", "write #canned NAME"),
        ("#canned nope\n", "no canned reply 'nope' (known: bye, thanks)"),
        ("#away tomorrow\n", "write #away or #away until YYYY-MM-DD"),
        ("#away 2030-02-30\n", "not a date"),
        ("#frobnicate\n", "unknown command; known: #assign #away"),
        ("#away\n#back\n", "one mail cannot say both"),
    ],
)
def test_refusals_name_the_line_and_why(text: str, reason: str) -> None:
    exc = refusal(text)
    assert reason in exc.reason
    assert exc.line == text.strip().split("\n")[0] or exc.line == "#away/#back"


def test_the_first_bad_line_refuses_the_whole_mail() -> None:
    exc = refusal("#priority high\n#assign ghost\n#close\n")
    assert exc.line == "#assign ghost"


@given(st.lists(st.sampled_from(sorted(commands.KNOWN - {"away", "back", "canned", "assign"})), max_size=8))
def test_one_replacement_and_one_event_per_line(names: list[str]) -> None:
    args = {"priority": " low", "tag": " t", "untag": " t", "remind": " 2026-12-01"}
    text = "".join(f"#{n}{args.get(n, '')}\n" for n in names)
    p = plan(text)
    assert len(p.replacements) == len(p.events) == len(names)
    assert p.touches_ticket == any(n not in ("note",) for n in names)
