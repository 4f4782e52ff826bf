"""``postroom rules check`` and ``postroom rules test``: an admin's tools for the rules file, with no side effects.

Neither command talks to Redis, SQL or Postfix: ``test`` runs the inbound pipeline on the in-memory store and
assignment state (every agent present, nobody has open tickets, no round-robin turn taken yet) and builds the
auto-reply without sending it.
"""

from __future__ import annotations

import email.parser
import email.policy
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import click

from postroom import inbound
from postroom.autoreply import AutoReplyPlan, BusinessHours, TemplateError, Templates, load_templates
from postroom.bundle import Loaded, LoadError, load_all
from postroom.config import Config, ConfigError, load_config
from postroom.mime import Message, addresses, readable
from postroom.parts import Parts
from postroom.rules import MemoryAssignmentState, RulesError, Ruleset, load_rules
from postroom.store.memory import MemoryStore
from postroom.verdict import AddHeader, AddRecipient, Envelope, SetHeader
from postroom.words import plural


@click.group("rules")
def rules_group() -> None:
    """Check the routing rules file and try it on a mail."""


def _config_or_exit(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
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
    click.echo(f"{path}: OK ({plural(len(ruleset.rules), 'rule')}, {plural(len(ruleset.groups), 'group')}; {checked})")
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

    The mail goes through the real inbound pipeline, on an in-memory store and assignment state: every agent is
    present and nobody's turn is taken, so round-robin names the group's first agent.  The ticket is a new one,
    shown as #NEW in the headers and as 0 in the auto-reply.
    """
    loaded = _bundle_or_exit(config_path, rules_path)
    config = loaded.config
    hours = BusinessHours.from_config(config.hours)
    at = _parse_at(at_text, hours)
    message = _read_mail(message_path, config, mailbox_keys)
    parts = Parts(
        config,
        MemoryStore(first_number=0),
        loaded.keys,
        loaded.canned,
        rules=loaded.rules,
        templates=loaded.templates,
        assign=MemoryAssignmentState(),
    )
    mail = inbound.CustomerMail.read(message)
    click.echo(f"mail: {mail.text_subject!r} from {message.envelope.mail_from.strip('<>') or '(no sender)'}")
    click.echo(f"at:   {hours.local(at):%a %Y-%m-%d %H:%M} {hours.zone} ({'open' if hours.is_open(at) else 'closed'})")
    click.echo(f"rules: {loaded.rules.source or '(none: rules_file is empty)'}")
    for routed in inbound.route(message.envelope, config):
        result = inbound.through_mailbox(inbound.Step(mail, routed, parts, at.timestamp()))
        _show_mailbox(config, mail, result)
        _show_auto_reply(result.applied.auto_reply, show_reply)


def _bundle_or_exit(config_path: Path, rules_path: Path | None) -> Loaded:
    try:
        loaded = load_all(config_path)
    except LoadError as exc:
        for line in exc.problems:
            click.echo(line, err=True)
        raise SystemExit(2) from None
    if rules_path is None:
        return loaded
    try:
        return replace(loaded, rules=load_rules(rules_path, loaded.config, loaded.templates))
    except RulesError as exc:
        for problem in exc.problems:
            click.echo(problem.format(exc.path), err=True)
        raise SystemExit(2) from None


def _read_mail(path: Path, config: Config, mailbox_keys: tuple[str, ...]) -> Message:
    """The .eml file as the pipeline gets a mail: its headers, its body, and an envelope to the shared mailboxes
    it is addressed to (or the ones named with --mailbox)."""
    raw = path.read_bytes()
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw, headersonly=True)
    headers = [(k, str(v).replace("\r\n", "").replace("\n", "")) for k, v in parsed.items()]
    cut = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0), default=len(raw))
    body = raw[cut:].lstrip(b"\r\n")
    values = {k.lower(): v for k, v in reversed(headers)}
    sender = (addresses(values.get("return-path")) or addresses(values.get("from")) or [""])[0]
    if mailbox_keys:
        unknown = [k for k in mailbox_keys if k not in config.mailboxes]
        if unknown:
            raise click.BadParameter(f"no mailbox {unknown[0]!r} in the config", param_hint="--mailbox")
        keys = list(mailbox_keys)
    else:
        rcpts = [a for name in ("to", "cc", "delivered-to", "x-original-to") for a in addresses(values.get(name))]
        keys = list(dict.fromkeys(hit[0] for hit in map(config.mailbox_for, rcpts) if hit is not None))
    if not keys:
        click.echo(f"{path}: not addressed to a shared mailbox of the config; name one with --mailbox", err=True)
        raise SystemExit(2)
    envelope = Envelope(
        mail_from=f"<{sender}>", rcpts=[f"<{config.mailboxes[k].address}>" for k in keys], queue_id="dry-run"
    )
    return Message(envelope, headers, body=lambda: body)


def _show_mailbox(config: Config, mail: inbound.CustomerMail, result: inbound.MailboxResult) -> None:
    box, decision, ticket = result.routed.box, result.decision, result.applied.ticket
    click.echo(f"\nmailbox {result.routed.key} <{box.address}>")
    click.echo(f"  matched:    {', '.join(decision.matched_rule_names) or '(no rule)'}")
    owner = ticket.owner
    click.echo(f"  owner:      {owner + ' (' + config.agent_name(owner) + ')' if owner else 'unassigned'}")
    added = [e.address for e in result.recipient_edits if isinstance(e, AddRecipient)]
    recipient = added[0] if added else box.address
    folder = recipient.partition("@")[0].partition(config.recipient_delimiter)[2]
    click.echo(f"  folder:     {folder or 'INBOX'}  (recipient {recipient})")
    click.echo("  headers:")
    edits = inbound.assemble(mail, [result]).verdict.edits
    subject_value = next(e.value for e in edits if isinstance(e, SetHeader) and e.name == "Subject")
    shown = [("Subject", readable(subject_value))]
    shown += [(e.name, e.value) for e in result.headers if isinstance(e, AddHeader | SetHeader)]
    for name, value in shown:
        # The dry run's ticket is number 0; people read "NEW".
        text = value.replace(f"{box.tag} #{ticket.number}", f"{box.tag} #NEW")
        click.echo(f"    {name}: {text.replace(f'{ticket.number} ({box.tag})', f'NEW ({box.tag})')}")
    for note in decision.notes:
        click.echo(f"  note:       {note}")


def _show_auto_reply(plan: AutoReplyPlan | None, show_reply: bool) -> None:
    if plan is None or plan.mail is None:
        click.echo(f"  auto-reply: none ({plan.reason if plan else 'no auto-reply for this mail'})")
        return
    text = plan.mail.data.decode("utf-8", "replace")
    reply_headers = dict(line.split(": ", 1) for line in text.split("\r\n\r\n", 1)[0].split("\r\n") if ": " in line)
    click.echo(f"  auto-reply: {plan.reason} (not sent)")
    click.echo(f"    Subject: {readable(reply_headers.get('Subject', ''))}")
    click.echo(f"    Content-Language: {reply_headers.get('Content-Language', '')}")
    if show_reply:
        click.echo("")
        click.echo(text.replace("\r\n", "\n"))
