"""The rules file: TOML, checked on load, every mistake named with its file, rule and line.

Format (src/postroom/examples/rules.toml is the commented example)::

    [groups]                      # optional: named sets of agents for the assign_* actions
    billing = ["meier", "mueller"]

    [[rule]]                      # one table per rule, read top to bottom
    name = "invoices"             # required, unique
    subject_contains = ["invoice", "Rechnung"]    # conditions: all must hold
    tag = "billing"                               # actions
    assign_round_robin = "billing"

The condition keys are those of :data:`postroom.rules.predicates.CONDITIONS`, the action keys those of
:data:`postroom.rules.actions.ACTIONS`; anything else is an error.  tomllib reports no positions for values, so the
lines are found by reading the text: the line of the key inside its rule, else the rule's ``[[rule]]`` line.
Loading never raises anything but :class:`RulesError` (a property test feeds it random text and structures).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from postroom.autoreply import BusinessHours, Templates
from postroom.config import Config, HoursConfig
from postroom.rules.actions import ACTIONS, ASSIGN_KEYS, Action
from postroom.rules.context import Context, shown
from postroom.rules.engine import Rule, Ruleset
from postroom.rules.predicates import CONDITIONS, Condition

CONDITION_TYPES = {c.key: c for c in CONDITIONS}
ACTION_TYPES = {a.key: a for a in ACTIONS}
TOP_KEYS = ("rule", "groups")
GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_NAME_LENGTH = 100

_RULE_HEADER_RE = re.compile(r"""^\s*\[\[\s*(rule|"rule"|'rule')\s*\]\]""")
_TABLE_HEADER_RE = re.compile(r"^\s*\[")
_NAME_RE = re.compile(r"""^\s*name\s*=\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)')""")
_TOML_LINE_RE = re.compile(r"\(at line (\d+), column \d+\)|\(at end of document\)")


@dataclass(frozen=True)
class Problem:
    line: int
    rule: str  # the rule's name (or "#3" for an unnamed third rule); "" outside any rule
    message: str

    def format(self, path: str) -> str:
        where = f'rule "{self.rule}": ' if self.rule else ""
        return f"{path}:{self.line}: {where}{self.message}"


class RulesError(ValueError):
    """Every problem of a rules file, each with file, rule and line."""

    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(p.format(path) for p in problems))


def _key_re(key: str) -> re.Pattern[str]:
    k = re.escape(key)
    # key = ..., "key" = ..., key.sub = ... (dotted), or a [rule.key] sub-table header
    return re.compile(rf"""^\s*(?:(?:{k}|"{k}"|'{k}')\s*[=.]|\[\s*rule\s*\.\s*{k}\s*\])""")


