"""The inbound path: a customer's mail to a shared mailbox becomes (part of) a ticket.

:func:`inbound` reads the mail once (:class:`CustomerMail`), finds the shared mailboxes among the recipients
(:func:`route`), and for each of them runs the steps of :func:`through_mailbox`, in this order:

1. :func:`find_thread`: which ticket the mail continues (references, then a participant's subject token), if any;
2. :func:`decide`: what the rules say (tags, priority, owner, folder, auto-reply);
3. :func:`apply_to_store`: open the ticket (with its acknowledgement) or record the follow-up;
4. :func:`mailbox_edits`: the ticket headers and the envelope recipient of the agent's (or the team's) folder;
5. :func:`record`: the history record.

:func:`assemble` then puts the edits of every mailbox into one verdict.  Each step is a short function with its
own unit test (tests/test_inbound_steps.py); none does I/O but through the store and assignment state in ``parts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from postroom import bounce, notice, sla, subject
from postroom.autoreply import AutoReplyPlan, plan_auto_reply
from postroom.body import head_of
from postroom.config import Config, MailboxConfig
from postroom.log import message_logger
from postroom.mailer import OutgoingMail
from postroom.mime import (
    SUBJECT_MAX,
    Message,
    addresses,
    charset_hint,
    derived_id,
    encode_header_value,
    folder_address,
    header_text,
    message_id,
    strip_internal,
    ticket_headers,
)
from postroom.parts import Parts
from postroom.rules import Decision, MessageFacts, evaluate
from postroom.tickets import KEEP, Changes, NewTicket, Pending, Record, StoreUnavailable, Ticket, recount
from postroom.verdict import AddHeader, AddRecipient, Edit, Envelope, Outcome, RemoveRecipient, SetHeader, Verdict


@dataclass(frozen=True)
class Routed:
    """A shared mailbox among the mail's recipients."""

    key: str  # the mailbox's key in the config
    box: MailboxConfig
    rcpts: tuple[str, ...]  # the envelope recipients that named this mailbox


@dataclass(frozen=True)
class CustomerMail:
    """What the steps read from the mail, parsed once."""

    message: Message
    text_subject: str  # decoded, for people and the subject token
    info: subject.SubjectInfo
    refs: list[str]  # References and In-Reply-To, oldest first
    own_id: str  # the mail's own Message-ID, "" when it has none
    open_key: str  # what its ticket is opened under: own_id, else an ID derived from its headers
    senders: list[str]  # From addresses and the envelope sender, lower case, each once
    customer: str  # the first From address, else the envelope sender
    charset: str = "utf-8"  # what a raw 8-bit subject was read in, so writing it back keeps its bytes
    has_subject: bool = True

    @staticmethod
    def read(message: Message) -> CustomerMail:
        raw_subject = message.header("Subject")
        text_subject, charset = header_text(raw_subject or "", charset_hint(message.header("Content-Type")))
        from_addrs = addresses(message.header("From"))
        envelope_sender = message.envelope.mail_from.strip("<>").lower()
        own_id = message_id(message.header("Message-ID"))
        return CustomerMail(
            message=message,
            text_subject=text_subject,
            info=subject.parse(text_subject),
            refs=references(message),
            own_id=own_id,
            # Never written into the mail: only the open script and the backlog of this same mail look for it.
            open_key=own_id or derived_id(message, "", "no-message-id.invalid"),
            senders=list(dict.fromkeys([*from_addrs, *([envelope_sender] if envelope_sender else [])])),
            customer=from_addrs[0] if from_addrs else envelope_sender,
            charset=charset,
            has_subject=raw_subject is not None,
        )

    @property
    def queue_id(self) -> str:
        return self.message.envelope.queue_id


def references(message: Message) -> list[str]:
    """References and In-Reply-To, oldest first, without the mail's own Message-ID: a mail cannot answer itself,
    and one that names its own ID there (a broken or a crafted mailer) must not thread by it."""
    own = message_id(message.header("Message-ID"))
    refs = subject.message_ids(message.header("References"), message.header("In-Reply-To"))
    return [r for r in refs if r != own]


@dataclass(frozen=True)
class Thread:
    """The ticket a mail continues (None: it opens one), the ticket a forward links to, and why."""

    ticket: Ticket | None
    linked: int = 0
    why: str = "new"


