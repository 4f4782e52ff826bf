"""``postroom rules check`` and ``postroom rules test``: an admin's tools for the rules file, with no side effects.

Neither command talks to Redis, SQL or Postfix: ``test`` evaluates with an in-memory assignment state (every agent
present, nobody has open tickets, no round-robin turn taken yet) and builds the auto-reply without sending it.
"""

from __future__ import annotations

import email.parser
import email.policy
from datetime import UTC, datetime
from pathlib import Path

import click

from postroom.autoreply import BusinessHours, TemplateError, Templates, load_templates, plan_auto_reply
from postroom.bundle import LoadError, load_all
from postroom.config import Config, ConfigError, load_config
from postroom.mime import addresses, readable, ticket_headers
from postroom.rules import (
    MemoryAssignmentState,
    MessageFacts,
    RulesError,
    Ruleset,
    evaluate,
    load_rules,
)
from postroom.subject import with_token
from postroom.tickets import Ticket
from postroom.verdict import AddHeader, SetHeader


@click.group("rules")
def rules_group() -> None:
    """Check the routing rules file and try it on a mail."""


def _config_or_exit(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"{exc.path}: {problem}", err=True)
        raise SystemExit(2) from None


def _print_table(ruleset: Ruleset) -> None:
    for rule in ruleset.rules:
        click.echo(f"  {rule.line:>4}  {rule.name}: {rule.explain()}")


@rules_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Check agents, mailboxes, groups, opening hours and templates against this config too.",
)
def check_command(path: Path, config_path: Path | None) -> None:
    """Validate a rules file: print every error with file, line and rule name, exit 2 if there is any.

    Without --config only the file itself is checked: its syntax, keys, values and regular expressions, and rules
    that an earlier stopping rule makes unreachable.  With it, agents, groups, mailboxes, the opening hours and the
    auto-reply templates the rules name are checked as well.  On success the table is printed as it will be read.
    """
    config = _config_or_exit(config_path) if config_path else None
    templates: Templates | None = None
    failed = False
    if config is not None:
        try:
            templates = load_templates(config)
        except TemplateError as exc:
            # Report them, and check the rules' template names against nothing rather than against a half set.
            for line in exc.problems:
                click.echo(line, err=True)
            failed = True
    try:
        ruleset = load_rules(path, config, templates)
    except RulesError as exc:
        for problem in exc.problems:
            click.echo(problem.format(exc.path), err=True)
        raise SystemExit(2) from None
    if failed:
        raise SystemExit(2)
    checked = f"against {config_path}" if config_path else "without a config: agents and mailboxes not checked"
    click.echo(f"{path}: OK ({len(ruleset.rules)} rules, {len(ruleset.groups)} groups; {checked})")
    _print_table(ruleset)


def _parse_at(value: str | None, hours: BusinessHours) -> datetime:
    if not value:
        return datetime.now(UTC)
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a time like 2025-01-06T18:30", param_hint="--at") from None
    return at if at.tzinfo else at.replace(tzinfo=hours.zone)