class _Locator:
    """Line numbers for what tomllib parsed, found in the text."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines() or [""]
        self.starts = [n for n, line in enumerate(self.lines, 1) if _RULE_HEADER_RE.match(line)]

    def _span(self, index: int) -> tuple[int, int]:
        """Lines [first, last) of rule ``index``; the ``rule =`` line when the file wrote rules inline."""
        if index < len(self.starts):
            first = self.starts[index]
            last = self.starts[index + 1] if index + 1 < len(self.starts) else len(self.lines) + 1
            return first, last
        line = self.top_key_line("rule")
        return line, line + 1

    def rule_line(self, index: int) -> int:
        return self._span(index)[0]

    def key_line(self, index: int, key: str) -> int:
        first, last = self._span(index)
        pattern = _key_re(key)
        for n in range(first, last):
            if pattern.match(self.lines[n - 1]):
                return n
        return first

    def top_key_line(self, key: str) -> int:
        pattern = _key_re(key)
        table = re.compile(rf"""^\s*\[\[?\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*[\].]""")
        for n, line in enumerate(self.lines, 1):
            if table.match(line):
                return n
        for n, line in enumerate(self.lines, 1):
            if _TABLE_HEADER_RE.match(line):
                break  # top-level keys come before the first table
            if pattern.match(line):
                return n
        return 1

    def group_line(self, name: str) -> int:
        start = self.top_key_line("groups")
        pattern = _key_re(name)
        for n in range(start + 1, len(self.lines) + 1):
            if _TABLE_HEADER_RE.match(self.lines[n - 1]):
                break
            if pattern.match(self.lines[n - 1]):
                return n
        return start

    def rule_at(self, line: int) -> int | None:
        found = None
        for index, start in enumerate(self.starts):
            if start <= line:
                found = index
        return found

    def name_in_text(self, index: int) -> str:
        first, last = self._span(index)
        for n in range(first, min(last, len(self.lines) + 1)):
            m = _NAME_RE.match(self.lines[n - 1])
            if m:
                return m.group(1) if m.group(1) is not None else m.group(2)
        return f"#{index + 1}"


def context_for(config: Config | None, templates: Templates | None = None) -> Context:
    """What the rules are checked against: the config's agents, mailboxes and hours, and the templates found."""
    if config is None:
        return Context()
    return Context(
        hours=BusinessHours.from_config(config.hours),
        mailboxes={key: box.address for key, box in config.mailboxes.items()},
        mailbox_agents={key: tuple(box.agents) for key, box in config.mailboxes.items()},
        agents=frozenset(config.agents),
        templates=frozenset(templates.names()) if templates is not None else None,
    )


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, [*CONDITION_TYPES, *ACTION_TYPES], n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"conditions: {', '.join(CONDITION_TYPES)}; actions: {', '.join(ACTION_TYPES)}"


def _groups(raw: Any, loc: _Locator, ctx: Context, problems: list[Problem]) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict):
        problems.append(Problem(loc.top_key_line("groups"), "", f"[groups] must be a table, got {shown(raw)}"))
        return {}
    groups: dict[str, tuple[str, ...]] = {}
    for name, members in raw.items():
        line = loc.group_line(name)
        if not GROUP_RE.match(name):
            problems.append(Problem(line, "", f"group name {name!r} must match {GROUP_RE.pattern}"))
            continue
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            problems.append(Problem(line, "", f"group {name!r} must be a list of agents' logins, got {shown(members)}"))
            continue
        unknown = [m for m in members if ctx.agents is not None and m not in ctx.agents]
        if unknown:
            known = ", ".join(sorted(ctx.agents or ())) or "none"
            problems.append(Problem(line, "", f"group {name!r}: unknown agent {unknown[0]!r} (agents: {known})"))
            continue
        groups[name] = tuple(dict.fromkeys(members))
    return groups


def _rule(index: int, raw: Any, loc: _Locator, ctx: Context, problems: list[Problem]) -> Rule | None:
    line = loc.rule_line(index)
    if not isinstance(raw, dict):
        problems.append(Problem(line, f"#{index + 1}", f"a rule must be a table, got {shown(raw)}"))
        return None
    name = raw.get("name")
    label = name.strip() if isinstance(name, str) and name.strip() else f"#{index + 1}"
    before = len(problems)
    if "name" not in raw:
        problems.append(Problem(line, label, 'has no name: add name = "..." to say what it is for'))
    elif not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH or "\n" in name:
        problems.append(
            Problem(
                loc.key_line(index, "name"),
                label,
                f"name must be one line of text up to 100 characters, got {shown(name)}",
            )
        )
    conditions: list[Condition] = []
    actions: list[Action] = []
    for key, value in raw.items():
        if key == "name":
            continue
        key_line = loc.key_line(index, key)
        try:
            if key in CONDITION_TYPES:
                conditions.append(CONDITION_TYPES[key].parse(value, ctx))
            elif key in ACTION_TYPES:
                actions.append(ACTION_TYPES[key].parse(value, ctx))
            else:
                problems.append(Problem(key_line, label, f"unknown key {key!r} ({_suggest(key)})"))
        except ValueError as exc:
            problems.append(Problem(key_line, label, f"{key}: {exc}"))
    assigns = [k for k in raw if k in ASSIGN_KEYS]
    if len(assigns) > 1:
        problems.append(
            Problem(loc.key_line(index, assigns[1]), label, f"{assigns[1]} and {assigns[0]}: one assignment per rule")
        )
    if not any(k in ACTION_TYPES for k in raw):
        problems.append(Problem(line, label, f"does nothing: give it an action ({', '.join(ACTION_TYPES)})"))
    if len(problems) > before:
        return None
    return Rule(label, line, tuple(conditions), tuple(actions))


