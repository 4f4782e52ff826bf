"""The outbound path: an agent's mail, submitted with the agent's own SMTP login, leaves from the shared address.

Identity is the SMTP login (``{auth_authen}``) and nothing else.  :func:`outbound` reads the mail once
(:class:`AgentMail`), then:

1. :func:`find_ticket`: the mailbox and ticket from the threading headers or the subject token;
2. :func:`plan_commands`: what the command lines (parsed once) ask for, all checked before anything changes;
3. to a customer (:func:`to_customer`): :func:`claim_or_open` the ticket in the store, :func:`apply_commands`,
   then the edits (:func:`rewrite`, :func:`team_copy`, :func:`sign` last);
   to the team only (:func:`to_team`, a ``#note`` or commands alone): the same store steps, and the mail filed
   into the owner's folder, never sent to a customer;
4. the history records, collected in a :class:`Journal` as the steps go.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from email.utils import formataddr, getaddresses

from postroom import commands, replies, subject
from postroom.body import head_of
from postroom.config import MailboxConfig
from postroom.dkim import sign as dkim_sign
from postroom.log import message_logger
from postroom.mime import (
    SUBJECT_MAX,
    Message,
    addresses,
    derived_id,
    encode_header_value,
    folder_address,
    message_id,
    readable,
    shorten,
    strip_internal,
    ticket_headers,
)
from postroom.parts import Parts
from postroom.tickets import KEEP, Changes, Claim, NewTicket, Record, Ticket, recount
from postroom.verdict import (
    AddHeader,
    AddRecipient,
    ChangeSender,
    Edit,
    Outcome,
    RemoveRecipient,
    ReplaceBody,
    SetHeader,
    Verdict,
    apply_to_headers,
    final_chunks,
)


@dataclass(frozen=True)
class AgentMail:
    """One agent's mail, read once; the steps read it and never change it."""

    message: Message
    login: str  # the agent, from the SMTP login
    external: list[str]  # recipients outside every shared mailbox: the customers
    shared_rcpts: list[str]  # recipients that are shared mailboxes
    text_subject: str
    info: subject.SubjectInfo
    refs: list[str]
    from_addrs: list[str]
    head: bytes  # the body's top, where commands stand (commands.HEAD_BYTES): the body is never read whole here

    @staticmethod
    def read(message: Message, parts: Parts, login: str) -> AgentMail:
        config = parts.config
        rcpts = message.envelope.rcpts
        # A customer's subject of 100 KB quoted in the reply is cut (mime.SUBJECT_MAX) before the token goes in.
        text_subject = shorten(readable(message.header("Subject") or ""), SUBJECT_MAX)
        return AgentMail(
            message=message,
            login=login,
            external=[x for x in rcpts if config.mailbox_for(x) is None],
            shared_rcpts=[x for x in rcpts if config.mailbox_for(x) is not None],
            text_subject=text_subject,
            info=subject.parse(text_subject),
            refs=subject.message_ids(message.header("References"), message.header("In-Reply-To")),
            from_addrs=addresses(message.header("From")),
            head=head_of(message.body, commands.HEAD_BYTES),
        )

    @property
    def queue_id(self) -> str:
        return self.message.envelope.queue_id

    def customer_name(self, ticket: Ticket | None) -> str:
        """How a canned reply addresses the customer: the To display name, else a name made from the address."""
        for name, addr in getaddresses([self.message.header("To") or ""]):
            if name and addr.lower() in [x.strip("<>").lower() for x in self.external]:
                return subject.one_line(name)
        customer = ticket.customer if ticket else (self.external[0] if self.external else "")
        return customer.strip("<>").split("@")[0].replace(".", " ").title()


@dataclass(frozen=True)
class Found:
    box: MailboxConfig
    ticket: Ticket | None  # None: a new mail from the shared identity opens a ticket


