"""The outbound path: an agent's reply, submitted with the agent's own SMTP login, leaves from the shared address.

Identity is the SMTP login (``{auth_authen}``) and nothing else.  The ticket is found from the threading headers
or the subject token, claimed atomically, and the mail rewritten (From, envelope sender, Reply-To, subject
token, internal headers removed), copied into the owner's folder of the shared mailbox and DKIM-signed last.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formataddr, getaddresses

from postroom import commands, replies, subject
from postroom.config import Config, MailboxConfig
from postroom.dkim import Keyring, sign
from postroom.log import message_logger
from postroom.mime import (
    Message,
    addresses,
    encode_header_value,
    folder_address,
    message_id,
    readable,
    strip_internal,
    ticket_headers,
)
from postroom.tickets import KEEP, AssignmentState, Changes, Claim, NewTicket, Record, Ticket, TicketStore, recount
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


class _Reply:
    """One agent's mail on its way through the outbound path; built once, read by the small steps below."""

    def __init__(
        self,
        message: Message,
        config: Config,
        store: TicketStore,
        now: float,
        login: str,
    ) -> None:
        self.message = message
        self.config = config
        self.store = store
        self.now = now
        self.login = login
        env = message.envelope
        self.qid = env.queue_id
        self.external = [r for r in env.rcpts if config.mailbox_for(r) is None]
        self.shared_rcpts = [r for r in env.rcpts if config.mailbox_for(r) is not None]
        self.text_subject = readable(message.header("Subject") or "")
        self.info = subject.parse(self.text_subject)
        self.refs = subject.message_ids(message.header("References"), message.header("In-Reply-To"))
        self.from_addrs = addresses(message.header("From"))
        self.body = message.body()
        self.records: list[Record] = []
        self.assign: AssignmentState | None = None

    def changed(self, box: MailboxConfig, before: Ticket, after: Ticket) -> Ticket:
        """Every ownership change goes through here, so least-open assignment counts stay true."""
        recount(self.assign, box.address, before, after)
        return after

    def record(self, ticket: Ticket, event: str, mid: str = "", detail: str = "") -> None:
        self.records.append(
            Record.of(
                ticket,
                event,
                self.now,
                direction="outbound",
                queue_id=self.qid,
                message_id=mid,
                actor=self.login,
                subject=self.text_subject,
                detail=detail,
            )
        )

    def customer_name(self, ticket: Ticket | None) -> str:
        for name, addr in getaddresses([self.message.header("To") or ""]):
            if name and addr.lower() in [r.strip("<>").lower() for r in self.external]:
                return subject.one_line(name)
        customer = ticket.customer if ticket else (self.external[0] if self.external else "")
        return customer.strip("<>").split("@")[0].replace(".", " ").title()


def outbound(
    message: Message,
    config: Config,
    store: TicketStore,
    keys: Keyring,
    now: float,
    *,
    canned: Mapping[str, Mapping[str, str]] | None = None,
    assign: AssignmentState | None = None,
) -> tuple[Verdict, list[Record]]:
    env = message.envelope
    login = config.agent_for_login(env.auth_login)
    if login is None:
        return Verdict.accept(summary=f"login {env.auth_login} is not an agent: passed through"), []
    r = _Reply(message, config, store, now, login)
    r.assign = assign
    found = _find(config, login, store, from_addrs=r.from_addrs, info=r.info, refs=r.refs)
    if found is None and not r.external:
        # A mail to a shared address without a ticket: the address's own mailbox, if the agent works it.
        boxes = [config.mailbox_for(x) for x in r.shared_rcpts]
        mine = [hit[1] for hit in boxes if hit is not None and login in hit[1].agents]
        found = _Found(mine[0], None) if mine else None
    if found is None:
        return Verdict.accept(summary=f"{login}: personal mail, no ticket, passed through"), []
    box = found.box
    cmds = commands.read(message.headers, r.body)
    try:
        plan = commands.plan(
            cmds,
            agents=list(box.agents),
            canned=dict((canned or {}).get(box.address, {})),
            placeholders={
                "customer_name": r.customer_name(found.ticket),
                "ticket": f"{box.tag} #{found.ticket.number}" if found.ticket else box.tag,
            },
        )
    except commands.CommandError as exc:
        message_logger(r.qid).info("%s: %s refused: %s", box.address, login, exc)
        reply = replies.S550_BAD_COMMAND.format(line=exc.line, reason=exc.reason)
        return Verdict.reject(reply, summary=f"bad command from {login}: {exc.line}"), []
    if not r.external or plan.note:
        return _note(r, box, found.ticket, plan)
    return _reply(r, box, found.ticket, plan, keys)


