"""The inbound path: a customer's mail to a shared mailbox becomes (part of) a ticket.

For each shared mailbox among the recipients: find the ticket the mail continues, let the rules decide, open or
update the ticket in the store, build the header and recipient edits, and record what happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from postroom import subject
from postroom.autoreply import NO_TEMPLATES, Templates, plan_auto_reply
from postroom.config import Config, MailboxConfig
from postroom.dkim import Keyring
from postroom.log import message_logger
from postroom.mailer import OutgoingMail
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
from postroom.rules import NO_RULES, Decision, MessageFacts, Ruleset, evaluate
from postroom.tickets import KEEP, AssignmentState, Changes, NewTicket, Record, Ticket, TicketStore, recount
from postroom.verdict import AddRecipient, Edit, Envelope, Outcome, RemoveRecipient, SetHeader, Verdict

NO_KEYS = Keyring({})


@dataclass(frozen=True)
class _Routed:
    key: str
    box: MailboxConfig
    rcpts: tuple[str, ...]  # the envelope recipients that named this mailbox


def _route(envelope: Envelope, config: Config) -> list[_Routed]:
    found: dict[str, tuple[MailboxConfig, list[str]]] = {}
    for rcpt in envelope.rcpts:
        hit = config.mailbox_for(rcpt)
        if hit is None:
            continue
        key, box, _detail = hit
        found.setdefault(key, (box, []))[1].append(rcpt)
    return [_Routed(key, box, tuple(rcpts)) for key, (box, rcpts) in found.items()]


def _decide(
    store: TicketStore,
    routed: _Routed,
    info: subject.SubjectInfo,
    refs: list[str],
    senders: list[str],
) -> tuple[Ticket | None, int, str]:
    """Which ticket this mail continues: (ticket or None for a new one, ticket to link, why)."""
    box = routed.box
    numbers = subject.numbers_for(info, box.tag)
    found = store.lookup(box.address, refs, numbers, senders)
    known_token = next((c.ticket for c in found.by_token if c.sender_known), None)
    previous = found.by_reference or known_token
    if info.is_forward and box.forward_prefixes_link:
        # A forward is a new conversation about an old one (often to a new person): link, don't merge.
        return None, previous.number if previous else 0, "forward"
    if found.by_reference:
        return found.by_reference, 0, "references"
    if known_token:
        return known_token, 0, "subject token"
    if found.by_token:
        # A stranger quoting someone else's ticket number must not read or join that ticket (Zammad #5064).
        stray = ", ".join(f"#{c.ticket.number}" for c in found.by_token)
        return None, 0, f"token {stray} from a sender who is not a participant"
    return None, 0, "new"


@dataclass(frozen=True)
class Extras:
    """What inbound mail needs besides config and store when rules or auto-replies are configured."""

    rules: Ruleset = NO_RULES
    templates: Templates = NO_TEMPLATES
    keys: Keyring = NO_KEYS
    assign: AssignmentState | None = None

    def state(self) -> AssignmentState:
        if self.assign is None:
            raise ValueError("rules and auto-replies need an assignment state (Redis); none was given")
        return self.assign


def inbound(message: Message, config: Config, store: TicketStore, now: float, extras: Extras = Extras()) -> Outcome:
    log = message_logger(message.envelope.queue_id)
    routed = _route(message.envelope, config)
    edits: list[Edit] = strip_internal(message.headers)
    if not routed:
        return Outcome(Verdict.accept(*edits, summary="no shared mailbox among the recipients"))

    raw_subject = message.header("Subject")
    text_subject = readable(raw_subject or "")
    info = subject.parse(text_subject)
    refs = subject.message_ids(message.header("References"), message.header("In-Reply-To"))
    own_id = message_id(message.header("Message-ID"))
    from_addrs = addresses(message.header("From"))
    envelope_sender = message.envelope.mail_from.strip("<>").lower()
    senders = list(dict.fromkeys([*from_addrs, *([envelope_sender] if envelope_sender else [])]))
    customer = from_addrs[0] if from_addrs else envelope_sender

    new_subject = text_subject
    records: list[Record] = []
    headers: list[Edit] = []
    recipient_edits: list[Edit] = []
    summaries: list[str] = []
    outgoing: list[OutgoingMail] = []
    when = datetime.fromtimestamp(now, UTC)
    for r in routed:
        ticket, linked, why = _decide(store, r, info, refs, senders)
        decision = Decision()
        if extras.rules.rules:
            facts = MessageFacts.from_message(message, r.key, r.box.address)
            decision = evaluate(extras.rules, facts, when, extras.state(), new_ticket=ticket is None)
            if decision.matched_rule_names:
                log.info(
                    "rules for %s: %s %s",
                    r.box.address,
                    ", ".join(decision.matched_rule_names),
                    "; ".join(decision.notes),
                )
        if ticket is None:
            # A stranger's or a forwarded ticket's token is not this ticket's name.
            base_subject = subject.strip_token(text_subject, r.box.tag)
            new = NewTicket(
                customer=customer,
                subject=base_subject[:300],
                participants=tuple(senders),
                message_ids=(own_id,) if own_id else (),
                linked=linked,
                owner=decision.owner,
                priority=decision.priority or "normal",
                tags=decision.tags,
            )
            ticket, created = store.open_unless_seen(r.box.address, new, own_id, now)
            if created:
                event = "linked" if linked else "opened"
                outgoing += _auto_reply(
                    message, config, store, extras, r=r, ticket=ticket, decision=decision, when=when
                )
            else:
                # The same mail again: it gets the ticket it opened (same number, same folder), and no second
                # acknowledgement goes to the customer.
                event, why = "duplicate", "its Message-ID is already in this ticket"
        else:
            ticket = store.touch(r.box.address, ticket.number, [own_id] if own_id else [], senders, now)
            event = "followup"
            reopen = ticket.state in ("closed", "pending")
            new_tags = tuple(t for t in decision.tags if t not in ticket.tags)
            if reopen or new_tags:
                # The customer answered: a closed ticket is live again, a pending one no longer waits for them.
                event = "reopened" if ticket.state == "closed" else event
                changes = Changes(state="open" if reopen else KEEP, add_tags=new_tags)
                before = ticket
                ticket = store.update(r.box.address, ticket.number, changes, now)
                recount(extras.assign, r.box.address, before, ticket)
        mark = f"{r.box.tag} #{ticket.number}"
        log.info(
            "mailbox %s ticket #%d %s (%s) owner=%s",
            r.box.address,
            ticket.number,
            event,
            why,
            ticket.owner or "unassigned",
        )
        summaries.append(f"{mark} {event}")
        new_subject = subject.with_token(new_subject, r.box.tag, ticket.number)
        headers += ticket_headers(ticket, mark)
        # The owner's folder; while the owner is away, the rule's folder or the team's inbox.
        folder = decision.folder or r.box.inbox_folder
        if ticket.owner in config.agents and not store.away(r.box.address, [ticket.owner]):
            folder = config.agent_folder(ticket.owner)
        recipient_edits += _reroute(r.rcpts, config.recipient_delimiter, folder)
        records.append(
            Record.of(
                ticket,
                event,
                now,
                direction="inbound",
                queue_id=message.envelope.queue_id,
                message_id=own_id,
                actor=customer,
                subject=text_subject,
                detail=why,
            )
        )
    edits.append(SetHeader("Subject", encode_header_value(new_subject)))
    edits += headers
    edits += recipient_edits
    return Outcome(Verdict.accept(*edits, summary="; ".join(summaries)), records, outgoing)


def _auto_reply(
    message: Message,
    config: Config,
    store: TicketStore,
    extras: Extras,
    *,
    r: _Routed,
    ticket: Ticket,
    decision: Decision,
    when: datetime,
) -> list[OutgoingMail]:
    """The acknowledgement of a new ticket, if the config, the rules and RFC 3834 allow one."""
    if not (config.autoreply.acknowledge or decision.auto_reply_template):
        return []
    plan = plan_auto_reply(
        config,
        extras.templates,
        extras.keys,
        extras.state(),
        mailbox=r.key,
        ticket=ticket.number,
        new_ticket=True,
        rule_template=decision.auto_reply_template,
        headers=message.headers,
        envelope_sender=message.envelope.mail_from,
        queue_id=message.envelope.queue_id,
        now=when,
    )
    log = message_logger(message.envelope.queue_id)
    if plan.mail is None:
        log.info("%s #%d: %s", r.box.address, ticket.number, plan.reason)
        return []
    # The customer's answer to the acknowledgement must thread into this ticket.
    store.touch(r.box.address, ticket.number, [plan.message_id], [], when.timestamp())
    log.info("%s #%d: %s", r.box.address, ticket.number, plan.mail.what)
    return [plan.mail]


def _reroute(rcpts: Sequence[str], delimiter: str, folder: str) -> list[Edit]:
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
