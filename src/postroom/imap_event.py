"""An agent dragged a mail into a folder of a shared mailbox: claim, close or release its ticket.

Dovecot's IMAPSieve runs ``postroom imap-event FOLDER USER`` (the mail on stdin) for every mail copied or moved
into a folder of a shared mailbox's namespace, as the agent sees it ("Support/Meier").  What a move means:

- into an agent's folder: the ticket is that agent's; the actor is the IMAP user who moved it;
- into the mailbox's ``done_folder``: closed; back into the mailbox itself (its INBOX) or its ``inbox_folder``:
  released (and reopened if it was closed);
- a move that changes a ticket another agent owns follows the mailbox's ``on_rival_reply``, like a rival's reply:
  ``reject`` changes nothing, moves the mail back into the owner's folder and leaves a note in the folder it was
  dropped in; ``warn`` applies the move and leaves a note in the owner's folder; ``allow`` applies it;
- a mail without a ticket (delivered while postroom was down) gets one, as the inbound pipeline would give it.

Every change goes to Redis and then into the SQL history with the IMAP user as actor.  Moving a mail back and
writing notes needs IMAP; the COPY that runs this hook is not finished yet, so that part runs in a detached child
process (``postroom imap-event-followup``) that logs in as the master user once the mail is there.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import email.utils
import imaplib
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

from postroom.config import Config, ConfigError, MailboxConfig, load_config, with_changes
from postroom.mime import Message
from postroom.tickets import KEEP, Changes, Record, Ticket, TicketStore
from postroom.verdict import Envelope

log = logging.getLogger("postroom.imap_event")

# Headers are all we read; the rest of the mail is drained so Dovecot's pipe does not see a broken pipe.
_MAX_HEADER_BYTES = 1 << 20
_TICKET_RE = re.compile(r"^\s*(\d{1,12})\s*\((.+)\)\s*$")
# How long the follow-up waits for the COPY that ran the hook to show the mail in its folder.
FOLLOWUP_WAIT_SECONDS = 20.0


def namespace_prefix(box: MailboxConfig) -> str:
    """The folder agents see the mailbox as: its tag, spaces made dashes (ACL file names are space separated)."""
    return box.tag.replace(" ", "-")


@dataclass(frozen=True)
class Target:
    """Where a mail was dropped: a mailbox and its folder as the mailbox's own user names it ("INBOX", "Meier")."""

    key: str
    box: MailboxConfig
    folder: str


def target(config: Config, imap_mailbox: str) -> Target | None:
    for key, box in config.mailboxes.items():
        prefix = namespace_prefix(box)
        if imap_mailbox == prefix:
            return Target(key, box, "INBOX")
        if imap_mailbox.startswith(prefix + "/"):
            return Target(key, box, imap_mailbox[len(prefix) + 1 :])
    return None


@dataclass(frozen=True)
class Intent:
    kind: Literal["assign", "close", "release", "none"]
    agent: str = ""  # for "assign"


def intent(config: Config, t: Target) -> Intent:
    """What dropping a mail into ``t.folder`` asks for."""
    if t.folder in ("INBOX", t.box.inbox_folder):
        return Intent("release")
    if t.folder == t.box.done_folder:
        return Intent("close")
    for login in t.box.agents:
        if config.agent_folder(login) == t.folder:
            return Intent("assign", login)
    return Intent("none")


@dataclass(frozen=True)
class Decision:
    changes: Changes  # empty: nothing to change
    event: str  # history event
    rival: str = ""  # the other agent who owns the ticket, when the move touches their ticket


def decide(ticket: Ticket, wanted: Intent, actor: str) -> Decision:
    """The change a move makes to a ticket, and whose ticket it touches (pure; the policy is applied later)."""
    reopen = "open" if ticket.state in ("new", "closed") else KEEP
    if wanted.kind == "assign":
        if ticket.owner == wanted.agent and reopen == KEEP:
            return Decision(Changes(), "")
        changes = Changes(owner=wanted.agent, state=reopen)
        event = "assign"
    elif wanted.kind == "close":
        if ticket.state == "closed":
            return Decision(Changes(), "")
        changes, event = Changes(state="closed"), "close"
    elif wanted.kind == "release":
        if not ticket.owner and ticket.state != "closed":
            return Decision(Changes(), "")
        changes = Changes(owner="", state="open" if ticket.state == "closed" else KEEP)
        event = "release"
    else:
        return Decision(Changes(), "")
    owner_changes = changes.owner not in (KEEP, ticket.owner)
    touches_rival = bool(ticket.owner) and ticket.owner != actor and (owner_changes or wanted.kind == "close")
    return Decision(changes, event, ticket.owner if touches_rival else "")