@dataclass
class Journal:
    """The history records one agent's mail causes, in the order the steps cause them (the path's one
    mutable object)."""

    mail: AgentMail
    now: float
    records: list[Record] = field(default_factory=list)

    def add(self, ticket: Ticket, event: str, mid: str = "", detail: str = "", direction: str = "") -> None:
        """An event; with ``direction`` also the mail's message row (one per mail, not one per command)."""
        self.records.append(
            Record.of(
                ticket,
                event,
                self.now,
                direction=direction,
                queue_id=self.mail.queue_id,
                message_id=mid,
                actor=self.mail.login,
                subject=self.mail.text_subject,
                detail=detail,
            )
        )


@dataclass(frozen=True)
class Step:
    """What every step after :func:`find_ticket` reads: the mail, the parts, the mailbox, the time, the journal."""

    mail: AgentMail
    parts: Parts
    box: MailboxConfig
    now: float
    journal: Journal

    def changed(self, before: Ticket, after: Ticket) -> Ticket:
        """Every ownership change goes through here, so least-open assignment counts stay true."""
        recount(self.parts.assign, self.box.address, before, after)
        return after

    def outcome(self, verdict: Verdict) -> Outcome:
        return Outcome(verdict, self.journal.records)


@dataclass(frozen=True)
class Settled:
    """The ticket after the claim (or opening), and the event to record; ``refused`` when the rival policy says no."""

    ticket: Ticket
    event: str
    refused: Claim | None = None


def outbound(message: Message, parts: Parts, now: float) -> Outcome:
    """The outbound path: agent mail to a customer or to the team, never left unrewritten."""
    config = parts.config
    login = config.agent_for_login(message.envelope.auth_login)
    if login is None:
        return Outcome(Verdict.accept(summary=f"login {message.envelope.auth_login} is not an agent: passed through"))
    mail = AgentMail.read(message, parts, login)
    found = find_ticket(mail, parts)
    if found is None:
        return Outcome(Verdict.accept(summary=f"{login}: personal mail, no ticket, passed through"))
    step = Step(mail, parts, found.box, now, Journal(mail, now))
    try:
        plan = plan_commands(step, found.ticket, commands.read(message.headers, mail.head))
    except commands.CommandError as exc:
        message_logger(mail.queue_id).info("%s: %s refused: %s", found.box.address, login, exc)
        refusal = replies.S550_BAD_COMMAND.format(line=exc.line, reason=exc.reason)
        return Outcome(Verdict.reject(refusal, summary=f"bad command from {login}: {exc.line}"))
    if not mail.external or plan.note:
        return to_team(step, found.ticket, plan)
    return to_customer(step, found.ticket, plan)


def find_ticket(mail: AgentMail, parts: Parts) -> Found | None:
    """Step 1: the agent's mailbox and the ticket the mail continues (None: personal mail, passed through)."""
    config, store = parts.config, parts.store
    boxes = [b for b in config.mailboxes.values() if mail.login in b.agents]
    for box in boxes:
        # An agent of the mailbox may use any of its tickets' tokens: the login is the proof, not the sender.
        numbers = subject.numbers_for(mail.info, box.tag)
        # A reference to a Message-ID two senders used counts for the ticket of the customers written to.
        customers = [x.strip("<>").lower() for x in mail.external]
        lookup = store.lookup(box.address, mail.refs, numbers, customers)
        ticket = lookup.by_reference or next((c.ticket for c in lookup.by_token), None)
        if ticket is not None:
            return Found(box, ticket)
    for box in boxes:
        if box.address in mail.from_addrs:
            return Found(box, None)
    if not mail.external:
        # A mail to a shared address without a ticket: the address's own mailbox, if the agent works it.
        hits = [config.mailbox_for(x) for x in mail.shared_rcpts]
        mine = [hit[1] for hit in hits if hit is not None and mail.login in hit[1].agents]
        return Found(mine[0], None) if mine else None
    return None


def plan_commands(step: Step, ticket: Ticket | None, lines: list[commands.Command]) -> commands.Plan:
    """Step 2: what the command lines ask for, checked against the mailbox; raises CommandError."""
    box = step.box
    return commands.plan(
        lines,
        agents=list(box.agents),
        canned=dict(step.parts.canned.get(box.address, {})),
        placeholders={
            "customer_name": step.mail.customer_name(ticket),
            "ticket": f"{box.tag} #{ticket.number}" if ticket else box.tag,
        },
    )


