"""What a running daemon hands the pipeline with every mail, the same for the milter and the after-queue filter.

One object, built once by the ``postroom`` command and swapped as a whole on reload, so both adapters always run
the pipeline with the same parts and a mail in flight keeps the parts it started with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from postroom.config import Config
from postroom.dkim import Keyring
from postroom.history import HistoryWriter
from postroom.pipeline import NO_KEYS
from postroom.store import TicketStore


@dataclass
class Runtime:
    """What every connection shares: swapped as a whole on reload, read once per connection."""

    config: Config
    store: TicketStore
    history: HistoryWriter | None
    keys: Keyring = NO_KEYS
    canned: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # mailbox -> name -> text
