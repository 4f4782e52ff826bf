"""What the ``postroom`` subcommands share: the --config option, loading it, and the parts a daemon runs with."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import click

from postroom import __version__
from postroom.commands import CannedError, load_canned
from postroom.config import Config, ConfigError, load_config
from postroom.dkim import DkimError, Keyring
from postroom.history import HistoryWriter, make_engine, migrate
from postroom.runtime import Runtime
from postroom.store import RedisStore, StoreUnavailable

log = logging.getLogger("postroom")

# Exit status for a mistake of the admin's (bad config, unknown ticket or agent), as click uses for usage errors.
EXIT_USAGE = 2

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/etc/postroom/postroom.toml"),
    show_default=True,
    help="The TOML configuration file (see docs/examples/postroom.toml).",
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
            click.echo(f"{exc.path}: {problem}", err=True)
        raise SystemExit(EXIT_USAGE) from None


def redis_store(config: Config) -> RedisStore:
    return RedisStore.from_url(
        config.redis.url,
        key_prefix=config.redis.key_prefix,
        message_index_days=config.redis.message_index_days,
        timeout=config.redis.timeout_seconds,
    )


@contextlib.contextmanager
def daemon_runtime(config: Config, config_path: Path, daemon: str) -> Iterator[Runtime]:
    """Everything the milter and the after-queue filter run the pipeline with, built the same way for both.

    The history writer is flushed and stopped when the daemon returns, so mail handled just before a stop is
    still recorded.
    """
    try:
        keys = Keyring.from_config(config)
        canned = load_canned(config)
    except (DkimError, CannedError) as exc:
        raise fail(f"{config_path}: {exc}") from None
    if config.database.auto_migrate:
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
    log.info("postroom %s %s starting with %s", __version__, daemon, config_path)
    try:
        yield Runtime(config, store, history, keys, canned)
    finally:
        history.flush(timeout=10)
        history.close()
        log.info("postroom %s stopped", daemon)