def to_customer(step: Step, found: Ticket | None, plan: commands.Plan) -> Outcome:
    """Claim (or open), apply the commands, rewrite, copy to the team, sign."""
    mail, box = step.mail, step.box
    edits: list[Edit] = strip_internal(mail.message.headers)
    own_id = message_id(mail.message.header("Message-ID"))
    if not own_id:
        # Derived from the mail, not random: the client's retry of the same mail after a 451 gets the same ID, so
        # a ticket the failed attempt opened after all is this mail's (claim_or_open), not a ghost.
        own_id = derived_id(mail.message, mail.login, box.address.rpartition("@")[2])
        edits.append(SetHeader("Message-ID", f"<{own_id}>"))
    settled = claim_or_open(step, found, plan, own_id)
    if settled.refused is not None:
        return step.outcome(refuse_rival(step, settled.refused))
    if settled.event == "takeover":
        # The mail's own record is the takeover event: the #takeover line needs no second one.
        plan = replace(plan, events=[e for e in plan.events if e[0] != "takeover"])
    ticket = apply_commands(step, settled.ticket, plan)
    edits += rewrite(step, ticket, plan)
    edits += team_copy(step, ticket, settled.event)
    edits += sign(step, edits)
    mark = f"[{box.tag} #{ticket.number}]"
    message_logger(mail.queue_id).info(
        "%s: %s %s by %s (owner %s)", box.address, mark, settled.event, mail.login, ticket.owner or "-"
    )
    step.journal.add(ticket, settled.event, mid=own_id, direction="outbound")
    return step.outcome(Verdict.accept(*edits, summary=f"{mark} {settled.event} by {mail.login}"))


def claim_or_open(step: Step, found: Ticket | None, plan: commands.Plan, own_id: str) -> Settled:
    """Store step: a new ticket owned by the agent, or the claim on the ticket found (the rival policy decides)."""
    mail, box, store, now = step.mail, step.box, step.parts.store, step.now
    if found is None:
        customer = mail.external[0].strip("<>").lower()
        new = NewTicket(
            customer=customer,
            subject=mail.text_subject[:300],
            participants=(customer,),
            message_ids=(own_id,),
            owner=mail.login,
            state="open",
        )
        # By Message-ID: a retry after a timeout that still opened the ticket uses it instead of opening a ghost.
        ticket, _created = store.open_unless_seen(box.address, new, own_id, now)
        if step.parts.assign is not None:
            step.parts.assign.count_assigned(box.address, mail.login)
        return Settled(ticket, "opened_by_agent")
    claim = store.claim(box.address, found.number, mail.login, now, force=plan.takeover)
    ticket = step.changed(found, claim.ticket)
    event = "reply"
    if not claim.won:
        if box.on_rival_reply == "reject":
            return Settled(ticket, "rival_refused", refused=claim)
        event = f"rival_reply_{box.on_rival_reply}"
    elif plan.takeover and claim.previous_owner not in ("", mail.login):
        event = "takeover"
    customers = [x.strip("<>").lower() for x in mail.external]
    return Settled(store.touch(box.address, ticket.number, [own_id], customers, now), event)


def refuse_rival(step: Step, claim: Claim) -> Verdict:
    """The 5.7.1 the agent's client shows: who owns the ticket since when, and how to take it over."""
    config, ticket = step.parts.config, claim.ticket
    mark = f"[{step.box.tag} #{ticket.number}]"
    owner_name = config.agent_name(ticket.owner) if ticket.owner in config.agents else ticket.owner
    refusal = replies.S550_TICKET_OWNED.format(mark=mark, owner=owner_name, since=_since(claim.owned_since))
    message_logger(step.mail.queue_id).info(
        "%s: mail by %s refused, %s owned by %s", step.box.address, step.mail.login, mark, ticket.owner
    )
    step.journal.add(
        ticket, "rival_refused", mid=message_id(step.mail.message.header("Message-ID")), direction="refused"
    )
    return Verdict.reject(refusal, summary=f"{mark} rival mail by {step.mail.login} refused")


