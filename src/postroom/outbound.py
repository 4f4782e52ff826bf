"""The outbound path: an agent's reply, submitted with the agent's own SMTP login, leaves from the shared address.

Identity is the SMTP login (``{auth_authen}``) and nothing else.  The ticket is found from the threading headers
or the subject token, claimed atomically, and the mail rewritten (From, envelope sender, Reply-To, subject
token, internal headers removed), copied into the owner's folder of the shared mailbox and DKIM-signed last.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from email.utils import formataddr

from postroom import commands, replies, subject
from postroom.config import Config, MailboxConfig
from postroom.dkim import Keyring, sign
from postroom.history import Record
from postroom.log import message_logger
from postroom.mime import Message, addresses, encode_header_value, folder_address, message_id, readable, strip_internal
from postroom.store import Claim, NewTicket, Ticket, TicketStore
from postroom.verdict import (
    AddHeader,
    AddRecipient,
    ChangeSender,
    Edit,
    RemoveRecipient,
    ReplaceBody,
    SetHeader,
    Verdict,
    apply_to_headers,
    final_body,
)

log = logging.getLogger("postroom")


@dataclass(frozen=True)
class _Found:
    box: MailboxConfig
    ticket: Ticket | None  # None: a new mail from the shared identity opens a ticket


def _find(
    config: Config, login: str, store: TicketStore, *, from_addrs: list[str], info: subject.SubjectInfo, refs: list[str]
) -> _Found | None:
    boxes = [b for b in config.mailboxes.values() if login in b.agents]
    for box in boxes:
        # An agent of the mailbox may use any of its tickets' tokens: the login is the proof, not the sender.
        numbers = subject.numbers_for(info, box.tag)
        found = store.lookup(box.address, refs, numbers, [])
        ticket = found.by_reference or next((c.ticket for c in found.by_token), None)
        if ticket is not None:
            return _Found(box, ticket)
    for box in boxes:
        if box.address in from_addrs:
            return _Found(box, None)
    return None


def display_from(display: str, address: str) -> str:
    """``"Meier via Support" <support@...>``: always quoted (as clients show it), RFC 2047 when not ASCII."""
    display = " ".join(display.split())
    if display.isascii():
        return '"' + display.replace("\\", "\\\\").replace('"', '\\"') + f'" <{address}>'
    return formataddr((display, address), charset="utf-8")


def _since(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def outbound(
    message: Message, config: Config, store: TicketStore, keys: Keyring, now: float
) -> tuple[Verdict, list[Record]]:
    env = message.envelope
    qlog = message_logger(env.queue_id)
    login = config.agent_for_login(env.auth_login)
    if login is None:
        return Verdict.accept(summary=f"login {env.auth_login} is not an agent: passed through"), []
    external = [r for r in env.rcpts if config.mailbox_for(r) is None]
    shared_rcpts = [r for r in env.rcpts if config.mailbox_for(r) is not None]
    if not external:
        # Mail to the shared address itself is an internal note (commands by mail): delivered as it is for now.
        return Verdict.accept(summary=f"{login}: mail to the shared mailbox only, delivered as it is"), []

    text_subject = readable(message.header("Subject") or "")
    info = subject.parse(text_subject)
    refs = subject.message_ids(message.header("References"), message.header("In-Reply-To"))
    from_addrs = addresses(message.header("From"))
    found = _find(config, login, store, from_addrs=from_addrs, info=info, refs=refs)
    if found is None:
        return Verdict.accept(summary=f"{login}: personal mail, no ticket, passed through"), []
    box = found.box
    body = message.body()
    cmds = commands.read(message.headers, body)
    takeover = any(c.name == "takeover" for c in cmds)

    own_id = message_id(message.header("Message-ID"))
    edits: list[Edit] = strip_internal(message.headers)
    if not own_id:
        own_id = f"postroom.{uuid.uuid4().hex}@{box.address.rpartition('@')[2]}"
        edits.append(SetHeader("Message-ID", f"<{own_id}>"))
    event = "reply"
    if found.ticket is None:
        customer = external[0].strip("<>").lower()
        ticket = store.open(
            box.address,
            NewTicket(
                customer=customer,
                subject=text_subject[:300],
                participants=(customer,),
                message_ids=(own_id,),
                owner=login,
                state="open",
            ),
            now,
        )
        event = "opened_by_agent"
        claim = Claim(True, ticket, "", now)
    else:
        claim = store.claim(box.address, found.ticket.number, login, now, force=takeover)
        ticket = claim.ticket
        mark = f"[{box.tag} #{ticket.number}]"
        if not claim.won:
            owner_name = config.agent_name(ticket.owner) if ticket.owner in config.agents else ticket.owner
            if box.on_rival_reply == "reject":
                reply = replies.S550_TICKET_OWNED.format(mark=mark, owner=owner_name, since=_since(claim.owned_since))
                qlog.info("%s: reply by %s refused, %s owned by %s", box.address, login, mark, ticket.owner)
                record = _record(
                    box, ticket, "rival_refused", now, qid=env.queue_id, mid=own_id, login=login, subj=text_subject
                )
                return Verdict.reject(reply, summary=f"{mark} rival reply by {login} refused"), [record]
            event = f"rival_reply_{box.on_rival_reply}"
        elif takeover and claim.previous_owner not in ("", login):
            event = "takeover"
        store.touch(box.address, ticket.number, [own_id], [r.strip("<>").lower() for r in external], now)

    agent_name = config.agent_name(login)
    display = box.from_format.format(agent=agent_name, mailbox=box.tag)
    edits.append(SetHeader("From", display_from(display, box.address)))
    edits.append(SetHeader("Reply-To", box.reply_to or box.address))
    edits.append(SetHeader("Subject", encode_header_value(subject.with_token(text_subject, box.tag, ticket.number))))
    edits.append(ChangeSender(box.address))
    if cmds:
        new_body, mime_changes = commands.strip(message.headers, body, [""] * len(cmds))
        edits.append(ReplaceBody(new_body))
        edits += [SetHeader(k, v) for k, v in mime_changes.items()]
    # The team's copy: into the owner's folder, once, instead of any shared address the agent put in Cc.
    edits += [RemoveRecipient(r) for r in shared_rcpts]
    if box.copy_replies:
        owner = ticket.owner if ticket.owner in config.agents else login
        edits.append(AddRecipient(folder_address(box.address, config.recipient_delimiter, config.agent_folder(owner))))
    if event == "rival_reply_warn" and ticket.owner in config.agents:
        # The owner learns at once that someone else answered their customer: a copy in their own inbox.
        edits.append(AddRecipient(config.agents[ticket.owner].address))
    key = keys.for_address(box.address)
    if key is not None:
        signed_headers = apply_to_headers(message.headers, edits)
        edits.append(AddHeader("DKIM-Signature", sign(key, signed_headers, final_body(body, edits)), top=True))
    else:
        qlog.warning("no DKIM key for %s: the reply leaves unsigned", box.address)
    mark = f"[{box.tag} #{ticket.number}]"
    qlog.info("%s: %s %s by %s (owner %s)", box.address, mark, event, login, ticket.owner or "-")
    record = _record(box, ticket, event, now, qid=env.queue_id, mid=own_id, login=login, subj=text_subject)
    return Verdict.accept(*edits, summary=f"{mark} {event} by {login}"), [record]


def _record(
    box: MailboxConfig, t: Ticket, event: str, now: float, *, qid: str, mid: str, login: str, subj: str
) -> Record:
    return Record(
        mailbox=box.address,
        number=t.number,
        event=event,
        at=now,
        customer=t.customer,
        ticket_subject=t.subject,
        owner=t.owner,
        state=t.state,
        priority=t.priority,
        linked=t.linked,
        message_id=mid,
        direction="outbound",
        queue_id=qid,
        from_addr=login,
        subject=subj[:1000],
        actor=login,
        detail="",
    )
