"""``postroom tickets``: list, show, assign and close tickets from the shell.

The current state of a ticket is Redis's (what the mail path sees); its history is SQL's.  Changes go to Redis
first, the way an agent's command by mail does, and are then recorded in SQL with the invoking user as the actor
(under sudo, the user who ran sudo).  An unknown
mailbox, ticket, agent or state is the admin's mistake: a message on stderr and exit status 2.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from postroom.admin.common import CONFIG_OPTION, EXIT_SERVICE, fail, load_or_exit, redis_store
from postroom.config import Config, MailboxConfig
from postroom.history import make_engine, migrate, write
from postroom.history_rows import EventRow, MessageRow, TicketRow
from postroom.tickets import KEEP, Changes, Record, StoreUnavailable, Ticket
from postroom.words import plural

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def invoking_user() -> str:
    """Who ran the command: sudo's caller if under sudo, else the login of the process."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


STATES = ("new", "open", "pending", "closed")
UNASSIGNED = "unassigned"

MAILBOX_OPTION = click.option(
    "--mailbox",
    "mailbox_name",
    metavar="MAILBOX",
    help="The shared mailbox: its key in the config (support) or its address.  Needed with several mailboxes.",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables.")


@click.group("tickets")
def tickets_group() -> None:
    """List, show, assign and close tickets.

    State comes from Redis, history from the SQL database; both as configured in --config.
    """


def _mailbox(config: Config, name: str | None) -> MailboxConfig:
    if name is None:
        if len(config.mailboxes) == 1:
            return next(iter(config.mailboxes.values()))
        raise fail(f"several mailboxes ({', '.join(config.mailboxes)}): name one with --mailbox")
    for key, box in config.mailboxes.items():
        if name.lower() in (key.lower(), box.address):
            return box
    raise fail(f"unknown mailbox {name!r}; mailboxes: {', '.join(config.mailboxes) or '(none configured)'}")


def _agent(config: Config, name: str, box: MailboxConfig | None = None) -> str:
    login = config.agent_for_login(name)
    if login is None:
        raise fail(f"unknown agent {name!r}; agents: {', '.join(config.agents) or '(none configured)'}")
    if box is not None and login not in box.agents:
        raise fail(f"{login} is not an agent of {box.address}; its agents: {', '.join(box.agents) or '(none)'}")
    return login


def _when(ts: float | datetime | None) -> str:
    if ts is None or ts == 0:
        return ""
    if isinstance(ts, datetime):
        # SQLite hands timestamps back without their zone; they were written in UTC.
        moment = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    else:
        moment = datetime.fromtimestamp(ts, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tag(config: Config, mailbox: str) -> str:
    return next((b.tag for b in config.mailboxes.values() if b.address == mailbox), mailbox)


def _ticket_json(config: Config, t: Ticket) -> dict[str, Any]:
    return {
        "mailbox": t.mailbox,
        "number": t.number,
        "ticket": f"{_tag(config, t.mailbox)} #{t.number}",
        "state": t.state,
        "owner": t.owner,
        "priority": t.priority,
        "tags": list(t.tags),
        "customer": t.customer,
        "subject": t.subject,
        "created": _when(t.created),
        "updated": _when(t.updated),
        "linked": t.linked,
    }


# rich (and the pygments it brings, ~3 MiB) is imported only where a table is printed: the daemons import this
# module through the command line's group and must not carry it.
def _console() -> Console:
    from rich.console import Console  # noqa: PLC0415

    # Wide enough that a subject is not wrapped into three lines when the output goes to a pipe or a file.
    return Console(width=160, soft_wrap=False, highlight=False)


def _table_type() -> type[Table]:
    from rich.table import Table  # noqa: PLC0415

    return Table


def _service_error(what: str, exc: object) -> SystemExit:
    click.echo(f"{what}: {exc}", err=True)
    return SystemExit(EXIT_SERVICE)


@tickets_group.command("list")
@CONFIG_OPTION
@click.option("--owner", metavar="AGENT", help=f"Only this agent's tickets (login); {UNASSIGNED!r} for nobody's.")
@click.option("--state", type=click.Choice(STATES), help="Only tickets in this state.")
@MAILBOX_OPTION
@JSON_OPTION
def list_command(
    config_path: Path, owner: str | None, state: str | None, mailbox_name: str | None, as_json: bool
) -> None:
    """List tickets, the most recently updated first: number, state, owner, priority, customer, subject."""
    config = load_or_exit(config_path)
    boxes = [_mailbox(config, mailbox_name)] if mailbox_name else list(config.mailboxes.values())
    wanted_owner = None if owner is None else "" if owner.lower() == UNASSIGNED else _agent(config, owner)
    store = redis_store(config)
    found: list[Ticket] = []
    try:
        for box in boxes:
            found += store.tickets(box.address)
    except StoreUnavailable as exc:
        raise _service_error(f"{config.redis.target().describe()} is not reachable", exc) from None
    found = [
        t for t in found if (wanted_owner is None or t.owner == wanted_owner) and (state is None or t.state == state)
    ]
    found.sort(key=lambda t: (-t.updated, t.mailbox, -t.number))
    if as_json:
        click.echo(json.dumps([_ticket_json(config, t) for t in found], indent=2, ensure_ascii=False))
        return
    table = _table_type()("Ticket", "State", "Owner", "Priority", "Customer", "Subject", "Updated")
    for t in found:
        table.add_row(
            f"{_tag(config, t.mailbox)} #{t.number}",
            t.state,
            t.owner or UNASSIGNED,
            t.priority,
            t.customer,
            t.subject,
            _when(t.updated),
        )
    console = _console()
    console.print(table)
    console.print(plural(len(found), "ticket"))


@dataclass
class _History:
    row: TicketRow | None = None
    messages: list[MessageRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)


def _history(config: Config, mailbox: str, number: int) -> _History:
    engine = make_engine(config.database.url)
    try:
        with Session(engine) as s:
            row = s.scalars(select(TicketRow).where(TicketRow.mailbox == mailbox, TicketRow.number == number)).first()
            if row is None:
                return _History()
            messages = s.scalars(select(MessageRow).where(MessageRow.ticket_id == row.id).order_by(MessageRow.at))
            events = s.scalars(select(EventRow).where(EventRow.ticket_id == row.id).order_by(EventRow.id))
            found = _History(row, list(messages), list(events))
            s.expunge_all()
            return found
    finally:
        engine.dispose()


def _from_row(row: TicketRow) -> Ticket:
    return Ticket(
        mailbox=row.mailbox,
        number=row.number,
        owner=row.owner,
        state=row.state,
        priority=row.priority,
        customer=row.customer,
        subject=row.subject,
        linked=row.linked,
        created=row.created_at.replace(tzinfo=row.created_at.tzinfo or UTC).timestamp(),
        updated=row.updated_at.replace(tzinfo=row.updated_at.tzinfo or UTC).timestamp(),
    )


@tickets_group.command("show")
@CONFIG_OPTION
@click.argument("number", type=int)
@MAILBOX_OPTION
@JSON_OPTION
def show_command(config_path: Path, number: int, mailbox_name: str | None, as_json: bool) -> None:
    """Show ticket NUMBER: its state, and its messages and events from the history."""
    config = load_or_exit(config_path)
    box = _mailbox(config, mailbox_name)
    problems: list[str] = []
    ticket: Ticket | None = None
    try:
        ticket = redis_store(config).ticket(box.address, number)
    except StoreUnavailable as exc:
        problems.append(f"{config.redis.target().describe()} is not reachable: {exc}")
    try:
        history = _history(config, box.address, number)
    except SQLAlchemyError as exc:
        history = _History()
        problems.append(f"the history database is not readable: {exc.__class__.__name__}: {exc}".splitlines()[0])
    for problem in problems:
        click.echo(f"warning: {problem}", err=True)
    if ticket is None and history.row is not None:
        ticket = _from_row(history.row)  # gone from Redis (or Redis down): the history still knows it
    if ticket is None:
        if len(problems) == 2:
            raise SystemExit(EXIT_SERVICE)
        raise fail(f"no ticket {box.tag} #{number} in {box.address}")
    messages = [
        {
            "at": _when(m.at),
            "direction": m.direction,
            "from": m.from_addr,
            "subject": m.subject,
            "message_id": m.message_id,
            "queue_id": m.queue_id,
        }
        for m in history.messages
    ]
    events = [{"at": _when(e.at), "kind": e.kind, "actor": e.actor, "detail": e.detail} for e in history.events]
    if as_json:
        out = {**_ticket_json(config, ticket), "messages": messages, "events": events}
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    console = _console()
    table_type = _table_type()
    head = table_type.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    for label, value in (
        ("Ticket", f"{box.tag} #{ticket.number} ({box.address})"),
        ("Subject", ticket.subject),
        ("Customer", ticket.customer),
        ("State", ticket.state),
        ("Owner", ticket.owner or UNASSIGNED),
        ("Priority", ticket.priority),
        ("Tags", " ".join(ticket.tags)),
        ("Linked", f"{box.tag} #{ticket.linked}" if ticket.linked else ""),
        ("Created", _when(ticket.created)),
        ("Updated", _when(ticket.updated)),
    ):
        if value:
            head.add_row(label, value)
    console.print(head)
    table = table_type("At", "Direction", "From", "Subject", "Queue id", title="Messages")
    for m in messages:
        table.add_row(m["at"], m["direction"], m["from"], m["subject"], m["queue_id"])
    console.print(table)
    table = table_type("At", "Event", "Actor", "Detail", title="Events")
    for e in events:
        table.add_row(e["at"], e["kind"], e["actor"], e["detail"])
    console.print(table)


def _change(config: Config, box: MailboxConfig, number: int, changes: Changes, *, event: str, detail: str) -> Ticket:
    """Change the ticket in Redis, then record the event in SQL; exits 2 for an unknown ticket."""
    now = time.time()
    store = redis_store(config)
    try:
        ticket = store.update(box.address, number, changes, now)
    except KeyError:
        raise fail(f"no ticket {box.tag} #{number} in {box.address}") from None
    except StoreUnavailable as exc:
        raise _service_error(f"{config.redis.target().describe()} is not reachable", exc) from None
    # No message id and no queue id: an admin's change is an event of the ticket, not a mail.
    record = Record.of(
        ticket, event, now, direction="", queue_id="", message_id="", actor=invoking_user(), subject="", detail=detail
    )
    try:
        if config.database.auto_migrate:
            migrate(config.database.url)
        engine = make_engine(config.database.url)
        try:
            with Session(engine) as session, session.begin():
                write(session, [record])
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        # Redis, which the mail path reads, has the change; only the history line is missing.
        first = str(exc).splitlines()[0]
        raise _service_error(f"{box.tag} #{number} changed, but the history could not record it", first) from None
    return ticket


def _current(config: Config, box: MailboxConfig, number: int) -> Ticket:
    try:
        ticket = redis_store(config).ticket(box.address, number)
    except StoreUnavailable as exc:
        raise _service_error(f"{config.redis.target().describe()} is not reachable", exc) from None
    if ticket is None:
        raise fail(f"no ticket {box.tag} #{number} in {box.address}")
    return ticket


@tickets_group.command("assign")
@CONFIG_OPTION
@click.argument("number", type=int)
@click.argument("agent")
@MAILBOX_OPTION
def assign_command(config_path: Path, number: int, agent: str, mailbox_name: str | None) -> None:
    """Give ticket NUMBER to AGENT (a login of one of the mailbox's agents).

    The agent's next reply goes out as the owner's; the customer's next mail lands in the agent's folder.  A new
    ticket becomes open; any other state stays as it is.
    """
    config = load_or_exit(config_path)
    box = _mailbox(config, mailbox_name)
    login = _agent(config, agent, box)
    before = _current(config, box, number)
    changes = Changes(owner=login, state="open" if before.state == "new" else KEEP)
    ticket = _change(config, box, number, changes, event="assign", detail=f"{login} (was {before.owner or UNASSIGNED})")
    click.echo(f"{box.tag} #{number} assigned to {ticket.owner} (was {before.owner or UNASSIGNED}), {ticket.state}")


@tickets_group.command("close")
@CONFIG_OPTION
@click.argument("number", type=int)
@MAILBOX_OPTION
def close_command(config_path: Path, number: int, mailbox_name: str | None) -> None:
    """Close ticket NUMBER; its owner stays."""
    config = load_or_exit(config_path)
    box = _mailbox(config, mailbox_name)
    before = _current(config, box, number)
    ticket = _change(config, box, number, Changes(state="closed"), event="close", detail=f"was {before.state}")
    click.echo(f"{box.tag} #{number} closed (owner {ticket.owner or UNASSIGNED})")
