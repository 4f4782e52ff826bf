"""Routing rules: tags, priority, owner, folder and auto-reply for each mail, from an admin's TOML table.

The interface for the inbound pipeline (everything is importable from ``postroom.rules``)::

    from postroom.rules import MessageFacts, evaluate

    facts = MessageFacts.from_message(message, routed.key, routed.box.address)   # per shared mailbox
    decision = evaluate(ruleset, facts, datetime.fromtimestamp(now, UTC), state, new_ticket=ticket is None)

- ``ruleset`` (:class:`Ruleset`) comes from :func:`postroom.bundle.load_all` / :func:`postroom.bundle.reload`
  (``Loaded.rules``), loaded with the config so a connection keeps the rules it started with; :data:`NO_RULES`
  when there is no ``rules_file``.
- ``state`` (:class:`AssignmentState`) is :class:`postroom.store.assignment.RedisAssignmentState` (the same Redis
  as the ticket store; raises :class:`postroom.tickets.StoreUnavailable` like it) or
  :class:`MemoryAssignmentState` in tests and the dry run.
- ``evaluate`` reads the table top to bottom and returns a :class:`Decision`: ``tags``, ``priority`` ("" = no
  rule set one), ``owner`` (an agent login, "" = unassigned), ``folder`` ("" = none), ``auto_reply_template``
  (for :func:`postroom.autoreply.plan_auto_reply`; "none" forbids an answer), ``matched_rule_names`` and
  ``notes`` (log them).  It asks ``state`` at most once (for a new ticket's owner, counting the ticket for them);
  ``new_ticket=False`` assigns nobody and names no auto-reply.

Redis key names of this feature (away flags, round-robin turns, open counts, auto-reply cap) are the functions of
:mod:`postroom.store.keyspace`, like every other key.
"""

from __future__ import annotations

from postroom.rules.engine import NO_RULES, Decision, Rule, Ruleset, evaluate
from postroom.rules.facts import Attachment, MessageFacts
from postroom.rules.loader import Problem, RulesError, context_for, load_rules, parse_rules
from postroom.store.memory import MemoryAssignmentState
from postroom.tickets import AssignmentState

__all__ = [
    "NO_RULES",
    "AssignmentState",
    "Attachment",
    "Decision",
    "MemoryAssignmentState",
    "MessageFacts",
    "Problem",
    "Rule",
    "RulesError",
    "Ruleset",
    "context_for",
    "evaluate",
    "load_rules",
    "parse_rules",
]