def _apply_agent_commands(r: _Reply, box: MailboxConfig, plan: commands.Plan) -> None:
    """#away and #back act on the agent in every mailbox the agent works, not on one ticket."""
    boxes = [b for b in r.config.mailboxes.values() if r.login in b.agents]
    for b in boxes:
        if plan.back:
            r.store.clear_away(b.address, r.login)
        if plan.away:
            r.store.set_away(b.address, r.login, plan.away_until, r.now)
            # Nothing may wait for an absent agent: open tickets go to the team's inbox or to present agents.
            for t in r.store.tickets(b.address):
                if t.owner == r.login and t.state != "closed":
                    handed = _hand_over(r, b, t)
                    r.record(handed, "handed_over", detail=f"{r.login} away, now {handed.owner or 'inbox'}")
    if plan.away or plan.back:
        detail = "" if plan.away_until is None else _since(plan.away_until)
        message_logger(r.qid).info("%s is %s %s", r.login, "away" if plan.away else "back", detail)


def _hand_over(r: _Reply, box: MailboxConfig, ticket: Ticket) -> Ticket:
    others = [a for a in box.agents if a != r.login]
    new_owner = ""
    if r.assign is not None and others:
        # The picks skip absent agents and count the ticket for the one they choose.
        if box.away_handover == "round-robin":
            new_owner = r.assign.pick_round_robin(box.address, box.address, others)
        elif box.away_handover == "least-open":
            new_owner = r.assign.pick_least_open(box.address, others)
    updated = r.store.update(box.address, ticket.number, Changes(owner=new_owner), r.now)
    if r.assign is not None:
        r.assign.count_released(box.address, r.login)
    return updated


def _apply_ticket_commands(r: _Reply, box: MailboxConfig, ticket: Ticket, plan: commands.Plan) -> Ticket:
    changes = Changes(
        owner=KEEP if plan.owner is None else plan.owner,
        state=KEEP if plan.state is None else plan.state,
        priority=KEEP if plan.priority is None else plan.priority,
        add_tags=tuple(plan.add_tags),
        remove_tags=tuple(plan.remove_tags),
    )
    if changes:
        ticket = r.changed(box, ticket, r.store.update(box.address, ticket.number, changes, r.now))
    for name, detail in plan.events:
        if name not in ("note", "away", "back"):
            r.record(ticket, name, detail=detail)
    return ticket


def _refused(r: _Reply, box: MailboxConfig, claim: Claim) -> Verdict:
    ticket = claim.ticket
    mark = f"[{box.tag} #{ticket.number}]"
    owner_name = r.config.agent_name(ticket.owner) if ticket.owner in r.config.agents else ticket.owner
    reply = replies.S550_TICKET_OWNED.format(mark=mark, owner=owner_name, since=_since(claim.owned_since))
    message_logger(r.qid).info("%s: mail by %s refused, %s owned by %s", box.address, r.login, mark, ticket.owner)
    r.record(ticket, "rival_refused")
    return Verdict.reject(reply, summary=f"{mark} rival mail by {r.login} refused")


def _note(r: _Reply, box: MailboxConfig, ticket: Ticket | None, plan: commands.Plan) -> tuple[Verdict, list[Record]]:
    """Internal: commands and notes for the team; nothing goes to a customer."""
    if ticket is None and plan.touches_ticket:
        line = next(c for c in commands.read(r.message.headers, r.body) if c.name in commands.TICKET_COMMANDS)
        reply = replies.S550_NO_TICKET.format(line=line.line, tag=box.tag)
        return Verdict.reject(reply, summary=f"command without a ticket from {r.login}"), []
    edits: list[Edit] = strip_internal(r.message.headers)
    if ticket is not None:
        if plan.take or plan.takeover:
            claim = r.store.claim(box.address, ticket.number, r.login, r.now, force=plan.takeover)
            if not claim.won:
                return _refused(r, box, claim), r.records
            ticket = r.changed(box, ticket, claim.ticket)
        _apply_agent_commands(r, box, plan)
        ticket = _apply_ticket_commands(r, box, ticket, plan)
        own_id = message_id(r.message.header("Message-ID"))
        ticket = r.store.touch(box.address, ticket.number, [own_id] if own_id else [], [], r.now)
        r.record(ticket, "note", mid=own_id)
        mark = f"{box.tag} #{ticket.number}"
        subj = subject.with_token(r.text_subject, box.tag, ticket.number)
        edits += ticket_headers(ticket, mark)
        owner = ticket.owner
    else:
        _apply_agent_commands(r, box, plan)
        subj, mark, owner = r.text_subject, box.tag, r.login
    edits.append(SetHeader("Subject", encode_header_value(f"[Note] {subj}")))
    edits.append(AddHeader("X-Postroom-Note", f"{r.login} ({mark})"))
    edits.append(SetHeader("Keywords", "note"))
    folder = r.config.agent_folder(owner) if owner in r.config.agents else box.inbox_folder
    edits += [RemoveRecipient(x) for x in r.message.envelope.rcpts]
    edits.append(AddRecipient(folder_address(box.address, r.config.recipient_delimiter, folder)))
    message_logger(r.qid).info("%s: note by %s on %s into %s", box.address, r.login, mark, folder or "INBOX")
    return Verdict.accept(*edits, summary=f"{mark} note by {r.login}"), r.records


