"""The dispatcher: one mail in, one :class:`~postroom.verdict.Outcome` out, never an exception.

Authenticated mail (an agent's, with an SMTP login) takes the outbound path (:mod:`postroom.outbound`), everything
else the inbound path (:mod:`postroom.inbound`).  The paths do no I/O but through the store and assignment state
they are handed.  :func:`process` turns a dead store or an unexpected exception into the configured fail-safe
verdict; the adapters keep their own last-resort handling for what happens outside it (a worker that dies or
hangs, a verdict that cannot be applied).
"""

from __future__ import annotations

from postroom import replies
from postroom.config import Config
from postroom.inbound import degraded_pending, inbound
from postroom.log import message_logger
from postroom.mime import STATUS_HEADER, Message, strip_internal
from postroom.outbound import outbound
from postroom.parts import NO_KEYS, Parts
from postroom.policy import Failure, on_failure
from postroom.tickets import StoreUnavailable
from postroom.verdict import Action, AddHeader, Outcome, Verdict

__all__ = ["NO_KEYS", "STATUS_HEADER", "Message", "Outcome", "Parts", "process"]


def process(message: Message, parts: Parts, now: float) -> Outcome:
    """Run the pipeline; never raises: a dead store or our own bug becomes the fail-safe verdict of DESIGN.md."""
    config = parts.config
    log = message_logger(message.envelope.queue_id)
    # Authenticated submissions are agents' mail (the outbound path); everything else is customer mail.
    is_outbound = bool(message.envelope.auth_login)
    policy = on_failure(config, authenticated=is_outbound).value
    try:
        return outbound(message, parts, now) if is_outbound else inbound(message, parts, now)
    except StoreUnavailable as exc:
        log.error("ticket store unavailable: %s; policy %s", exc, policy)
        outcome = _fail_safe(message, config, replies.S451_STORE_UNAVAILABLE, is_outbound)
        outcome.store_unavailable = True
        if not is_outbound:
            # Delivered: it gets its ticket once the store is back.  Refused for now: the sender sends it again,
            # and a ticket the failed call may have opened all the same is settled (postroom.backlog).
            kind = "degraded" if outcome.verdict.action is Action.ACCEPT else "tempfailed"
            outcome.pending = degraded_pending(message, config, now, kind)
        return outcome
    except Exception:
        # Our bug, not the customer's: deliver (or retry) rather than lose or bounce the mail.
        log.exception("unexpected error in the pipeline; policy %s", policy)
        return _fail_safe(message, config, replies.S451_TEMPORARY_FAILURE, is_outbound)


def _fail_safe(message: Message, config: Config, reply: replies.Reply, is_outbound: bool) -> Outcome:
    if on_failure(config, authenticated=is_outbound) is Failure.TEMPFAIL:
        return Outcome(Verdict.tempfail(reply, summary="tempfail by policy"))
    return Outcome(
        Verdict.accept(
            *strip_internal(message.headers),
            AddHeader(STATUS_HEADER, "degraded"),
            summary="degraded delivery",
        )
    )
