"""What parsing a rule needs besides its own values, and the helpers that check TOML values' types.

TOML hands the loader any type for any key; each helper says what it wanted, in the admin's terms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from postroom.autoreply import BusinessHours


@dataclass(frozen=True)
class Context:
    """The config's view of the team.  ``None`` fields are unknown (``postroom rules check`` without --config):
    references to them are then not checked."""

    hours: BusinessHours | None = None
    mailboxes: Mapping[str, str] | None = None  # key -> shared address
    mailbox_agents: Mapping[str, tuple[str, ...]] | None = None  # key -> agents' logins
    agents: frozenset[str] | None = None
    templates: frozenset[str] | None = None
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # the rules file's [groups]


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def strings(value: Any, what: str = "a string or a list of strings") -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise ValueError(f"must be {what}, got {shown(value)}")
    return tuple(v.strip() for v in items)


def string(value: Any, what: str = "a string") -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be {what}, got {shown(value)}")
    return value.strip()


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {shown(value)}")
    return value
