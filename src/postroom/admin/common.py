"""What the ``postroom`` subcommands share: the --config option, loading it, and the parts a daemon runs with."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import click

from postroom import __version__
from postroom.bundle import Loaded, LoadError, load_all, reload
from postroom.config import Config, ConfigError, load_config
from postroom.history import HistoryWriter, make_engine, migrate
from postroom.mailer import Mailer
from postroom.parts import Parts
from postroom.runtime import Runtime
from postroom.store.assignment import RedisAssignmentState
from postroom.store.redis import RedisStore
from postroom.tickets import StoreUnavailable

log = logging.getLogger("postroom")

# Exit status for a mistake of the admin's (bad config, unknown ticket or agent), as click uses for usage errors.
EXIT_USAGE = 2
# Exit status when a service (Redis, SQL, a file the system should provide) fails rather than the admin's input.
EXIT_SERVICE = 1

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/etc/postroom/postroom.toml"),
    show_default=True,
    help="The TOML configuration file (see src/postroom/examples/postroom.toml).",
)


def fail(message: str) -> SystemExit:
    """Print an admin's mistake to stderr; ``raise fail(...)`` exits with status 2."""
    click.echo(message, err=True)
    return SystemExit(EXIT_USAGE)


def load_or_exit(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        raise SystemExit(EXIT_USAGE) from None


def redis_store(config: Config) -> RedisStore:
    return RedisStore.from_url(
        config.redis.url,
        key_prefix=config.redis.key_prefix,
        message_index_days=config.redis.message_index_days,
        timeout=config.redis.timeout_seconds,
    )


def load_bundle_or_exit(path: Path, environ: Mapping[str, str] | None = None) -> Loaded:
    """Config, rules, templates, keys and canned replies, or exit 2 naming every problem."""
    try:
        return load_all(path, environ)
    except LoadError as exc:
        raise fail(str(exc)) from None


@contextlib.contextmanager
def daemon_runtime(
    config_path: Path,
    daemon: str,
    environ: Mapping[str, str] | None = None,
    *,
    migrate_db: bool = True,
    loaded: Loaded | None = None,
) -> Iterator[Runtime]:
    """Everything the milter and the after-queue filter run the pipeline with, built the same way for both.

    The history writer is flushed and the mailer drained when the daemon returns, so mail handled just before a
    stop is still recorded and its auto-replies still sent.  ``environ`` stands for the process environment's
    POSTROOM_* overrides (the demo passes {} so its private Redis is the one used).  ``migrate_db=False``: the
    caller has run the migrations already (the milter does, once, before it starts its workers).  ``loaded``: what
    to run with instead of reading ``config_path`` (a milter worker gets it from the milter process).
    """
    if loaded is None:
        loaded = load_bundle_or_exit(config_path, environ)
    config = loaded.config
    if migrate_db and config.database.auto_migrate:
        migrate(config.database.url)
    history = HistoryWriter(make_engine(config.database.url), config.database.batch_size)
    history.start()
    store = redis_store(config)
    try:
        store.ping()
    except StoreUnavailable as exc:
        # Start anyway: mail keeps flowing under the failure policy until Redis is back.
        log.warning(
            "Redis at %s is not reachable (%s); mail will get policy %r until it is",
            config.redis.url,
            exc,
            config.milter.on_error,
        )
    # The assignment state shares the ticket store's client: one connection pool per process.
    assign = RedisAssignmentState(store.client, config.redis.key_prefix)
    mailer = Mailer.from_config(config)
    mailer.start()
    log.info("postroom %s %s starting with %s", __version__, daemon, config_path)
    parts = Parts(
        config,
        store,
        loaded.keys,
        loaded.canned,
        rules=loaded.rules,
        templates=loaded.templates,
        assign=assign,
    )
    runtime = Runtime(parts, history, mailer)
    try:
        yield runtime
    finally:
        mailer.stop(timeout=10)
        history.flush(timeout=10)
        history.close()
        log.info("postroom %s stopped", daemon)


def reload_runtime(current: Runtime, config_path: Path) -> Runtime | None:
    """SIGHUP: the running parts with the config, rules and templates read again; None keeps the old ones."""
    loaded = reload_bundle(current.config, config_path)
    return None if loaded is None else current.reloaded(loaded)


def reload_bundle(current: Config, config_path: Path) -> Loaded | None:
    """SIGHUP: config, rules, templates, keys and canned replies read again; None keeps the running ones.

    A broken file is logged with every problem and changes nothing, so a typo never stops mail.
    """
    loaded = reload(config_path)
    if isinstance(loaded, LoadError):
        return None
    new, old = loaded.config, current
    for what, before, after in (
        ("redis.url", old.redis.url, new.redis.url),
        ("database.url", old.database.url, new.database.url),
        ("milter.socket", old.milter.socket, new.milter.socket),
        ("smtpd", old.smtpd, new.smtpd),
        ("mailer", old.mailer, new.mailer),
    ):
        if before != after:
            log.warning("%s changed in %s: it takes effect at the next restart, not on reload", what, config_path)
    return loaded
