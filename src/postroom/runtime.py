"""What a running daemon hands the pipeline with every mail, the same for the milter and the after-queue filter.

One object, built once by the ``postroom`` command and swapped as a whole on reload, so both adapters always run
the pipeline with the same parts and a mail in flight keeps the parts it started with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from postroom.backlog import Backlog
from postroom.bundle import Loaded
from postroom.config import Config
from postroom.history import HistoryWriter
from postroom.mailer import Mailer, OutgoingMail
from postroom.mime import Message
from postroom.parts import Parts
from postroom.pipeline import Outcome, process


@dataclass
class Runtime:
    """What every connection shares: swapped as a whole on reload, read once per connection."""

    parts: Parts  # config, stores, rules, templates, keys, canned replies: what the pipeline runs with
    history: HistoryWriter | None = None
    mailer: Mailer | None = None  # sends auto-replies through the local Postfix
    backlog: Backlog | None = None  # tickets mail delivered degraded once Redis is back

    @property
    def config(self) -> Config:
        return self.parts.config

    def process(self, message: Message, now: float) -> Outcome:
        """The pipeline with this runtime's parts: the one call both adapters make."""
        return process(message, self.parts, now)

    def handle(self, message: Message, now: float) -> Outcome:
        """Run the pipeline and record its history: what every adapter does with each mail."""
        outcome = self.process(message, now)
        self.record(outcome)
        return outcome

    def record(self, outcome: Outcome) -> None:
        """History first: Redis has changed whether or not Postfix takes every edit."""
        if self.history is not None and outcome.records:
            self.history.submit(outcome.records)
        if self.backlog is not None and outcome.pending:
            self.backlog.submit(outcome.pending)

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
        return replace(self, parts=self.parts.reloaded(loaded))
