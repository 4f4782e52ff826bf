"""Verdicts: what the pipeline decides and every adapter (milter, after-queue filter) applies.

A verdict is an action plus a list of edits.  Edits name headers and recipients, never positions in a
particular protocol, so the milter turns them into smfi_* calls and the smtpd adapter into a rewritten message.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from postroom.body import chunks_of
from postroom.replies import Reply

if TYPE_CHECKING:
    from postroom.mailer import OutgoingMail
    from postroom.tickets import Pending, Record


class Action(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"


@dataclass(frozen=True)
class AddHeader:
    name: str
    value: str
    top: bool = False  # insert above all other headers (DKIM-Signature, as signers conventionally do)


@dataclass(frozen=True)
class SetHeader:
    """Replace the first occurrence of ``name`` (or add it when absent) and delete any further ones, unless
    ``first_only``: a customer's second Subject line is theirs to keep, only the first carries our token."""

    name: str
    value: str
    first_only: bool = False


@dataclass(frozen=True)
class RemoveHeader:
    """Remove every occurrence of ``name``."""

    name: str


@dataclass(frozen=True)
class AddRecipient:
    address: str


@dataclass(frozen=True)
class RemoveRecipient:
    address: str


@dataclass(frozen=True)
class ChangeSender:
    address: str


@dataclass(frozen=True)
class ReplaceBody:
    body: bytes


Edit = AddHeader | SetHeader | RemoveHeader | AddRecipient | RemoveRecipient | ChangeSender | ReplaceBody


def apply_to_headers(headers: list[tuple[str, str]], edits: tuple[Edit, ...] | list[Edit]) -> list[tuple[str, str]]:
    """The header block as it will be after the edits: what DKIM signs and what the smtpd adapter writes."""
    out = list(headers)
    for edit in edits:
        match edit:
            case AddHeader(name, value, top):
                if top:
                    out.insert(0, (name, value))
                else:
                    out.append((name, value))
            case SetHeader(name, value, first_only):
                lname = name.lower()
                idx = [i for i, (k, _) in enumerate(out) if k.lower() == lname]
                if idx:
                    out[idx[0]] = (out[idx[0]][0], value)
                    for i in [] if first_only else reversed(idx[1:]):
                        del out[i]
                else:
                    out.append((name, value))
            case RemoveHeader(name):
                lname = name.lower()
                out = [(k, v) for k, v in out if k.lower() != lname]
            case _:
                pass
    return out


def final_body(body: bytes, edits: tuple[Edit, ...] | list[Edit]) -> bytes:
    for edit in edits:
        if isinstance(edit, ReplaceBody):
            body = edit.body
    return body


def final_chunks(body: bytes | Callable[[], bytes], edits: tuple[Edit, ...] | list[Edit]) -> Iterable[bytes]:
    """The body as it will leave, in chunks: the last replacement, or the mail's own body without a whole copy of
    it (what DKIM hashes)."""
    for edit in reversed(edits):
        if isinstance(edit, ReplaceBody):
            return [edit.body]
    return chunks_of(body)


@dataclass(frozen=True)
class Verdict:
    action: Action = Action.ACCEPT
    edits: tuple[Edit, ...] = ()
    reply: Reply | None = None
    # One short phrase for the log line an admin greps by queue id.
    summary: str = ""

    @staticmethod
    def accept(*edits: Edit, summary: str = "") -> Verdict:
        return Verdict(Action.ACCEPT, tuple(edits), None, summary)

    @staticmethod
    def reject(reply: Reply, summary: str = "") -> Verdict:
        return Verdict(Action.REJECT, (), reply, summary)

    @staticmethod
    def tempfail(reply: Reply, summary: str = "") -> Verdict:
        return Verdict(Action.TEMPFAIL, (), reply, summary)


@dataclass
class Envelope:
    """What the SMTP session told us before the body: all an adapter collects besides headers and body."""

    mail_from: str
    rcpts: list[str]
    queue_id: str = ""
    auth_login: str = ""  # {auth_authen}: the only source of an agent's identity
    client_addr: str = ""
    macros: dict[str, str] = field(default_factory=dict)


def _addr(address: str) -> str:
    return address.strip().strip("<>").lower()


def effective_edits(rcpts: list[str], edits: tuple[Edit, ...] | list[Edit]) -> list[Edit]:
    """The edits an adapter should apply to a mail with these envelope recipients.

    Removing and adding the same address is dropped as a whole: Postfix's delrcpt removes every copy of an
    address, the one just added included, and a mail left without recipients is accepted and silently
    discarded.  For the same reason, if the removals would leave no recipient at all they are not applied.
    """
    added = {_addr(e.address) for e in edits if isinstance(e, AddRecipient)}
    removed = {_addr(e.address) for e in edits if isinstance(e, RemoveRecipient)}
    same = added & removed
    out = [e for e in edits if not (isinstance(e, AddRecipient | RemoveRecipient) and _addr(e.address) in same)]
    remaining = ({_addr(r) for r in rcpts} - removed) | added
    if not remaining:
        out = [e for e in out if not isinstance(e, RemoveRecipient)]
    return out


@dataclass
class Outcome:
    """What the pipeline returns for one mail: the verdict, and what the adapter does once it is applied."""

    verdict: Verdict
    records: list[Record] = field(default_factory=list)
    # Mails we write because of this one (auto-replies); the adapter hands them to the mailer once the
    # verdict is applied, so nothing is sent for a mail Postfix did not take.
    outgoing: list[OutgoingMail] = field(default_factory=list)
    # A mail delivered degraded: what its tickets need once Redis is back (postroom.backlog).
    pending: list[Pending] = field(default_factory=list)
    # The ticket store was unreachable for this mail: the adapter counts it in the process that serves /metrics
    # (with [milter] workers >= 1 the pipeline runs in a worker, whose counters nobody scrapes).
    store_unavailable: bool = False