@dataclass(frozen=True)
class Applied:
    """The ticket after the store step, what happened to it, and the mails that causes (an acknowledgement)."""

    ticket: Ticket
    event: str  # opened, linked, duplicate, followup, reopened
    why: str
    outgoing: list[OutgoingMail] = field(default_factory=list)
    auto_reply: AutoReplyPlan | None = None  # None: none was asked for


@dataclass(frozen=True)
class MailboxResult:
    """Everything one shared mailbox contributes to the verdict."""

    routed: Routed
    decision: Decision
    applied: Applied
    headers: list[Edit]
    recipient_edits: list[Edit]
    record: Record


def inbound(message: Message, parts: Parts, now: float) -> Outcome:
    """The inbound path: every step for every shared mailbox among the recipients, then one verdict."""
    mailboxes = route(message.envelope, parts.config)
    if not mailboxes:
        # An escalation to a lead's own address keeps its X-Postroom-* headers once its Message-ID proves it ours;
        # anything else loses them, as the headers alone prove nothing.
        ours = _notice_to_a_person(message, parts)
        if ours is not None:
            return Outcome(Verdict.accept(summary=f"postroom notice {ours}"))
        edits = strip_internal(message.headers)
        return Outcome(Verdict.accept(*edits, summary="no shared mailbox among the recipients"))
    ours = notice.ours(message, parts.store, [routed.box for routed in mailboxes])
    if ours is not None:
        return Outcome(Verdict.accept(summary=f"postroom notice {ours}"))
    mail = CustomerMail.read(message)
    report = delivery_report(message)
    if report is not None:
        return join_report(mail, mailboxes, parts, now, report)
    return assemble(mail, [through_mailbox(Step(mail, routed, parts, now)) for routed in mailboxes])


def _notice_to_a_person(message: Message, parts: Parts) -> str | None:
    """Which ticket's notice this is, looked up in every shared mailbox (it names none of them as recipient);
    None when it is not ours or the store cannot tell now (the headers are then dropped, never trusted)."""
    try:
        return notice.ours(message, parts.store, list(parts.config.mailboxes.values()))
    except StoreUnavailable:
        return None


@dataclass(frozen=True)
class Step:
    """What every step reads: the mail, one of its shared mailboxes, the parts and the time."""

    mail: CustomerMail
    routed: Routed
    parts: Parts
    now: float

    @property
    def address(self) -> str:
        return self.routed.box.address


def through_mailbox(step: Step) -> MailboxResult:
    """Steps 1 to 5 for one shared mailbox; ``postroom rules test`` runs the same on the in-memory store."""
    thread = find_thread(step)
    decision = decide(step, new_ticket=thread.ticket is None)
    applied = apply_to_store(step, thread, decision)
    headers, recipient_edits = mailbox_edits(step, applied.ticket, decision)
    headers += due_header(step, applied)
    return MailboxResult(step.routed, decision, applied, headers, recipient_edits, record(step, applied))


def degraded_pending(message: Message, config: Config, now: float, kind: str = "degraded") -> list[Pending]:
    """What the tickets of a mail postroom could not decide need, one per shared mailbox it went to
    (postroom.backlog); ``kind`` as in :class:`~postroom.tickets.Pending`."""
    try:
        mail = CustomerMail.read(message)
        return [
            Pending(
                mailbox=r.box.address,
                message_id=mail.own_id,
                customer=mail.customer,
                senders=tuple(mail.senders),
                subject=subject.strip_token(mail.text_subject, r.box.tag),
                queue_id=mail.queue_id,
                at=now,
                open_key=mail.open_key,
                kind=kind,
            )
            for r in route(message.envelope, config)
        ]
    except Exception:  # noqa: BLE001 - logged with its traceback; the failure path must not fail
        # Already the failure path: a mail that cannot be read for its ticket is still delivered.
        message_logger(message.envelope.queue_id).exception("cannot keep the degraded mail for ticketing later")
        return []


def route(envelope: Envelope, config: Config) -> list[Routed]:
    """The shared mailboxes among the envelope recipients, each once, with the recipients that named it."""
    found: dict[str, tuple[MailboxConfig, list[str]]] = {}
    for rcpt in envelope.rcpts:
        hit = config.mailbox_for(rcpt)
        if hit is None:
            continue
        key, box, _detail = hit
        found.setdefault(key, (box, []))[1].append(rcpt)
    return [Routed(key, box, tuple(rcpts)) for key, (box, rcpts) in found.items()]


