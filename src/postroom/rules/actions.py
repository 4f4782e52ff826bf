"""What a matching rule does: one small named action per action key of the rules file.

Actions write into a :class:`Draft`.  Tags add up over every matching rule; priority, owner, folder and auto-reply
are set by the first matching rule that names them (a later rule cannot undo an earlier, more specific one: put
specific rules first).  Assignment is only *chosen* here; :func:`postroom.rules.evaluate` carries it out once at
the end, so a group's round-robin turn is used at most once per ticket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from postroom.config import FOLDER_RE
from postroom.rules.context import Context, boolean, shown, string, strings
from postroom.tickets import PRIORITIES, TAG_RE

Strategy = Literal["round-robin", "least-open"]


@dataclass(frozen=True)
class AgentTarget:
    login: str

    def explain(self) -> str:
        return f"agent {self.login}"


@dataclass(frozen=True)
class GroupTarget:
    group: str
    agents: tuple[str, ...]
    strategy: Strategy

    def explain(self) -> str:
        return f"{self.strategy} among {self.group} ({', '.join(self.agents) or 'nobody'})"


Target = AgentTarget | GroupTarget


@dataclass
class Draft:
    """The decision while the table is read top to bottom."""

    tags: list[str] = field(default_factory=list)
    priority: str = ""
    target: Target | None = None
    folder: str = ""
    auto_reply: str = ""
    stop: bool = False


class Action(Protocol):
    key: ClassVar[str]
    description: ClassVar[str]

    def apply(self, draft: Draft) -> None: ...

    def explain(self) -> str: ...


@dataclass(frozen=True)
class Tag:
    key: ClassVar[str] = "tag"
    description: ClassVar[str] = "add these tags (they add up over all matching rules)"
    tags: tuple[str, ...]

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> Tag:
        tags = strings(value, "a tag or a list of tags")
        bad = [t for t in tags if not TAG_RE.match(t)]
        if bad:
            raise ValueError(f"tag {bad[0]!r} must be letters, digits, '_', '.' or '-' (up to 32, no spaces)")
        return cls(tags)

    def apply(self, draft: Draft) -> None:
        draft.tags += [t for t in self.tags if t not in draft.tags]

    def explain(self) -> str:
        return f"tag {' '.join(self.tags)}"


@dataclass(frozen=True)
class Priority:
    key: ClassVar[str] = "priority"
    description: ClassVar[str] = "set the priority: low, normal, high or urgent"
    value: str

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> Priority:
        if value not in PRIORITIES:
            raise ValueError(f"must be one of {', '.join(PRIORITIES)}, got {shown(value)}")
        return cls(str(value))

    def apply(self, draft: Draft) -> None:
        draft.priority = draft.priority or self.value

    def explain(self) -> str:
        return f"priority {self.value}"


@dataclass(frozen=True)
class Assign:
    key: ClassVar[str] = "assign"
    description: ClassVar[str] = "give the ticket to this agent (a login of the config's [agents])"
    login: str

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> Assign:
        login = string(value, "an agent's login")
        if ctx.agents is not None and login not in ctx.agents:
            raise ValueError(f"unknown agent {login!r} (agents: {', '.join(sorted(ctx.agents)) or 'none'})")
        return cls(login)

    def apply(self, draft: Draft) -> None:
        draft.target = draft.target or AgentTarget(self.login)

    def explain(self) -> str:
        return f"assign to {self.login}"


def _group(value: Any, ctx: Context, strategy: Strategy) -> GroupTarget:
    name = string(value, "a group of [groups] or a mailbox key")
    if name in ctx.groups:
        return GroupTarget(name, ctx.groups[name], strategy)
    if ctx.mailbox_agents is None:
        return GroupTarget(name, (), strategy)  # no config to look the mailbox up in: checked with one
    if name in ctx.mailbox_agents:
        if not ctx.mailbox_agents[name]:
            raise ValueError(f"mailbox {name!r} has no agents in the config")
        return GroupTarget(name, ctx.mailbox_agents[name], strategy)
    known = sorted({*ctx.groups, *ctx.mailbox_agents})
    raise ValueError(f"unknown group {name!r} (groups and mailboxes: {', '.join(known) or 'none'})")


@dataclass(frozen=True)
class AssignRoundRobin:
    key: ClassVar[str] = "assign_round_robin"
    description: ClassVar[str] = "give the ticket to the next present agent of a group ([groups] or a mailbox's agents)"
    target: GroupTarget

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> AssignRoundRobin:
        return cls(_group(value, ctx, "round-robin"))

    def apply(self, draft: Draft) -> None:
        draft.target = draft.target or self.target

    def explain(self) -> str:
        return f"assign {self.target.explain()}"


@dataclass(frozen=True)
class AssignLeastOpen:
    key: ClassVar[str] = "assign_least_open"
    description: ClassVar[str] = "give the ticket to the present agent of a group with the fewest open tickets"
    target: GroupTarget

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> AssignLeastOpen:
        return cls(_group(value, ctx, "least-open"))

    def apply(self, draft: Draft) -> None:
        draft.target = draft.target or self.target

    def explain(self) -> str:
        return f"assign {self.target.explain()}"


@dataclass(frozen=True)
class Folder:
    key: ClassVar[str] = "folder"
    description: ClassVar[str] = "file the mail into this folder of the shared mailbox"
    name: str

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> Folder:
        name = string(value, "a folder name")
        if not FOLDER_RE.match(name):
            raise ValueError(f"folder {name!r} must match {FOLDER_RE.pattern}")
        return cls(name)

    def apply(self, draft: Draft) -> None:
        draft.folder = draft.folder or self.name

    def explain(self) -> str:
        return f"folder {self.name}"


@dataclass(frozen=True)
class AutoReply:
    key: ClassVar[str] = "auto_reply"
    description: ClassVar[str] = 'answer a new ticket with this template ("none": no automatic answer at all)'
    template: str

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> AutoReply:
        name = string(value, "a template name")
        if name != "none" and ctx.templates is not None and name not in ctx.templates:
            known = ", ".join(sorted(ctx.templates)) or "none in templates_dir"
            raise ValueError(f"unknown template {name!r} (templates: {known})")
        return cls(name)

    def apply(self, draft: Draft) -> None:
        draft.auto_reply = draft.auto_reply or self.template

    def explain(self) -> str:
        return f"auto-reply {self.template}"


@dataclass(frozen=True)
class Stop:
    key: ClassVar[str] = "stop"
    description: ClassVar[str] = "read no further rules after this one"
    stop: bool

    @classmethod
    def parse(cls, value: Any, ctx: Context) -> Stop:
        return cls(boolean(value))

    def apply(self, draft: Draft) -> None:
        draft.stop = draft.stop or self.stop

    def explain(self) -> str:
        return "stop" if self.stop else "continue"


class ActionType(Protocol):
    """An action class as the loader's table sees it."""

    key: str
    description: str

    def parse(self, value: Any, ctx: Context) -> Action: ...


# The action keys of the rules file, in the order the docs list them.
ACTIONS: tuple[ActionType, ...] = (
    Tag,
    Priority,
    Assign,
    AssignRoundRobin,
    AssignLeastOpen,
    Folder,
    AutoReply,
    Stop,
)
ASSIGN_KEYS = frozenset({Assign.key, AssignRoundRobin.key, AssignLeastOpen.key})