def apply_commands(step: Step, ticket: Ticket, plan: commands.Plan) -> Ticket:
    """Store step: #away/#back for the agent, then the ticket's own commands in one update."""
    apply_agent_commands(step, plan)
    after = apply_ticket_commands(step, ticket, plan)
    if plan.away or plan.back:
        # In the history on the ticket the agent answered: a rebuild of Redis from it (postroom.rebuild) knows
        # who is away, and until when.
        until = "" if plan.away_until is None else f"until {_since(plan.away_until)}"
        step.journal.add(after, "away" if plan.away else "back", detail=until)
    return after


def apply_agent_commands(step: Step, plan: commands.Plan) -> None:
    """#away and #back act on the agent in every mailbox the agent works, not on one ticket."""
    mail, store = step.mail, step.parts.store
    for box in (b for b in step.parts.config.mailboxes.values() if mail.login in b.agents):
        if plan.back:
            store.clear_away(box.address, mail.login)
        if plan.away:
            store.set_away(box.address, mail.login, plan.away_until, step.now)
            # Nothing may wait for an absent agent: open tickets go to the team's inbox or to present agents.
            for ticket in store.owned(box.address, mail.login):
                handed = hand_over(step, box, ticket)
                step.journal.add(handed, "handed_over", detail=f"{mail.login} away, now {handed.owner or 'inbox'}")
    if plan.away or plan.back:
        detail = "" if plan.away_until is None else _since(plan.away_until)
        message_logger(mail.queue_id).info("%s is %s %s", mail.login, "away" if plan.away else "back", detail)


def hand_over(step: Step, box: MailboxConfig, ticket: Ticket) -> Ticket:
    """An absent agent's open ticket: to a present agent by the mailbox's away_handover, else to the inbox."""
    login, assign = step.mail.login, step.parts.assign
    others = [a for a in box.agents if a != login]
    new_owner = ""
    if assign is not None and others:
        # The picks skip absent agents and count the ticket for the one they choose.
        if box.away_handover == "round-robin":
            new_owner = assign.pick_round_robin(box.address, box.address, others)
        elif box.away_handover == "least-open":
            new_owner = assign.pick_least_open(box.address, others)
    updated = step.parts.store.update(box.address, ticket.number, Changes(owner=new_owner), step.now)
    if assign is not None:
        assign.count_released(box.address, login)
    return updated


def apply_ticket_commands(step: Step, ticket: Ticket, plan: commands.Plan) -> Ticket:
    """#assign, #release, #close, #priority, #tag ...: one atomic update, one history event per command."""
    changes = Changes(
        owner=KEEP if plan.owner is None else plan.owner,
        state=KEEP if plan.state is None else plan.state,
        priority=KEEP if plan.priority is None else plan.priority,
        add_tags=tuple(plan.add_tags),
        remove_tags=tuple(plan.remove_tags),
    )
    if changes:
        ticket = step.changed(ticket, step.parts.store.update(step.box.address, ticket.number, changes, step.now))
    for name, detail in plan.events:
        if name not in ("note", "away", "back"):
            step.journal.add(ticket, name, detail=detail)
    return ticket


def rewrite(step: Step, ticket: Ticket, plan: commands.Plan) -> list[Edit]:
    """Edits: From the shared address in the agent's name, Reply-To, the subject token, the envelope sender, and
    the command lines out of the body (a canned reply's text in their place)."""
    config, box, mail = step.parts.config, step.box, step.mail
    display = box.from_format.format(agent=config.agent_name(mail.login), mailbox=box.tag)
    edits: list[Edit] = [
        SetHeader("From", display_from(display, box.address)),
        SetHeader("Reply-To", box.reply_to or box.address),
        SetHeader("Subject", encode_header_value(subject.with_token(mail.text_subject, box.tag, ticket.number))),
        ChangeSender(box.address),
    ]
    if plan.replacements:
        # Only here is the body read whole: commands are replaced in every text part of it.
        new_body, mime_changes = commands.strip(mail.message.headers, mail.message.body(), plan.replacements)
        edits.append(ReplaceBody(new_body))
        edits += [SetHeader(k, v) for k, v in mime_changes.items()]
    return edits


