"""What a mail is decided with besides the mail itself: one object, built by the daemon (or a test, or the
``rules test`` dry run), handed by the dispatcher to either path unchanged.

A daemon's :class:`postroom.runtime.Runtime` holds one and swaps it as a whole on reload, so a mail in flight keeps
the parts it started with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from postroom.autoreply import NO_TEMPLATES, Templates
from postroom.bundle import Loaded
from postroom.config import Config
from postroom.dkim import Keyring
from postroom.rules import NO_RULES, Ruleset
from postroom.tickets import AssignmentState, TicketStore

NO_KEYS = Keyring({})


@dataclass(frozen=True)
class Parts:
    config: Config
    store: TicketStore
    keys: Keyring = NO_KEYS  # DKIM keys per shared domain
    canned: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # mailbox -> name -> text
    rules: Ruleset = NO_RULES
    templates: Templates = NO_TEMPLATES
    assign: AssignmentState | None = None  # round-robin turns, open counts, auto-reply cap (Redis in a daemon)

    def state(self) -> AssignmentState:
        """The assignment state, which rules and auto-replies cannot work without."""
        if self.assign is None:
            raise ValueError("rules and auto-replies need an assignment state (Redis); none was given")
        return self.assign

    def reloaded(self, loaded: Loaded) -> Parts:
        """The same stores with a new config, rules, templates, keys and canned replies."""
        return replace(
            self,
            config=loaded.config,
            rules=loaded.rules,
            templates=loaded.templates,
            keys=loaded.keys,
            canned=loaded.canned,
        )
