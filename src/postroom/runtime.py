"""What a running daemon hands the pipeline with every mail, the same for the milter and the after-queue filter.

One object, built once by the ``postroom`` command and swapped as a whole on reload, so both adapters always run
the pipeline with the same parts and a mail in flight keeps the parts it started with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from postroom.autoreply import NO_TEMPLATES, Templates
from postroom.bundle import Loaded
from postroom.config import Config
from postroom.dkim import Keyring
from postroom.history import HistoryWriter
from postroom.mailer import Mailer, OutgoingMail
from postroom.mime import Message
from postroom.pipeline import NO_KEYS, Outcome, process
from postroom.rules import NO_RULES, Ruleset
from postroom.tickets import AssignmentState, TicketStore


@dataclass
class Runtime:
    """What every connection shares: swapped as a whole on reload, read once per connection."""

    config: Config
    store: TicketStore
    history: HistoryWriter | None
    keys: Keyring = NO_KEYS
    canned: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # mailbox -> name -> text
    rules: Ruleset = NO_RULES
    templates: Templates = NO_TEMPLATES
    assign: AssignmentState | None = None  # round-robin turns, open counts, auto-reply cap (Redis)
    mailer: Mailer | None = None  # sends auto-replies through the local Postfix

    def process(self, message: Message, now: float) -> Outcome:
        """The pipeline with every part of this runtime: the one call both adapters make."""
        return process(
            message,
            self.config,
            self.store,
            now,
            keys=self.keys,
            canned=self.canned,
            rules=self.rules,
            templates=self.templates,
            assign=self.assign,
        )

    def handle(self, message: Message, now: float) -> Outcome:
        """Run the pipeline and record its history: what every adapter does with each mail."""
        outcome = self.process(message, now)
        self.record(outcome)
        return outcome

    def record(self, outcome: Outcome) -> None:
        """History first: Redis has changed whether or not Postfix takes every edit."""
        if self.history is not None and outcome.records:
            self.history.submit(outcome.records)

    def send(self, outgoing: Iterable[OutgoingMail]) -> None:
        """Hand the mails a mail caused (its outcome's auto-replies) to the mailer, once that mail was taken."""
        if self.mailer is not None:
            for mail in outgoing:
                self.mailer.submit(mail)

    def reloaded(self, loaded: Loaded) -> Runtime:
        """A runtime with a new config, rules, templates, keys and canned replies, and the same connections.

        Redis, the SQL database and the mailer stay as they were started: changing their addresses needs a
        restart, which the caller logs.
        """
        return replace(
            self,
            config=loaded.config,
            rules=loaded.rules,
            templates=loaded.templates,
            keys=loaded.keys,
            canned=loaded.canned,
        )
