"""``postroom sweep``: ticket the mails in the shared mailboxes that postroom never saw (see postroom.sweep)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from postroom.admin.common import CONFIG_OPTION, daemon_runtime
from postroom.store.redis import RedisStore
from postroom.sweep import SweepError, sweep

# Exit status when a service (IMAP) fails rather than the admin's input.
EXIT_SERVICE = 1


@click.command("sweep")
@CONFIG_OPTION
def sweep_command(config_path: Path) -> None:
    """Find mails without a ticket in the shared mailboxes and replace each by its ticketed version.

    Mails delivered degraded (Redis was away) or while the milter was down carry no X-Postroom-Ticket header.
    Over IMAP, as postroom's Dovecot master user ([imap], see dovecot-snippet), each gets its ticket (or the one
    the backlog opened for it) and is replaced in its folder with the same flags and date; the original is
    deleted only after the replacement is stored.  Safe to run at any time and as often as wanted, also on several
    hosts: one sweep per mailbox at a time (a lock in Redis).  systemd/postroom-sweep.timer runs it every minute,
    and the daemons run one as soon as Redis is back after an outage.
    """
    with daemon_runtime(config_path, "sweep", sweep_after_recovery=False) as runtime:
        store = runtime.parts.store
        try:
            done = sweep(runtime, time.time(), store.sweeping if isinstance(store, RedisStore) else None)
        except SweepError as exc:
            click.echo(str(exc), err=True)
            raise SystemExit(EXIT_SERVICE) from None
    for s in done:
        if s.replaced or s.skipped or s.failed:
            click.echo(f"{s.mailbox}/{s.folder or 'INBOX'}: {s.replaced} ticketed, {s.skipped} left, {s.failed} failed")
    click.echo(f"swept {len({s.mailbox for s in done})} mailbox(es): {sum(s.replaced for s in done)} mail(s) ticketed")