def find_thread(step: Step) -> Thread:
    """Step 1: which ticket this mail continues."""
    mail, box = step.mail, step.routed.box
    numbers = subject.numbers_for(mail.info, box.tag)
    found = step.parts.store.lookup(box.address, mail.refs, numbers, mail.senders)
    known_token = next((c.ticket for c in found.by_token if c.sender_known), None)
    previous = found.by_reference or known_token
    if mail.info.is_forward and box.forward_prefixes_link:
        # A forward is a new conversation about an old one (often to a new person): link, don't merge.
        return Thread(None, previous.number if previous else 0, "forward")
    if found.by_reference:
        return Thread(found.by_reference, 0, "references")
    if known_token:
        return Thread(known_token, 0, "subject token")
    if found.by_token:
        # A stranger quoting someone else's ticket number must not read or join that ticket (Zammad #5064).
        stray = ", ".join(f"#{c.ticket.number}" for c in found.by_token)
        return Thread(None, 0, f"token {stray} from a sender who is not a participant")
    return Thread(None)


def decide(step: Step, *, new_ticket: bool) -> Decision:
    """Step 2: the rules' decision (an empty one without rules).  A new ticket's owner is counted here."""
    parts = step.parts
    if not parts.rules.rules:
        return Decision()
    facts = MessageFacts.from_message(step.mail.message, step.routed.key, step.address)
    when = datetime.fromtimestamp(step.now, UTC)
    decision = evaluate(parts.rules, facts, when, parts.state(), new_ticket=new_ticket)
    if decision.matched_rule_names:
        message_logger(step.mail.queue_id).info(
            "rules for %s: %s %s", step.address, ", ".join(decision.matched_rule_names), "; ".join(decision.notes)
        )
    return decision


def apply_to_store(step: Step, thread: Thread, decision: Decision) -> Applied:
    """Step 3: open the ticket (or find this very mail's ticket again), or record the follow-up."""
    if thread.ticket is None:
        applied = _open(step, thread, decision)
    else:
        applied = _follow_up(step, thread.ticket, decision, thread.why)
    ticket = applied.ticket
    message_logger(step.mail.queue_id).info(
        "mailbox %s ticket #%d %s (%s) owner=%s",
        step.address,
        ticket.number,
        applied.event,
        applied.why,
        ticket.owner or "unassigned",
    )
    return applied


def _open(step: Step, thread: Thread, decision: Decision) -> Applied:
    mail = step.mail
    new = NewTicket(
        customer=mail.customer,
        # A stranger's or a forwarded ticket's token is not this ticket's name.
        subject=subject.strip_token(mail.text_subject, step.routed.box.tag)[:300],
        participants=tuple(mail.senders),
        message_ids=(mail.open_key,),
        linked=thread.linked,
        owner=decision.owner,
        # Owned is open, as when an agent takes or is given a ticket later (store.assign, #assign).
        state="open" if decision.owner else "new",
        priority=decision.priority or "normal",
        tags=decision.tags,
    )
    # Under open_key, also without a Message-ID: if the client gives up on this call while Redis still runs it,
    # the backlog entry of this mail (postroom.backlog) finds the ticket instead of leaving it a ghost.
    ticket, created = step.parts.store.open_unless_seen(step.address, new, mail.open_key, step.now)
    if not created and "void" in ticket.tags and ticket.state == "closed":
        # Refused for now with a 451 after its ticket had opened, so the backlog made the ticket void: the mail
        # is here now, and the ticket is its own again (with the acknowledgement it never got).
        changes = Changes(state="open" if ticket.owner else "new", remove_tags=("void",))
        ticket = step.parts.store.update(step.address, ticket.number, changes, step.now)
        plan = acknowledge(step, ticket, decision)
        outgoing = [plan.mail] if plan is not None and plan.mail is not None else []
        return Applied(ticket, "opened", "sent again after a 451; its void ticket is its own again", outgoing, plan)
    if not created:
        # The same mail again: it gets the ticket it opened (same number, same folder), and no second
        # acknowledgement goes to the customer.  Touched, so the backlog sees the ticket in use and leaves it.
        ticket = step.parts.store.touch(step.address, ticket.number, [], mail.senders, step.now)
        return Applied(ticket, "duplicate", "its Message-ID is already in this ticket")
    plan = acknowledge(step, ticket, decision)
    outgoing = [plan.mail] if plan is not None and plan.mail is not None else []
    return Applied(ticket, "linked" if thread.linked else "opened", thread.why, outgoing, plan)