def team_copy(step: Step, ticket: Ticket, event: str) -> list[Edit]:
    """Edits: the team's copy into the owner's folder, once, instead of any shared address the agent put in Cc."""
    config, box, login = step.parts.config, step.box, step.mail.login
    edits: list[Edit] = [RemoveRecipient(x) for x in step.mail.shared_rcpts]
    if box.copy_replies:
        owner = ticket.owner if ticket.owner in config.agents else login
        edits.append(AddRecipient(folder_address(box.address, config.recipient_delimiter, config.agent_folder(owner))))
    if event == "rival_reply_warn" and ticket.owner in config.agents:
        # The owner learns at once that someone else answered their customer: a copy in their own inbox.
        edits.append(AddRecipient(config.agents[ticket.owner].address))
    return edits


def sign(step: Step, edits: list[Edit]) -> list[Edit]:
    """The DKIM signature over the mail as the edits leave it: the last edit, or none without a key."""
    key = step.parts.keys.for_address(step.box.address)
    if key is None:
        message_logger(step.mail.queue_id).warning("no DKIM key for %s: the reply leaves unsigned", step.box.address)
        return []
    headers = apply_to_headers(step.mail.message.headers, edits)
    return [AddHeader("DKIM-Signature", dkim_sign(key, headers, final_chunks(step.mail.message.body, edits)), top=True)]


def to_team(step: Step, ticket: Ticket | None, plan: commands.Plan) -> Outcome:
    """Internal: commands and notes for the team, filed into the owner's folder; nothing goes to a customer."""
    mail, box = step.mail, step.box
    if ticket is None and plan.touches_ticket:
        refusal = replies.S550_NO_TICKET.format(line=plan.ticket_lines[0], tag=box.tag)
        return step.outcome(Verdict.reject(refusal, summary=f"command without a ticket from {mail.login}"))
    if ticket is None:
        apply_agent_commands(step, plan)
        return step.outcome(file_note(step, None))
    if plan.take or plan.takeover:
        claim = step.parts.store.claim(box.address, ticket.number, mail.login, step.now, force=plan.takeover)
        if not claim.won:
            return step.outcome(refuse_rival(step, claim))
        ticket = step.changed(ticket, claim.ticket)
    ticket = apply_commands(step, ticket, plan)
    own_id = message_id(mail.message.header("Message-ID"))
    ticket = step.parts.store.touch(box.address, ticket.number, [own_id] if own_id else [], [], step.now)
    step.journal.add(ticket, "note", mid=own_id, direction="note")
    return step.outcome(file_note(step, ticket))


def file_note(step: Step, ticket: Ticket | None) -> Verdict:
    """The note's edits: marked as a note, into the owner's folder (the agent's own without a ticket)."""
    config, box, mail = step.parts.config, step.box, step.mail
    edits: list[Edit] = strip_internal(mail.message.headers)
    if ticket is not None:
        mark = f"{box.tag} #{ticket.number}"
        subj = subject.with_token(mail.text_subject, box.tag, ticket.number)
        edits += ticket_headers(ticket, mark)
        owner = ticket.owner
    else:
        subj, mark, owner = mail.text_subject, box.tag, mail.login
    edits.append(SetHeader("Subject", encode_header_value(f"[Note] {subj}")))
    edits.append(AddHeader("X-Postroom-Note", f"{mail.login} ({mark})"))
    edits.append(SetHeader("Keywords", "note"))
    folder = config.agent_folder(owner) if owner in config.agents else box.inbox_folder
    edits += [RemoveRecipient(x) for x in mail.message.envelope.rcpts]
    edits.append(AddRecipient(folder_address(box.address, config.recipient_delimiter, folder)))
    message_logger(mail.queue_id).info("%s: note by %s on %s into %s", box.address, mail.login, mark, folder or "INBOX")
    return Verdict.accept(*edits, summary=f"{mark} note by {mail.login}")


def display_from(display: str, address: str) -> str:
    """``"Meier via Support" <support@...>``: always quoted (as clients show it), RFC 2047 when not ASCII."""
    display = " ".join(display.split())
    if display.isascii():
        return '"' + display.replace("\\", "\\\\").replace('"', '\\"') + f'" <{address}>'
    return formataddr((display, address), charset="utf-8")


def _since(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))