# -- reading the mail ---------------------------------------------------------------------------------------------


def read_headers(stream: BinaryIO) -> list[tuple[str, str]]:
    """The mail's header fields as (name, raw value), reading at most 1 MiB and draining the rest."""
    data = bytearray()
    while len(data) < _MAX_HEADER_BYTES and b"\n\n" not in data and b"\r\n\r\n" not in data:
        chunk = stream.read(65536)
        if not chunk:
            break
        data += chunk
    while stream.read(65536):
        pass
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(bytes(data), headersonly=True)
    return [(name, str(value)) for name, value in parsed.items()]


def ticket_number(headers: list[tuple[str, str]], box: MailboxConfig) -> int | None:
    """The number in ``X-Postroom-Ticket: 17 (Support)`` for this mailbox (inbound mail strips outside copies)."""
    for name, value in headers:
        if name.lower() != "x-postroom-ticket":
            continue
        m = _TICKET_RE.match(" ".join(value.split()))
        if m and m.group(2) == box.tag:
            return int(m.group(1))
    return None


def _first(headers: list[tuple[str, str]], wanted: str) -> str:
    return next((v for n, v in headers if n.lower() == wanted), "")


# -- applying it --------------------------------------------------------------------------------------------------


def record_history(config: Config, records: list[Record]) -> None:
    # Imported here, like the pipeline below: Dovecot starts this program for every drag and the agent's client
    # waits for it, so a move that means nothing does not pay for SQLAlchemy and the rules.
    from sqlalchemy.orm import Session  # noqa: PLC0415

    from postroom.history import make_engine, write  # noqa: PLC0415

    # No migration here (Alembic alone costs more than the rest of a move): the daemons and `postroom db
    # upgrade` bring the schema up to date; an outdated one is an error in Dovecot's log.
    engine = make_engine(config.database.url)
    try:
        with Session(engine) as session, session.begin():
            write(session, records)
    finally:
        engine.dispose()


def _ticket_of(
    config: Config, store: MoveStore, t: Target, headers: list[tuple[str, str]], now: float
) -> tuple[Ticket, list[Record]]:
    """The mail's ticket; a mail without one goes through the inbound pipeline, which threads or opens one."""
    number = ticket_number(headers, t.box)
    found = store.ticket(t.box.address, number) if number is not None else None
    if found is not None:
        return found, []
    from postroom.inbound import inbound  # noqa: PLC0415  (only for mail that has no ticket)
    from postroom.parts import Parts  # noqa: PLC0415

    sender = email.utils.parseaddr(_first(headers, "return-path"))[1]
    message = Message(Envelope(mail_from=sender, rcpts=[t.box.address]), headers)
    # No rules and no acknowledgement: the mail reached the mailbox long ago; it only needs its ticket.
    quiet = with_changes(config, {"autoreply": {"acknowledge": False}})
    outcome = inbound(message, Parts(quiet, store), now)
    records = [r for r in outcome.records if r.mailbox == t.box.address]
    if not records:
        raise LookupError(f"the inbound pipeline gave {t.box.address} no ticket for this mail")
    ticket = store.ticket(t.box.address, records[0].number)
    if ticket is None:
        raise LookupError(f"{t.box.address} #{records[0].number} vanished from Redis")
    return ticket, [
        Record(**{**asdict(r), "detail": f"{r.detail}; found without a ticket by imap-event"}) for r in records
    ]


@dataclass(frozen=True)
class Followup:
    """IMAP work after the hook: move the mail back and/or leave a note (as the master user)."""

    mailbox: str  # the shared mailbox's address: the user the master user logs in as
    number: int  # the ticket
    message_id: str
    dropped_in: str  # folder (the mailbox user's name for it) the agent dropped the mail into
    move_to: str  # "" leaves the mail where it is
    note_folder: str
    note_subject: str
    note_body: str


@dataclass(frozen=True)
class Event:
    """What Dovecot tells us: the folder as the agent sees it, the IMAP user, and the mail's header fields."""

    folder: str
    user: str
    headers: list[tuple[str, str]]