def _follow_up(step: Step, ticket: Ticket, decision: Decision, why: str) -> Applied:
    mail, store = step.mail, step.parts.store
    ticket = store.touch(step.address, ticket.number, [mail.own_id] if mail.own_id else [], mail.senders, step.now)
    reopen = ticket.state in ("closed", "pending")
    new_tags = tuple(t for t in decision.tags if t not in ticket.tags)
    if not (reopen or new_tags):
        return Applied(ticket, "followup", why)
    # The customer answered: a closed ticket is live again, a pending one no longer waits for them.
    event = "reopened" if ticket.state == "closed" else "followup"
    changes = Changes(state="open" if reopen else KEEP, add_tags=new_tags)
    after = store.update(step.address, ticket.number, changes, step.now)
    recount(step.parts.assign, step.address, ticket, after)
    return Applied(after, event, why)


def acknowledge(step: Step, ticket: Ticket, decision: Decision) -> AutoReplyPlan | None:
    """The acknowledgement of a new ticket, if the config, the rules and RFC 3834 allow one (None: not asked for)."""
    parts, message = step.parts, step.mail.message
    if not (parts.config.autoreply.acknowledge or decision.auto_reply_template):
        return None
    plan = plan_auto_reply(
        parts.config,
        parts.templates,
        parts.keys,
        parts.state(),
        mailbox=step.routed.key,
        ticket=ticket.number,
        new_ticket=True,
        rule_template=decision.auto_reply_template,
        headers=message.headers,
        envelope_sender=message.envelope.mail_from,
        queue_id=step.mail.queue_id,
        now=datetime.fromtimestamp(step.now, UTC),
    )
    log = message_logger(step.mail.queue_id)
    if plan.mail is None:
        log.info("%s #%d: %s", step.address, ticket.number, plan.reason)
        return plan
    # The customer's answer to the acknowledgement must thread into this ticket.
    parts.store.touch(step.address, ticket.number, [plan.message_id], [], step.now)
    log.info("%s #%d: %s", step.address, ticket.number, plan.mail.what)
    return plan


def mailbox_edits(step: Step, ticket: Ticket, decision: Decision) -> tuple[list[Edit], list[Edit]]:
    """Step 4: the ticket's headers, and the recipient edits that file the mail into its folder."""
    config, box = step.parts.config, step.routed.box
    headers = ticket_headers(ticket, f"{box.tag} #{ticket.number}")
    # The owner's folder; while the owner is away, the rule's folder or the team's inbox.
    folder = decision.folder or box.inbox_folder
    if ticket.owner in config.agents and not step.parts.store.away(box.address, [ticket.owner]):
        folder = config.agent_folder(ticket.owner)
    return headers, reroute(step.routed.rcpts, config.recipient_delimiter, folder)


def due_header(step: Step, applied: Applied) -> list[Edit]:
    """``X-Postroom-Due``: when the answer to this mail is due by the mailbox's SLA targets (none without one)."""
    if applied.event == "duplicate":
        return []
    ticket, box = applied.ticket, step.routed.box
    due = sla.answer_due(step.parts.config, box, ticket.priority, applied.event in ("opened", "linked"), step.now)
    return [] if due is None else [AddHeader("X-Postroom-Due", f"{sla.iso(due)} ({box.tag} #{ticket.number})")]


def record(step: Step, applied: Applied, *, actor: str = "") -> Record:
    """Step 5: the history record of what this mail did to the ticket (by the customer unless ``actor``)."""
    mail = step.mail
    return Record.of(
        applied.ticket,
        applied.event,
        step.now,
        direction="inbound",
        queue_id=mail.queue_id,
        message_id=mail.own_id,
        actor=actor or mail.customer,
        subject=mail.text_subject,
        detail=applied.why,
    )


def assemble(mail: CustomerMail, results: Sequence[MailboxResult]) -> Outcome:
    """One verdict for all mailboxes: internal headers out, the subject with every token, headers, recipients."""
    new_subject = mail.text_subject
    for result in results:
        new_subject = subject.with_token(new_subject, result.routed.box.tag, result.applied.ticket.number)
    edits: list[Edit] = strip_internal(mail.message.headers)
    edits += subject_edit(mail, new_subject)
    edits += [e for result in results for e in result.headers]
    edits += [e for result in results for e in result.recipient_edits]
    summary = "; ".join(
        f"{result.routed.box.tag} #{result.applied.ticket.number} {result.applied.event}" for result in results
    )
    records = [result.record for result in results]
    outgoing = [mail_out for result in results for mail_out in result.applied.outgoing]
    return Outcome(Verdict.accept(*edits, summary=summary), records, outgoing)


