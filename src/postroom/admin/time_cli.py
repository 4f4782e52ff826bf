"""``postroom remind``, ``postroom digest`` and ``postroom stats``: the commands that keep time.

Each takes ``--now`` so a test (or an admin asking "what would have happened") sets the clock.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import click
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from postroom import digest, remind, stats, timeline
from postroom import log as plog
from postroom.admin.common import CONFIG_OPTION, fail, load_or_exit, redis_store
from postroom.config import Config
from postroom.history import make_engine, migrate, write
from postroom.tickets import StoreUnavailable

EXIT_SERVICE = 1
log = logging.getLogger("postroom")


def _moment(value: str | None, what: str) -> dt.datetime:
    if value is None:
        return dt.datetime.now(dt.UTC)
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"{what} {value!r} is not an ISO time such as 2026-12-01T09:30:00+01:00") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


NOW_OPTION = click.option(
    "--now", "now_text", metavar="ISO", help="Act as if it were this time (ISO 8601; UTC when no offset is given)."
)
DRY_RUN_OPTION = click.option("--dry-run", is_flag=True, help="Print what would be sent; send and record nothing.")


def _timelines(config: Config, *, open_only: bool = False) -> list[timeline.Timeline]:
    try:
        if config.database.auto_migrate:
            migrate(config.database.url)
        return timeline.load(make_engine(config.database.url), open_only=open_only)
    except SQLAlchemyError as exc:
        click.echo(f"history database: {exc}", err=True)
        raise SystemExit(EXIT_SERVICE) from None


@click.command("remind")
@CONFIG_OPTION
@NOW_OPTION
@DRY_RUN_OPTION
def remind_command(config_path: Path, now_text: str | None, dry_run: bool) -> None:
    """Send due reminders, escalations, unassigned-ticket and follow-up notices, each once per due time.

    Meant for a timer every few minutes (systemd/postroom-remind.timer).  Owners get reminders and follow-ups in
    their folder of the shared mailbox, leads get escalations, the team's inbox gets unassigned tickets.  Exit
    status 1 when a notice could not be sent (it is tried again on the next run).
    """
    config = load_or_exit(config_path)
    plog.setup(config.milter.log_level)
    now = _moment(now_text, "--now")
    timelines = _timelines(config, open_only=True)
    notices = remind.plan(config, timelines, now)
    if dry_run:
        for n in notices:
            click.echo(f"{n.mark}: {n.detail} -> {', '.join(n.rcpts)}")
        return
    store = redis_store(config)
    remind.publish_breached(store.client, config.redis.key_prefix, remind.breached(config, timelines, now))
    claims = remind.RedisClaims(store.client, config.redis.key_prefix)
    records, failed = remind.send_all(config, notices, store, remind.smtp_sender(config), now, claims=claims)
    try:
        with Session(make_engine(config.database.url)) as session, session.begin():
            write(session, records)
    except SQLAlchemyError as exc:
        click.echo(f"history database: {exc}; {len(records)} sent notices not recorded", err=True)
        raise SystemExit(EXIT_SERVICE) from None
    click.echo(f"{len(records)} notices sent, {failed} failed")
    if failed:
        raise SystemExit(EXIT_SERVICE)


@click.command("digest")
@CONFIG_OPTION
@NOW_OPTION
@DRY_RUN_OPTION
def digest_command(config_path: Path, now_text: str | None, dry_run: bool) -> None:
    """Mail each agent their open tickets and each lead their mailbox's figures ([sla] lead_digest).

    Meant for a daily timer (systemd/postroom-digest.timer); weekly lead digests go out on Mondays.
    """
    config = load_or_exit(config_path)
    plog.setup(config.milter.log_level)
    now = _moment(now_text, "--now")
    mails = digest.digests(config, _timelines(config), now)
    send = remind.smtp_sender(config)
    failed = 0
    for d in mails:
        if dry_run:
            click.echo(f"{d.to}: {d.subject}")
            continue
        try:
            send("", (d.to,), remind.wire(digest.message(d, now)))
        except OSError as exc:
            log.error("digest to %s not sent: %s", d.to, exc)
            failed += 1
    if not dry_run:
        click.echo(f"{len(mails) - failed} digests sent, {failed} failed")
    if failed:
        raise SystemExit(EXIT_SERVICE)


@click.command("stats")
@CONFIG_OPTION
@click.option("--since", "since_text", metavar="ISO", help="Start of the period (default: 7 days before the end).")
@click.option("--until", "until_text", metavar="ISO", help="End of the period, not included (default: --now).")
@NOW_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV: one row per group and key.")
def stats_command(  # noqa: PLR0917  (click passes every option by position)
    config_path: Path,
    since_text: str | None,
    until_text: str | None,
    now_text: str | None,
    as_json: bool,
    as_csv: bool,
) -> None:
    """Figures of a period per mailbox, agent, tag and priority: new, closed, backlog, unassigned, overdue,
    SLA breaches, first response and resolution time (median and 90th percentile, business minutes).

    Tags come from Redis, or from the history where Redis does not answer (tickets last written before the
    history kept tags, schema 0003, then have none).
    """
    if as_json and as_csv:
        raise fail("--json and --csv: choose one")
    config = load_or_exit(config_path)
    end = _moment(until_text or now_text, "--until")
    start = _moment(since_text, "--since") if since_text else end - dt.timedelta(days=7)
    if start >= end:
        raise fail("--since must be before --until")
    result = stats.figures(config, _timelines(config), stats.Period(start, end), _tags(config))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif as_csv:
        click.echo(stats.as_csv(result), nl=False)
    else:
        click.echo(stats.as_csv(result).replace(",", "\t"), nl=False)


def _tags(config: Config) -> dict[tuple[str, int], tuple[str, ...]]:
    store = redis_store(config)
    out: dict[tuple[str, int], tuple[str, ...]] = {}
    try:
        for box in config.mailboxes.values():
            out.update({(t.mailbox, t.number): t.tags for t in store.tickets(box.address)})
    except StoreUnavailable as exc:
        log.warning("Redis at %s not reachable (%s): tags from the history", config.redis.url, exc)
    return out