@rules_group.command("test")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The postroom config; its rules_file is used unless --rules names another.",
)
@click.option("--rules", "rules_path", type=click.Path(dir_okay=False, path_type=Path), help="Try this rules file.")
@click.option("--mailbox", "mailbox_keys", multiple=True, help="Treat the mail as sent to this mailbox (config key).")
@click.option("--at", "at_text", help="Pretend the mail arrives at this time (ISO, local to [hours] timezone).")
@click.option("--show-reply", is_flag=True, help="Print the whole auto-reply message, not only its subject.")
@click.argument("message_path", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def test_command(
    *,
    config_path: Path,
    rules_path: Path | None,
    mailbox_keys: tuple[str, ...],
    at_text: str | None,
    show_reply: bool,
    message_path: Path,
) -> None:
    """Show what the rules do with MESSAGE (an .eml file): the rules that match, and the verdict (owner, folder
    and recipient, headers added, auto-reply) - without touching Redis, SQL or Postfix.

    The dry run sees every agent as present and nobody's turn as taken, so round-robin names the group's first
    agent; the ticket number is shown as #NEW in the headers and as 0 in the auto-reply.
    """
    try:
        loaded = load_all(config_path)
    except LoadError as exc:
        for line in exc.problems:
            click.echo(line, err=True)
        raise SystemExit(2) from None
    config, ruleset = loaded.config, loaded.rules
    if rules_path is not None:
        try:
            ruleset = load_rules(rules_path, config, loaded.templates)
        except RulesError as exc:
            for problem in exc.problems:
                click.echo(problem.format(exc.path), err=True)
            raise SystemExit(2) from None
    hours = BusinessHours.from_config(config.hours)
    at = _parse_at(at_text, hours)
    raw = message_path.read_bytes()
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw, headersonly=True)
    headers = [(k, str(v).replace("\r\n", "").replace("\n", "")) for k, v in parsed.items()]
    cut = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0), default=len(raw))
    body = raw[cut:].lstrip(b"\r\n")
    values = {k.lower(): v for k, v in reversed(headers)}
    sender = (addresses(values.get("return-path")) or addresses(values.get("from")) or [""])[0]
    if mailbox_keys:
        unknown = [k for k in mailbox_keys if k not in config.mailboxes]
        if unknown:
            raise click.BadParameter(f"no mailbox {unknown[0]!r} in {config_path}", param_hint="--mailbox")
        keys = list(mailbox_keys)
    else:
        rcpts = [a for name in ("to", "cc", "delivered-to", "x-original-to") for a in addresses(values.get(name))]
        keys = list(dict.fromkeys(hit[0] for hit in map(config.mailbox_for, rcpts) if hit is not None))
    if not keys:
        click.echo(
            f"{message_path}: not addressed to a shared mailbox of the config; name one with --mailbox", err=True
        )
        raise SystemExit(2)

    local = hours.local(at)
    click.echo(f"mail: {readable(values.get('subject', ''))!r} from {sender or '(no sender)'}")
    click.echo(f"at:   {local:%a %Y-%m-%d %H:%M} {hours.zone} ({'open' if hours.is_open(at) else 'closed'})")
    click.echo(f"rules: {ruleset.source or '(none: rules_file is empty)'}")
    for key in keys:
        box = config.mailboxes[key]
        facts = MessageFacts(
            mailbox=key, mailbox_address=box.address, headers=headers, envelope_sender=sender, body=body
        )
        state = MemoryAssignmentState()
        decision = evaluate(ruleset, facts, at, state, new_ticket=True)
        mark = f"{box.tag} #NEW"
        click.echo(f"\nmailbox {key} <{box.address}>")
        click.echo(f"  matched:    {', '.join(decision.matched_rule_names) or '(no rule)'}")
        owner = decision.owner
        click.echo(f"  owner:      {owner + ' (' + config.agent_name(owner) + ')' if owner else 'unassigned'}")
        # Where the pipeline files it: the owner's folder, else a rule's folder, else the mailbox's inbox folder.
        folder = config.agent_folder(owner) if owner in config.agents else decision.folder or box.inbox_folder
        local_part, _, domain = box.address.partition("@")
        recipient = f"{local_part}{config.recipient_delimiter}{folder}@{domain}" if folder else box.address
        click.echo(f"  folder:     {folder or 'INBOX'}  (recipient {recipient})")
        # The headers the pipeline writes for a ticket in this state (the same function), number shown as NEW.
        ticket = Ticket(
            mailbox=box.address,
            number=0,
            owner=owner,
            state="open" if owner else "new",
            priority=decision.priority or "normal",
            tags=decision.tags,
        )
        click.echo("  headers:")
        new_subject = with_token(readable(values.get("subject", "")), box.tag, 0)
        click.echo(f"    Subject: {new_subject.replace(f'[{box.tag} #0]', f'[{box.tag} #NEW]')}")
        for edit in ticket_headers(ticket, mark):
            if isinstance(edit, AddHeader | SetHeader):
                click.echo(f"    {edit.name}: {edit.value.replace('0 (' + box.tag + ')', 'NEW (' + box.tag + ')')}")
        for note in decision.notes:
            click.echo(f"  note:       {note}")
        plan = plan_auto_reply(
            config,
            loaded.templates,
            loaded.keys,
            state,
            mailbox=key,
            ticket=0,
            new_ticket=True,
            rule_template=decision.auto_reply_template,
            headers=headers,
            envelope_sender=sender,
            queue_id="dry-run",
            now=at,
        )
        if plan.mail is None:
            click.echo(f"  auto-reply: none ({plan.reason})")
            continue
        text = plan.mail.data.decode("utf-8", "replace")
        reply_headers = dict(line.split(": ", 1) for line in text.split("\r\n\r\n", 1)[0].split("\r\n") if ": " in line)
        click.echo(f"  auto-reply: {plan.reason} (not sent)")
        click.echo(f"    Subject: {readable(reply_headers.get('Subject', ''))}")
        click.echo(f"    Content-Language: {reply_headers.get('Content-Language', '')}")
        if show_reply:
            click.echo("")
            click.echo(text.replace("\r\n", "\n"))