@dataclass(frozen=True)
class _Move:
    config: Config
    target: Target
    ticket: Ticket
    rival: str
    actor: str
    message_id: str

    @property
    def mark(self) -> str:
        return f"[{self.target.box.tag} #{self.ticket.number}]"

    @property
    def seen_as(self) -> str:
        prefix = namespace_prefix(self.target.box)
        return prefix if self.target.folder == "INBOX" else f"{prefix}/{self.target.folder}"

    def owner_name(self) -> str:
        return self.config.agent_name(self.rival) if self.rival in self.config.agents else self.rival

    def home(self) -> str:
        """The rival's folder, in the mailbox user's names."""
        return self.config.agent_folder(self.rival) if self.rival in self.config.agents else "INBOX"


class MoveStore(TicketStore, Protocol):
    def ticket(self, mailbox: str, number: int) -> Ticket | None: ...


@dataclass(frozen=True)
class Effects:
    """What a move does besides Redis: history records, and the IMAP follow-up (a detached process)."""

    record: Callable[[list[Record]], None]
    followup: Callable[[Followup], None]


def effects_for(config: Config, config_path: Path) -> Effects:
    return Effects(lambda records: record_history(config, records), lambda f: start_followup(config_path, f))


def handle(config: Config, store: MoveStore, effects: Effects, event: Event, now: float) -> str:
    """Apply one move; returns what happened, for the log."""
    t = target(config, event.folder)
    if t is None:
        return f"{event.folder}: not a folder of a shared mailbox"
    wanted = intent(config, t)
    if wanted.kind == "none":
        return f"{event.folder}: a folder postroom gives no meaning"
    actor = config.agent_for_login(event.user) or event.user
    ticket, records = _ticket_of(config, store, t, event.headers, now)
    decision = decide(ticket, wanted, actor)
    where = f"moved into {event.folder}"
    applied = None
    for _attempt in range(2):
        if not decision.changes or (decision.rival and t.box.on_rival_reply == "reject"):
            break
        applied = _apply(store, ticket, decision, actor, now)
        if applied is not None:
            break
        # Another agent claimed it between our read and our claim: theirs now, by the same rule as a reply.
        ticket = store.ticket(t.box.address, ticket.number) or ticket
        decision = decide(ticket, wanted, actor)
    move = _Move(config, t, ticket, decision.rival, actor, _first(event.headers, "message-id").strip())
    if applied is None and decision.rival and t.box.on_rival_reply == "reject":
        records.append(_event(ticket, "move_rejected", now, actor, f"{where}; it belongs to {decision.rival}"))
        effects.record(records)
        effects.followup(_rejected(move))
        return f"{move.mark}: {where} by {actor} refused, it belongs to {decision.rival}"
    if applied is not None:
        ticket = applied
        detail = where if not decision.rival else f"{where}; it belonged to {decision.rival}"
        records.append(_event(ticket, decision.event, now, actor, detail))
    if applied is not None and decision.rival and t.box.on_rival_reply == "warn":
        records.append(_event(ticket, "rival_move_warn", now, actor, f"{where}; the owner was {decision.rival}"))
        effects.followup(_warned(move, ticket))
    effects.record(records)
    return f"{move.mark}: {decision.event or 'unchanged'} ({where} by {actor}), owner {ticket.owner or 'unassigned'}"


def _apply(store: MoveStore, ticket: Ticket, decision: Decision, actor: str, now: float) -> Ticket | None:
    """Change the ticket; None when an unowned ticket was claimed by someone else first (the claim is atomic)."""
    if decision.event != "assign":
        return store.update(ticket.mailbox, ticket.number, decision.changes, now)
    # Forced where the move may take the ticket from its owner (the actor's own ticket, or warn/allow).
    force = bool(ticket.owner) and (ticket.owner == actor or bool(decision.rival))
    claim = store.claim(ticket.mailbox, ticket.number, decision.changes.owner, now, force=force)
    if not claim.won:
        return None
    return claim.ticket


def _event(ticket: Ticket, event: str, now: float, actor: str, detail: str) -> Record:
    return Record.of(
        ticket, event, now, direction="imap", queue_id="", message_id="", actor=actor, subject="", detail=detail
    )