def _unreachable(rules: list[Rule], problems: list[Problem]) -> None:
    """A rule whose conditions include all of an earlier stopping rule's can never run."""
    for i, later in enumerate(rules):
        mine = set(later.conditions)
        for earlier in rules[:i]:
            if earlier.stop and set(earlier.conditions) <= mine:
                what = "matches every mail" if not earlier.conditions else "matches every mail this one matches"
                problems.append(
                    Problem(
                        later.line,
                        later.name,
                        f'unreachable: rule "{earlier.name}" (line {earlier.line}) {what} and stops',
                    )
                )
                break


def parse_rules(text: str, path: str = "<rules>", ctx: Context | None = None) -> Ruleset:
    """Check and build a rule table from the text of a rules file; raises :class:`RulesError`."""
    ctx = ctx or Context()
    loc = _Locator(text)
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:
        # ValueError: an integer too long to convert; RecursionError: arrays nested thousands deep.
        message = str(exc) or type(exc).__name__
        m = _TOML_LINE_RE.search(message)
        line = int(m.group(1)) if m and m.group(1) else len(loc.lines) if m else 1
        index = loc.rule_at(line)
        label = loc.name_in_text(index) if index is not None else ""
        message = _TOML_LINE_RE.sub("", message).strip()
        raise RulesError(path, [Problem(line, label, f"not valid TOML: {message}")]) from None
    problems: list[Problem] = []
    for key in data:
        if key not in TOP_KEYS:
            problems.append(
                Problem(
                    loc.top_key_line(key), "", f"unknown key {key!r} (a rules file has [[rule]] tables and [groups])"
                )
            )
    groups = _groups(data.get("groups", {}), loc, ctx, problems)
    ctx = replace(ctx, groups=groups)
    raw_rules = data.get("rule", [])
    rules: list[Rule] = []
    if not isinstance(raw_rules, list):
        problems.append(Problem(loc.top_key_line("rule"), "", "rule must be [[rule]] tables"))
        raw_rules = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_rules):
        rule = _rule(index, raw, loc, ctx, problems)
        if rule is None:
            continue
        if rule.name in seen:
            problems.append(
                Problem(rule.line, rule.name, f"the name is also the name of the rule at line {seen[rule.name]}")
            )
            continue
        seen[rule.name] = rule.line
        rules.append(rule)
    _unreachable(rules, problems)
    if problems:
        raise RulesError(path, sorted(problems, key=lambda p: p.line))
    return Ruleset(tuple(rules), groups, ctx.hours or BusinessHours.from_config(HoursConfig()), path)


def load_rules(
    path: str | os.PathLike[str], config: Config | None = None, templates: Templates | None = None
) -> Ruleset:
    """Read and check a rules file against a config (its agents, mailboxes, hours) and the templates found."""
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except OSError as exc:
        raise RulesError(name, [Problem(1, "", f"cannot read: {exc.strerror}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        loc = _Locator(data.decode("utf-8", "replace"))
        index = loc.rule_at(line)
        rule = loc.name_in_text(index) if index is not None else ""
        raise RulesError(name, [Problem(line, rule, "not UTF-8 text")]) from None
    return parse_rules(text, name, context_for(config, templates))