def _reply(
    r: _Reply, box: MailboxConfig, found: Ticket | None, plan: commands.Plan, keys: Keyring
) -> tuple[Verdict, list[Record]]:
    """To a customer: claim, rewrite, copy to the team, sign."""
    config, store, login, now = r.config, r.store, r.login, r.now
    qlog = message_logger(r.qid)
    own_id = message_id(r.message.header("Message-ID"))
    edits: list[Edit] = strip_internal(r.message.headers)
    if not own_id:
        own_id = f"postroom.{uuid.uuid4().hex}@{box.address.rpartition('@')[2]}"
        edits.append(SetHeader("Message-ID", f"<{own_id}>"))
    event = "reply"
    if found is None:
        customer = r.external[0].strip("<>").lower()
        ticket = store.open(
            box.address,
            NewTicket(
                customer=customer,
                subject=r.text_subject[:300],
                participants=(customer,),
                message_ids=(own_id,),
                owner=login,
                state="open",
            ),
            now,
        )
        if r.assign is not None:
            r.assign.count_assigned(box.address, login)
        event = "opened_by_agent"
    else:
        claim = store.claim(box.address, found.number, login, now, force=plan.takeover)
        ticket = r.changed(box, found, claim.ticket)
        if not claim.won:
            if box.on_rival_reply == "reject":
                return _refused(r, box, claim), r.records
            event = f"rival_reply_{box.on_rival_reply}"
        elif plan.takeover and claim.previous_owner not in ("", login):
            event = "takeover"
        ticket = store.touch(box.address, ticket.number, [own_id], [x.strip("<>").lower() for x in r.external], now)
    _apply_agent_commands(r, box, plan)
    ticket = _apply_ticket_commands(r, box, ticket, plan)

    display = box.from_format.format(agent=config.agent_name(login), mailbox=box.tag)
    edits.append(SetHeader("From", display_from(display, box.address)))
    edits.append(SetHeader("Reply-To", box.reply_to or box.address))
    edits.append(SetHeader("Subject", encode_header_value(subject.with_token(r.text_subject, box.tag, ticket.number))))
    edits.append(ChangeSender(box.address))
    if plan.replacements:
        new_body, mime_changes = commands.strip(r.message.headers, r.body, plan.replacements)
        edits.append(ReplaceBody(new_body))
        edits += [SetHeader(k, v) for k, v in mime_changes.items()]
    # The team's copy: into the owner's folder, once, instead of any shared address the agent put in Cc.
    edits += [RemoveRecipient(x) for x in r.shared_rcpts]
    if box.copy_replies:
        owner = ticket.owner if ticket.owner in config.agents else login
        edits.append(AddRecipient(folder_address(box.address, config.recipient_delimiter, config.agent_folder(owner))))
    if event == "rival_reply_warn" and ticket.owner in config.agents:
        # The owner learns at once that someone else answered their customer: a copy in their own inbox.
        edits.append(AddRecipient(config.agents[ticket.owner].address))
    key = keys.for_address(box.address)
    if key is not None:
        signed_headers = apply_to_headers(r.message.headers, edits)
        edits.append(AddHeader("DKIM-Signature", sign(key, signed_headers, final_body(r.body, edits)), top=True))
    else:
        qlog.warning("no DKIM key for %s: the reply leaves unsigned", box.address)
    mark = f"[{box.tag} #{ticket.number}]"
    qlog.info("%s: %s %s by %s (owner %s)", box.address, mark, event, login, ticket.owner or "-")
    r.record(ticket, event, mid=own_id)
    return Verdict.accept(*edits, summary=f"{mark} {event} by {login}"), r.records
