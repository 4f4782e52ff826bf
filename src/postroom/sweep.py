"""``postroom sweep``: mails that reached a shared mailbox without postroom get their ticket, in place.

A mail delivered degraded (Redis was away) or while the milter was down (Postfix's ``milter_default_action =
accept``) sits in the shared mailbox without a token in its subject and without ``X-Postroom-Ticket``.  The sweep
logs in to each shared mailbox over IMAP as postroom's Dovecot master user (``[imap]``, the one
``postroom dovecot-snippet`` sets up), finds those mails (``SEARCH NOT HEADER
X-Postroom-Ticket ""``), runs each through the inbound pipeline as the customer's mail it is, and replaces it by
the ticketed version: APPENDed to the same folder with the same flags and internal date, and only once the server
said the replacement is stored is the original flagged \\Deleted and expunged (UID EXPUNGE, that mail alone).  A
sweep that stopped between the two leaves both; the next one finds the ticketed copy by the original's Message-ID
in the same folder and only deletes the original.

A mail whose ticket the backlog already opened (postroom.backlog) finds that ticket by its Message-ID.  Copies of
agents' replies (From a shared address) are left alone, and no acknowledgement goes out for a swept mail: the
customer wrote long enough ago that a late one would confuse more than help.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from postroom.config import Config, MailboxConfig
from postroom.imap_event import imap_quote, master_login, namespace_prefix
from postroom.mime import Message, addresses, message_id
from postroom.runtime import Runtime
from postroom.smtpd.message import RawMail, parse
from postroom.smtpd.rewrite import rewrite
from postroom.verdict import Action, AddHeader, Envelope, SetHeader

log = logging.getLogger("postroom")

TICKET_HEADER = "X-Postroom-Ticket"
_LIST = re.compile(rb'^\((?P<flags>[^)]*)\) (?:"[^"]*"|NIL) (?P<name>.+)$')
_DATE = re.compile(rb'INTERNALDATE "([^"]+)"')


class SweepError(RuntimeError):
    """The sweep cannot run (not configured, IMAP refused the login); the message says what to fix."""


@dataclass
class Swept:
    mailbox: str
    folder: str
    replaced: int = 0
    skipped: int = 0  # not a customer's mail, or the store still away
    failed: int = 0


# mailbox -> a context that holds the mailbox's sweep lock, giving False when another sweep holds it.
Lock = Callable[[str], AbstractContextManager[bool]]


def sweep(runtime: Runtime, now: float, lock: Lock | None = None) -> list[Swept]:
    """Sweep every shared mailbox once; see the module docstring.

    ``lock`` (RedisStore.sweeping in the daemons and the command): one sweep per mailbox at a time, whichever host
    or process runs it; two at once would both store a replacement of the same mail.
    """
    imap_cfg = runtime.config.imap
    done: list[Swept] = []
    for box in runtime.config.mailboxes.values():
        with (lock or _unlocked)(box.address) as held:
            if not held:
                log.info("sweep %s: another sweep is at work on it; left to that one", box.address)
                continue
            try:
                with master_login(runtime.config, box.address) as imap:
                    done += [_folder(runtime, imap, box, folder, now) for folder in _folders(imap, runtime.config)]
            except imaplib.IMAP4.error as exc:
                raise SweepError(f"IMAP for {box.address} as master user {imap_cfg.master_user}: {exc}") from None
            except (OSError, IndexError) as exc:
                raise SweepError(_unreachable(runtime.config, exc)) from None
    return done


@contextlib.contextmanager
def _unlocked(mailbox: str) -> Iterator[bool]:
    yield True


def _unreachable(config: Config, exc: OSError | IndexError) -> str:
    cfg = config.imap
    if isinstance(exc, IndexError) or exc.filename == cfg.master_password_file:
        reason = "empty" if isinstance(exc, IndexError) else exc.strerror
        return f"[imap] master_password_file {cfg.master_password_file!r}: {reason}"
    return f"IMAP at {cfg.host}:{cfg.port}: {exc}"


def _folders(imap: imaplib.IMAP4, config: Config) -> list[str]:
    """The shared mailbox's own folders (INBOX, the agents', Done): not the public namespaces, which show the same
    mailboxes again to their agents."""
    public = {namespace_prefix(b) for b in config.mailboxes.values()}
    _typ, data = imap.list()
    names: list[str] = []
    for line in data:
        m = _LIST.match(line) if isinstance(line, bytes) else None
        if m is None or b"\\noselect" in m.group("flags").lower():
            continue
        name = m.group("name").decode("utf-8", "replace")
        name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\") if name.startswith('"') else name
        if name.split("/", 1)[0] not in public:
            names.append(name)
    return names


def _folder(runtime: Runtime, imap: imaplib.IMAP4, box: MailboxConfig, folder: str, now: float) -> Swept:
    swept = Swept(box.address, folder)
    if imap.select(imap_quote(folder))[0] != "OK":
        return swept
    _typ, found = imap.uid("SEARCH", "NOT", "HEADER", TICKET_HEADER, '""')
    for uid in (found[0] or b"").decode().split():
        outcome = _replace(runtime, imap, box, folder, uid, now=now)
        setattr(swept, outcome, getattr(swept, outcome) + 1)
    if swept.replaced or swept.failed:
        log.info(
            "sweep %s/%s: %d replaced, %d left, %d failed",
            box.address,
            folder,
            swept.replaced,
            swept.skipped,
            swept.failed,
        )
    return swept


def _replace(runtime: Runtime, imap: imaplib.IMAP4, box: MailboxConfig, folder: str, uid: str, *, now: float) -> str:
    """One mail: "replaced", "skipped" or "failed" (the original then stays as it is)."""
    _typ, fetched = imap.uid("FETCH", uid, "(FLAGS INTERNALDATE BODY.PEEK[])")
    part = next((p for p in fetched if isinstance(p, tuple)), None)
    if part is None:
        return "skipped"  # expunged meanwhile
    meta, raw = part
    date = _DATE.search(meta)
    flags = "(" + " ".join(f.decode() for f in imaplib.ParseFlags(meta) if f.lower() != b"\\recent") + ")"
    mail = parse(raw)
    if _already_replaced(imap, uid, message_id(next((v for k, v in mail.headers if k.lower() == "message-id"), ""))):
        # A sweep stopped between storing the replacement and deleting the original: finish its work instead of
        # storing a second ticketed copy.
        log.warning(
            "sweep %s/%s: the ticketed copy of UID %s is in the folder already (a sweep stopped half way); "
            "removing the original",
            box.address,
            folder,
            uid,
        )
        _delete(imap, uid)
        return "replaced"
    replacement = _ticketed(runtime, box, mail, now, f"sweep-{uid}")
    if replacement is None or date is None:
        return "skipped"
    typ, data = imap.append(imap_quote(folder), flags, f'"{date.group(1).decode()}"', replacement)
    if typ != "OK":
        # The original stays: nothing is deleted before its replacement is stored.
        log.error("sweep %s/%s: could not store the ticketed mail (UID %s): %s", box.address, folder, uid, data)
        return "failed"
    _delete(imap, uid)
    return "replaced"


def _delete(imap: imaplib.IMAP4, uid: str) -> None:
    imap.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")
    imap.uid("EXPUNGE", uid)


def _already_replaced(imap: imaplib.IMAP4, uid: str, own_id: str) -> bool:
    """Another mail of the selected folder is this one ticketed: its replacement, stored by a sweep that stopped
    before it deleted the original.  Told by the same Message-ID (exactly: IMAP's SEARCH HEADER matches a
    substring) and the same body (a resent mail that reuses a Message-ID with other text is not it; the sweep only
    edits headers).  Without a Message-ID (or one IMAP cannot be asked for as a quoted ASCII string) nothing tells
    the replacement apart, and the answer is False: a second copy rather than a lost mail."""
    if not own_id or not (own_id.isascii() and own_id.isprintable()):
        return False
    _typ, found = imap.uid("SEARCH", "HEADER", "Message-ID", imap_quote(own_id), "HEADER", TICKET_HEADER, '""')
    body: bytes | None = None
    for other in (found[0] or b"").decode().split():
        if other == uid:
            continue
        header = _fetched(imap, other, "BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]")
        if header is None or message_id(header.decode("ascii", "replace").partition(":")[2]) != own_id:
            continue
        if body is None:
            body = _fetched(imap, uid, "BODY.PEEK[TEXT]") or b""
        if _fetched(imap, other, "BODY.PEEK[TEXT]") == body:
            return True
    return False


def _fetched(imap: imaplib.IMAP4, uid: str, item: str) -> bytes | None:
    """One item of one mail (None: expunged meanwhile)."""
    _typ, data = imap.uid("FETCH", uid, f"({item})")
    part = next((p for p in data if isinstance(p, tuple)), None)
    return None if part is None else bytes(part[1])


def _ticketed(runtime: Runtime, box: MailboxConfig, mail: RawMail, now: float, queue_id: str) -> bytes | None:
    """The mail as postroom would have delivered it, or None to leave it as it is.

    ``queue_id`` names the mail in the log (Postfix's is gone), and tells two mails apart that have neither
    Message-ID nor Date (postroom.mime.derived_id)."""
    headers = [(k, v) for k, v in mail.headers if k.lower() != "return-path"]
    if _from_shared(runtime.config, headers):
        return None  # the team's copy of an agent's reply, not a customer's mail
    sender = next((v for k, v in mail.headers if k.lower() == "return-path"), "").strip().strip("<>")
    envelope = Envelope(mail_from=f"<{sender}>", rcpts=[f"<{box.address}>"], queue_id=queue_id)
    outcome = runtime.process(Message(envelope, headers, body=lambda: mail.body), now)
    if outcome.verdict.action is not Action.ACCEPT or not any(
        isinstance(e, AddHeader | SetHeader) and e.name == TICKET_HEADER for e in outcome.verdict.edits
    ):
        return None  # still degraded: the next sweep tries again
    runtime.record(outcome)
    kept = RawMail(mail.headers, mail.body)
    return rewrite(kept, envelope.mail_from, envelope.rcpts, outcome.verdict.edits).data


def _from_shared(config: Config, headers: list[tuple[str, str]]) -> bool:
    shared = {b.address for b in config.mailboxes.values()}
    return any(a in shared for k, v in headers if k.lower() == "from" for a in addresses(v))