def _rejected(m: _Move) -> Followup:
    return Followup(
        mailbox=m.target.box.address,
        number=m.ticket.number,
        message_id=m.message_id,
        dropped_in=m.target.folder,
        move_to=m.home(),
        note_folder=m.target.folder,
        note_subject=f"{m.mark} not moved: it belongs to {m.owner_name()}",
        note_body=(
            f"{m.actor} moved a mail of {m.mark} into {m.seen_as}.\n"
            f"The ticket belongs to {m.owner_name()}, and this mailbox refuses moves of another\n"
            f'agent\'s ticket (on_rival_reply = "reject"), so postroom moved the mail back into {m.home()}.\n'
            "To take the ticket over, answer the customer with the first line #takeover, or ask the owner.\n"
        ),
    )


def _warned(m: _Move, now: Ticket) -> Followup:
    return Followup(
        mailbox=m.target.box.address,
        number=m.ticket.number,
        message_id=m.message_id,
        dropped_in=m.target.folder,
        move_to="",
        note_folder=m.home(),
        note_subject=f"{m.mark} moved by {m.actor} while it was yours",
        note_body=(
            f"{m.actor} moved a mail of {m.mark} into {m.seen_as}: the ticket is now\n"
            f"{now.state}, owner {now.owner or 'unassigned'}.  It was yours.\n"
        ),
    )


# -- the IMAP follow-up (a detached process) ------------------------------------------------------------------


