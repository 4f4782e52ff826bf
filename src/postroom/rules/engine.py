"""The rule table and its evaluation: read top to bottom, every matching rule applies its actions, ``stop`` ends.

:func:`evaluate` is pure but for the :class:`~postroom.tickets.AssignmentState` it is handed, which it asks
at most once per mail (for the owner of a new ticket).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from postroom.autoreply import BusinessHours
from postroom.config import HoursConfig
from postroom.rules.actions import Action, AgentTarget, Draft, GroupTarget
from postroom.rules.facts import MessageFacts
from postroom.rules.predicates import HEADER_ONLY, Condition
from postroom.tickets import AssignmentState


@dataclass(frozen=True)
class Rule:
    name: str
    line: int  # of its [[rule]] header in the file, for messages
    conditions: tuple[Condition, ...]
    actions: tuple[Action, ...]

    @property
    def stop(self) -> bool:
        draft = Draft()
        for action in self.actions:
            action.apply(draft)
        return draft.stop

    def matches(self, facts: MessageFacts, now: datetime) -> bool:
        """All conditions hold (a rule without conditions matches every mail)."""
        return all(c.matches(facts, now) for c in self.conditions)

    def explain(self) -> str:
        when = " and ".join(c.explain() for c in self.conditions) or "every mail"
        then = ", ".join(a.explain() for a in self.actions) or "nothing"
        return f"if {when}: {then}"


@dataclass(frozen=True, eq=False)
class Ruleset:
    """A loaded rules file: immutable, so a connection keeps the rules it started with across a reload."""

    rules: tuple[Rule, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    hours: BusinessHours = field(default_factory=lambda: BusinessHours.from_config(HoursConfig()))
    source: str = ""  # the file it came from, "" for no rules

    @cached_property
    def reads_body(self) -> bool:
        """Some rule may look at the body (text or attachments); if none does, inbound mail needs only headers."""
        return any(not isinstance(c, HEADER_ONLY) for rule in self.rules for c in rule.conditions)


NO_RULES = Ruleset()


@dataclass(frozen=True)
class Decision:
    """What the rules say about one mail for one mailbox.  Empty strings mean "no rule said anything"."""

    tags: tuple[str, ...] = ()
    priority: str = ""  # low | normal | high | urgent
    owner: str = ""  # an agent login; "" when no rule assigned or nobody of the group was present
    folder: str = ""
    auto_reply_template: str = ""  # a template name; "none" when a rule forbids any automatic answer
    matched_rule_names: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # why things did not happen, for the log and the dry run

    def as_dict(self) -> dict[str, Any]:
        return {
            "tags": list(self.tags),
            "priority": self.priority,
            "owner": self.owner,
            "folder": self.folder,
            "auto_reply_template": self.auto_reply_template,
            "matched_rule_names": list(self.matched_rule_names),
            "notes": list(self.notes),
        }


def evaluate(
    ruleset: Ruleset,
    facts: MessageFacts,
    now: datetime,
    state: AssignmentState,
    *,
    new_ticket: bool = True,
) -> Decision:
    """Apply the rule table to one mail.

    ``now`` is any aware datetime (a naive one counts as UTC); time and weekday conditions read it in the
    ``[hours] timezone``.  With ``new_ticket=False`` (a follow-up, which stays with its owner) nobody is assigned
    and no auto-reply is named, so a follow-up never uses a round-robin turn.  Raises StoreUnavailable when the
    state's Redis is down, like the ticket store.
    """
    local = ruleset.hours.local(now if now.tzinfo else now.replace(tzinfo=UTC))
    draft = Draft()
    matched: list[str] = []
    for rule in ruleset.rules:
        if not rule.matches(facts, local):
            continue
        matched.append(rule.name)
        for action in rule.actions:
            action.apply(draft)
        if draft.stop:
            break
    notes: list[str] = []
    owner = ""
    if new_ticket and draft.target is not None:
        owner = _assign(draft.target, facts.mailbox_address, state, notes)
    return Decision(
        tags=tuple(draft.tags),
        priority=draft.priority,
        owner=owner,
        folder=draft.folder,
        auto_reply_template=draft.auto_reply if new_ticket else "",
        matched_rule_names=tuple(matched),
        notes=tuple(notes),
    )


def _assign(target: AgentTarget | GroupTarget, mailbox: str, state: AssignmentState, notes: list[str]) -> str:
    if isinstance(target, AgentTarget):
        # A named agent gets the ticket even when away: the admin said so, and the ticket waits in their folder.
        state.count_assigned(mailbox, target.login)
        return target.login
    if target.strategy == "round-robin":
        owner = state.pick_round_robin(mailbox, target.group, target.agents)
    else:
        owner = state.pick_least_open(mailbox, target.agents)
    if not owner:
        notes.append(f"{target.strategy} among {target.group}: nobody present, the ticket stays unassigned")
    return owner
