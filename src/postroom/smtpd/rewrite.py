"""A verdict applied to the mail itself: what the after-queue filter hands back to Postfix.

The milter asks Postfix to make each edit (smfi_addheader, smfi_delrcpt, ...); a content filter makes them
itself, with the same helpers that tell DKIM what the mail will look like (``apply_to_headers``, ``final_body``),
so what was signed is what leaves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from postroom.mime import INTERNAL_PREFIX, STATUS_HEADER
from postroom.smtpd.message import RawMail, render
from postroom.verdict import (
    AddRecipient,
    ChangeSender,
    Edit,
    RemoveRecipient,
    apply_to_headers,
    effective_edits,
    final_body,
)

log = logging.getLogger("postroom.smtpd")


@dataclass(frozen=True)
class Outgoing:
    """One SMTP transaction to Postfix's re-injection listener."""

    mail_from: str  # "" for the null sender
    rcpts: list[str]
    data: bytes


def _key(address: str) -> str:
    return address.strip().strip("<>").lower()


def envelope_after(mail_from: str, rcpts: list[str], edits: tuple[Edit, ...] | list[Edit]) -> tuple[str, list[str]]:
    """Sender and recipients after the edits, applied in order; each address once."""
    sender = mail_from
    current: list[str] = []
    for r in rcpts:
        if _key(r) not in {_key(c) for c in current}:
            current.append(r)
    for edit in edits:
        match edit:
            case ChangeSender(address):
                sender = address.strip().strip("<>")
            case AddRecipient(address):
                if _key(address) not in {_key(c) for c in current}:
                    current.append(address.strip().strip("<>"))
            case RemoveRecipient(address):
                current = [c for c in current if _key(c) != _key(address)]
            case _:
                pass
    return sender, current


def rewrite(mail: RawMail, mail_from: str, rcpts: list[str], edits: tuple[Edit, ...] | list[Edit]) -> Outgoing:
    """The mail with the verdict's edits made: headers, body, sender and recipients."""
    # The same edit set the milter applies: an address both removed and added stays as it was.
    edits = effective_edits(rcpts, edits)
    headers = apply_to_headers(mail.headers, edits)
    body = final_body(mail.body, edits)
    sender, new_rcpts = envelope_after(mail_from, rcpts, edits)
    if not new_rcpts:
        # A verdict that leaves no recipient is a bug of ours; the mail still goes where it was going.
        log.error("the verdict removed every recipient; delivering to the original ones")
        new_rcpts = list(rcpts)
    return Outgoing(sender, new_rcpts, render(headers, body, mail.headers))


def degraded(mail: RawMail, mail_from: str, rcpts: list[str]) -> Outgoing:
    """The failure policy's "deliver it as it is, marked": what the milter does when applying a verdict fails."""
    # Still only we may say who owns a ticket: headers of ours that came from outside go, as in every verdict.
    headers = [(k, v) for k, v in mail.headers if not k.lower().startswith(INTERNAL_PREFIX)]
    return Outgoing(mail_from, list(rcpts), render([*headers, (STATUS_HEADER, "degraded")], mail.body, mail.headers))