def subject_edit(mail: CustomerMail, new_subject: str) -> list[Edit]:
    """The first Subject with its tokens, unless it has them already or is too long to rewrite (mime.SUBJECT_MAX).

    Only the first Subject: a second one (they exist in the wild) is the customer's and stays as it came.
    """
    if len(new_subject) > SUBJECT_MAX:
        message_logger(mail.queue_id).info(
            "subject of %d characters left as it came (longer than %d)", len(mail.text_subject), SUBJECT_MAX
        )
        return []
    if new_subject == mail.text_subject and mail.has_subject:
        return []
    return [SetHeader("Subject", encode_header_value(new_subject, mail.charset), first_only=True)]


DELIVERY_HEADER = "X-Postroom-Delivery-Failure"


def delivery_report(message: Message) -> bounce.Report | None:
    """The delivery report this mail is, if it is one (postroom.bounce)."""
    env = message.envelope
    if not bounce.might_be_report(env.mail_from, message.headers):
        return None
    try:
        body = head_of(message.body, bounce.REPORT_BYTES)
    except RuntimeError:
        # The adapter skipped this body (milter.worker.skipped_body): it keeps every possible report's body, so
        # this is a report it could not tell from its headers; it is read as ordinary mail.
        return None
    return bounce.read_report(env.mail_from, message.headers, body)


def join_report(
    mail: CustomerMail, mailboxes: Sequence[Routed], parts: Parts, now: float, report: bounce.Report
) -> Outcome:
    """A delivery report joins the ticket of the mail it reports on (the owner's folder, marked), never opens one
    and is never answered; a report on a mail we do not know (backscatter of forged mail) gets no ticket and is
    delivered to the team's inbox, marked.  Neither the mailer daemon nor the report's Message-ID joins a ticket."""
    what = report.summary() or "delivery report"
    edits: list[Edit] = strip_internal(mail.message.headers)
    new_subject = mail.text_subject
    records: list[Record] = []
    summaries: list[str] = []
    for routed in mailboxes:
        step = Step(mail, routed, parts, now)
        # The failed recipients are the ticket's customers: they let a disputed Message-ID count.
        found = parts.store.lookup(step.address, list(report.message_ids), [], list(report.recipients))
        if found.by_reference is None:
            message_logger(mail.queue_id).info("%s: delivery report on a mail we do not know (%s)", step.address, what)
            edits.append(AddHeader(DELIVERY_HEADER, f"{what} (no ticket: the reported mail is not one of ours)"))
            summaries.append(f"{routed.box.tag}: unmatched delivery report")
            continue
        ticket = parts.store.touch(step.address, found.by_reference.number, [], [], now)
        event = "delivery_failure" if report.failed else "delivery_report"
        mark = f"{routed.box.tag} #{ticket.number}"
        message_logger(mail.queue_id).info("mailbox %s ticket #%d %s (%s)", step.address, ticket.number, event, what)
        new_subject = subject.with_token(new_subject, routed.box.tag, ticket.number)
        if report.failed:
            edits.append(AddHeader(DELIVERY_HEADER, f"{what} ({mark})"))
        headers, recipient_edits = mailbox_edits(step, ticket, Decision())
        edits += headers + recipient_edits
        summaries.append(f"{mark} {event}")
        actor = mail.message.envelope.mail_from.strip("<>").lower() or "MAILER-DAEMON"
        records.append(record(step, Applied(ticket, event, what), actor=actor))
    if records:
        edits += subject_edit(mail, new_subject)
    return Outcome(Verdict.accept(*edits, summary="; ".join(summaries)), records)


def reroute(rcpts: Sequence[str], delimiter: str, folder: str) -> list[Edit]:
    """Recipient edits that send the mail to ``folder`` of each shared address, one delivery per address."""
    edits: list[Edit] = []
    targets: set[str] = set()
    for rcpt in rcpts:
        target = folder_address(rcpt, delimiter, folder)
        if target.lower() == rcpt.strip("<>").lower():
            targets.add(target.lower())
            continue
        edits.append(RemoveRecipient(rcpt))
        if target.lower() not in targets:
            # support@ and support+x@ in one mail must still make one delivery, not two.
            edits.append(AddRecipient(target))
            targets.add(target.lower())
    return edits
