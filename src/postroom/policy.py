"""The failure policy (DESIGN.md), decided in one place for the pipeline, the milter and both SMTP servers.

When postroom cannot decide a mail (Redis away, a bug of ours, an edit that cannot be applied), a customer's mail
is delivered as it came with ``X-Postroom-Status: degraded`` (``[milter] on_error = "degraded"``, the default)
or kept in Postfix's queue with :data:`postroom.replies.S451_TEMPORARY_FAILURE` (``on_error = "tempfail"``).  An
agent's authenticated submission is always refused for now (451): it must never leave unrewritten from a personal
address, and the mail client sends it again.
"""

from __future__ import annotations

import enum

from postroom.config import Config


class Failure(enum.Enum):
    TEMPFAIL = "tempfail"  # 451: the sender (Postfix, or the agent's client) tries again
    DEGRADED = "degraded"  # delivered as it came, marked X-Postroom-Status: degraded


def on_failure(config: Config, *, authenticated: bool) -> Failure:
    """What a mail gets when postroom cannot decide it; ``authenticated``: an agent's submission (SMTP AUTH)."""
    if authenticated or config.milter.on_error == "tempfail":
        return Failure.TEMPFAIL
    return Failure.DEGRADED