def start_followup(config_path: Path, followup: Followup) -> None:
    """Run the follow-up in a detached process: the COPY that called us only completes once we have exited."""
    command = [sys.executable, "-m", "postroom", "imap-event-followup", "--config", str(config_path)]
    subprocess.Popen(
        [*command, json.dumps(asdict(followup))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def imap_quote(folder: str) -> str:
    # An IMAP quoted string for ASCII text: folder names are FOLDER_RE-checked (no modified UTF-7 needed), the
    # sweep checks the Message-IDs it searches for.
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextmanager
def master_login(config: Config, mailbox: str) -> Iterator[imaplib.IMAP4]:
    """IMAP logged in as the shared mailbox's user through the master user: its private folders INBOX, Meier, ..."""
    password = Path(config.imap.master_password_file).read_text().splitlines()[0].strip()
    imap = imaplib.IMAP4(config.imap.host, config.imap.port, timeout=config.imap.timeout_seconds)
    try:
        imap.login(f"{mailbox}*{config.imap.master_user}", password)
        yield imap
    finally:
        try:
            imap.logout()
        except (OSError, imaplib.IMAP4.error):
            imap.shutdown()


def _find(imap: imaplib.IMAP4, folder: str, message_id: str, deadline: float) -> list[bytes]:
    while True:
        status, _ = imap.select(imap_quote(folder))
        if status == "OK" and message_id:
            _s, data = imap.uid("SEARCH", "HEADER", "Message-ID", imap_quote(message_id))
            uids = data[0].split() if data and data[0] else []
            if uids:
                return uids
        if time.monotonic() > deadline or not message_id:
            return []
        if status == "OK":
            imap.close()
        time.sleep(0.2)


def note_message(config: Config, f: Followup) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"postroom <{f.mailbox}>"
    msg["To"] = f.mailbox
    msg["Subject"] = f.note_subject
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = email.utils.make_msgid(domain=f.mailbox.rpartition("@")[2])
    msg["X-Postroom-Note"] = "imap-event"
    msg.set_content(f.note_body)
    return msg.as_bytes(policy=email.policy.SMTP)


def _send_back(imap: imaplib.IMAP4, f: Followup, uids: list[bytes]) -> str:
    """Move the dropped mail into the owner's folder; if it is there already (the agent copied rather than moved
    it), remove the copy instead, so the owner's folder does not get it twice."""
    already = imap.status(imap_quote(f.move_to), "(MESSAGES)")[0] == "OK" and _in_folder(imap, f)
    imap.select(imap_quote(f.dropped_in))
    numbers = b",".join(uids).decode()
    if already:
        imap.uid("STORE", numbers, "+FLAGS.SILENT", r"(\Deleted)")
        status, detail = imap.uid("EXPUNGE", numbers)
        what = f"removed the copy in {f.dropped_in} ({f.move_to} has the mail)"
    else:
        status, detail = imap.uid("MOVE", numbers, imap_quote(f.move_to))
        what = f"moved the mail from {f.dropped_in} back into {f.move_to}"
    if status != "OK":
        raise imaplib.IMAP4.error(f"{what} failed: {detail!r}")
    return what + "; "


def _in_folder(imap: imaplib.IMAP4, f: Followup) -> bool:
    status, _ = imap.select(imap_quote(f.move_to), readonly=True)
    if status != "OK":
        return False
    _s, data = imap.uid("SEARCH", "HEADER", "Message-ID", imap_quote(f.message_id))
    imap.close()
    return bool(data and data[0])


def run_followup(config: Config, f: Followup, wait: float = FOLLOWUP_WAIT_SECONDS) -> str:
    with master_login(config, f.mailbox) as imap:
        moved = ""
        if f.move_to:
            uids = _find(imap, f.dropped_in, f.message_id, time.monotonic() + wait)
            if uids:
                moved = _send_back(imap, f, uids)
            else:
                moved = f"{f.message_id or 'a mail without Message-ID'} not found in {f.dropped_in}; "
        stamp = imaplib.Time2Internaldate(time.time())
        status, detail = imap.append(imap_quote(f.note_folder), "", stamp, note_message(config, f))
        if status != "OK":
            raise imaplib.IMAP4.error(f"APPEND into {f.note_folder} failed: {detail!r}")
    return f"{moved}note in {f.note_folder}: {f.note_subject}"


def subscribe_team_inboxes(config: Config) -> list[str]:
    """Subscribe every shared mailbox's own INBOX, as its agents see it, on the mailbox's shared subscription
    list (the master user's session has the public namespaces too); logging in also creates the INBOX."""
    done = []
    for box in config.mailboxes.values():
        prefix = namespace_prefix(box)
        with master_login(config, box.address) as imap:
            status, detail = imap.subscribe(imap_quote(prefix))
            if status != "OK":
                raise imaplib.IMAP4.error(f"SUBSCRIBE {prefix} as {box.address}: {detail!r}")
        done.append(f"{box.address}: {prefix} subscribed for its agents")
    return done


def record_failed_followup(config: Config, store: MoveStore, f: Followup, why: str, now: float) -> None:
    """Put a follow-up that could not be done into the ticket's history (``postroom tickets show`` shows it)."""
    try:
        ticket = store.ticket(f.mailbox, f.number)
        if ticket is not None:
            what = f"moving it back into {f.move_to} and " if f.move_to else ""
            detail = f"{what}the note in {f.note_folder} failed: {why}"
            record_history(config, [_event(ticket, "imap_followup_failed", now, config.imap.master_user, detail)])
    except Exception:
        log.exception("could not record the failed IMAP follow-up of %s #%d", f.mailbox, f.number)


# -- the program Dovecot runs ---------------------------------------------------------------------------------


def run_event(config: Config, config_path: Path, folder: str, user: str, stream: BinaryIO) -> None:
    """Read the mail Dovecot pipes in and apply the move; a failure is logged to stderr, never raised: the
    agent's move itself always stands."""
    headers = read_headers(stream)
    try:
        from postroom.store.redis import RedisStore  # noqa: PLC0415

        store = RedisStore.from_url(
            config.redis.url,
            key_prefix=config.redis.key_prefix,
            message_index_days=config.redis.message_index_days,
            timeout=config.redis.timeout_seconds,
        )
        log.debug(
            "%s", handle(config, store, effects_for(config, config_path), Event(folder, user, headers), time.time())
        )
    except Exception:
        log.exception("could not apply the move of a mail into %s by %s", folder, user)


def main(argv: list[str] | None = None) -> int:
    """``python -m postroom.imap_event --config FILE FOLDER USER``: what ``postroom imap-event`` does, without
    loading the rest of the command (the program Dovecot starts for every drag)."""
    parser = argparse.ArgumentParser(prog="python -m postroom.imap_event", description=main.__doc__)
    parser.add_argument("--config", type=Path, default=Path("/etc/postroom/postroom.toml"))
    parser.add_argument("folder")
    parser.add_argument("user")
    args = parser.parse_args(argv)
    # Dovecot logs whatever the program writes to stderr as an error: say only what went wrong there; what a
    # move did is in the ticket's history.
    logging.basicConfig(level=logging.WARNING, format="postroom imap-event: %(message)s", stream=sys.stderr)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    run_event(config, args.config.resolve(), args.folder, args.user, sys.stdin.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
