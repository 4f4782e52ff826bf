"""``postroom admin rebuild``: Redis's tickets, participants, Message-ID index and counters again from the history."""

from __future__ import annotations

from pathlib import Path

import click
import redis.exceptions
from sqlalchemy.exc import SQLAlchemyError

from postroom import redis_connect
from postroom.admin.common import CONFIG_OPTION, load_or_exit, redis_store
from postroom.history import make_engine
from postroom.rebuild import rebuild, scope

# Exit status when a service (Redis, SQL) fails rather than the admin's input.
EXIT_SERVICE = 1


@click.group("admin")
def admin_group() -> None:
    """Maintenance of postroom's state."""


@admin_group.command("rebuild")
@CONFIG_OPTION
def rebuild_command(config_path: Path) -> None:
    """Restore Redis from the SQL history, for every mailbox in --config.

    Raises each counter above the highest ticket number in the history, and writes the tickets (with their tags),
    participants, Message-ID index entries and #away flags Redis is missing; what Redis has stays (it is newer).
    Safe while mail flows and safe to run twice.  The daemons run it by themselves when they find that Redis lost
    its data.  Not restored: round-robin turns and auto-reply caps, which the history does not hold.
    """
    config = load_or_exit(config_path)
    store = redis_store(config)
    engine = make_engine(config.database.url)
    try:
        done = rebuild(engine, store.client, *scope(config))
    except redis.exceptions.RedisError as exc:
        click.echo(f"{config.redis.target().describe()}: {redis_connect.reason(exc)}", err=True)
        raise SystemExit(EXIT_SERVICE) from None
    except SQLAlchemyError as exc:
        click.echo(f"history database: {str(exc).splitlines()[0]}", err=True)
        raise SystemExit(EXIT_SERVICE) from None
    finally:
        engine.dispose()
    for r in done:
        click.echo(
            f"{r.mailbox}: {r.tickets} tickets, {r.message_ids} Message-IDs and {r.away} away flags restored; "
            f"next number after #{r.highest}"
        )
