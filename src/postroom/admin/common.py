"""What the ``postroom`` subcommands share: the --config option, loading it, and the parts a daemon runs with."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import redis
import redis.exceptions
from redis.cluster import RedisCluster

from postroom import __version__, redis_connect
from postroom.backlog import Backlog
from postroom.bundle import Loaded, LoadError, load_all, reload
from postroom.config import Config, ConfigError, load_config
from postroom.epoch import RestartWatch, persistence_problems
from postroom.history import HistoryWriter, make_engine, migrate
from postroom.mailer import Mailer
from postroom.parts import Parts
from postroom.rebuild import BackgroundRebuild, history_floor, scope
from postroom.runtime import Runtime
from postroom.spool import Spool
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


def redis_client(config: Config, on_connect: Callable[[Any], None] | None = None) -> redis.Redis | RedisCluster:
    """One client (one pool; per node on Cluster) for one Redis, a Sentinel-watched primary or a Cluster.

    Exits 1 with a clear line when a Cluster cannot be reached at all: redis-py needs its slot map to build the
    client (one Redis or Sentinel start anyway and apply the failure policy until Redis answers).
    """
    target = config.redis.target()
    try:
        return redis_connect.connect(target, config.redis.timeout_seconds, on_connect=on_connect)
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
        click.echo(f"{target.describe()} is not reachable: {redis_connect.reason(exc)}", err=True)
        raise SystemExit(1) from None


def redis_store(config: Config) -> RedisStore:
    """The ticket store; its restart watch makes the epoch guard check each mailbox again after a Redis restart."""
    watch = RestartWatch()
    store = RedisStore(
        redis_client(config, on_connect=watch),
        key_prefix=config.redis.key_prefix,
        message_index_days=config.redis.message_index_days,
        confirm_replicas=config.redis.confirm_replicas,
        # Well inside the socket timeout, so a missing replica is a clear UnconfirmedWrite and not a timeout.
        confirm_timeout=config.redis.timeout_seconds / 2,
    )
    watch.listen(store.guard.forget)
    return store


def load_bundle_or_exit(path: Path, environ: Mapping[str, str] | None = None) -> Loaded:
    """Config, rules, templates, keys and canned replies, or exit 2 naming every problem."""
    try:
        return load_all(path, environ)
    except LoadError as exc:
        raise fail(str(exc)) from None


def migrate_apart(url: str) -> None:
    """``migrate(url)`` in a forked child process: a daemon that migrates a new or old schema at start would
    otherwise keep Alembic and Mako (~16 MiB) in memory for as long as it runs.  The child's exception, if any,
    is raised here as if the migration had run in this process."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: migrate, report, and leave without running the parent's clean-ups
        os.close(read_end)
        status = 0
        try:
            migrate(url)
        except BaseException as exc:  # noqa: BLE001 -- every failure goes to the parent, which raises it
            status = 1
            with os.fdopen(write_end, "wb") as out:
                try:
                    out.write(pickle.dumps(exc))
                except Exception:  # noqa: BLE001 -- an exception that does not pickle still names itself
                    out.write(pickle.dumps(RuntimeError(f"database migration failed: {exc!r}")))
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    if report:
        raise pickle.loads(report)  # written by our own child process just now
    if status != 0:
        raise RuntimeError(f"the database migration process ended with status {status}")


@contextlib.contextmanager
def daemon_runtime(
    config_path: Path,
    daemon: str,
    environ: Mapping[str, str] | None = None,
    *,
    migrate_db: bool = True,
    loaded: Loaded | None = None,
    sweep_after_recovery: bool = True,
) -> Iterator[Runtime]:
    """Everything the milter and the after-queue filter run the pipeline with, built the same way for both.

    The history writer is flushed and the mailer drained when the daemon returns, so mail handled just before a
    stop is still recorded and its auto-replies still sent.  ``environ`` stands for the process environment's
    POSTROOM_* overrides (the demo passes {} so its private Redis is the one used).  ``migrate_db=False``: the
    caller has run the migrations already (the milter does, once, before it starts its workers).  ``loaded``: what
    to run with instead of reading ``config_path`` (a milter worker gets it from the milter process).
    ``sweep_after_recovery``: once the backlog has ticketed mail delivered degraded, sweep the mailboxes.
    """
    if loaded is None:
        loaded = load_bundle_or_exit(config_path, environ)
    config = loaded.config
    if migrate_db and config.database.auto_migrate:
        migrate_apart(config.database.url)
    history = history_writer(config)
    history.start()
    store = redis_store(config)
    rebuilder = guard_store(config, store)
    check_redis(config, store)
    # The assignment state shares the ticket store's client: one connection pool per process.
    assign = RedisAssignmentState(store.client, config.redis.key_prefix)
    backlog = Backlog(_spool(config, "degraded"), store, history)
    backlog.start()
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
    runtime = Runtime(parts, history, mailer, backlog)
    if sweep_after_recovery:
        backlog.on_recovered = _SweepAfterRecovery(runtime, store)
    try:
        yield runtime
    finally:
        mailer.stop(timeout=10)
        backlog.close()
        rebuilder.wait(timeout=5)
        stop_history(history)
        log.info("postroom %s stopped", daemon)


class _SweepAfterRecovery:
    """The backlog's on_recovered: sweeps once the backlog has ticketed mail delivered degraded (Redis is back), so
    the degraded mails in the mailboxes get their tokens within seconds instead of at the sweep timer's next run.
    One sweep at a time in this process; the store's sweep lock keeps other processes and hosts out."""

    def __init__(self, runtime: Runtime, store: RedisStore) -> None:
        self._runtime = runtime
        self._store = store
        self._busy = threading.Lock()

    def __call__(self) -> None:
        if not self._busy.acquire(blocking=False):
            return  # a sweep is running: it finds the newly ticketed mails, or the timer's next run does
        threading.Thread(target=self._run, name="postroom-sweep", daemon=True).start()

    def _run(self) -> None:
        # Imported here: IMAP and the after-queue parser stay out of a daemon that never recovers from anything.
        from postroom.sweep import SweepError, sweep  # noqa: PLC0415

        try:
            done = sweep(self._runtime, time.time(), self._store.sweeping)
            log.info("sweep after recovery: %d mail(s) ticketed in place", sum(s.replaced for s in done))
        except (SweepError, StoreUnavailable) as exc:
            log.warning("sweep after recovery: %s (postroom-sweep.timer tries again)", exc)
        except Exception:
            log.exception("sweep after recovery failed (postroom-sweep.timer tries again)")
        finally:
            self._busy.release()


def guard_store(config: Config, store: RedisStore) -> BackgroundRebuild:
    """Tie the store's loss check to the history: the numbers it knows, and a rebuild after a loss."""
    engine = make_engine(config.database.url)
    rebuilder = BackgroundRebuild(engine, store.client, *scope(config))
    store.guard.floor = history_floor(engine)
    store.guard.on_loss = rebuilder.request
    return rebuilder


def check_redis(config: Config, store: RedisStore) -> None:
    """At start: is Redis there, and does it keep what postroom writes?  Warnings only; mail flows either way."""
    try:
        store.ping()
        problems = persistence_problems(store.client)
    except (StoreUnavailable, redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
        # Start anyway: mail keeps flowing under the failure policy until Redis is back.
        log.warning(
            "%s is not reachable (%s); mail will get policy %r until it is",
            config.redis.target().describe(),
            exc,
            config.milter.on_error,
        )
        return
    for problem in problems:
        log.warning("%s (see docs/deploy-milter.md, Redis)", problem)


def history_writer(config: Config) -> HistoryWriter:
    """The history writer with its spool; exits 2 naming the folder when the spool cannot be made."""
    return HistoryWriter(make_engine(config.database.url), _spool(config), config.database.batch_size)


def _spool(config: Config, sub: str = "") -> Spool:
    where = config.database.spool_path() / sub if sub else config.database.spool_path()
    try:
        return Spool(where, config.database.spool_max_mb * 1024 * 1024)
    except OSError as exc:
        raise fail(f"[database] spool_dir {where}: {exc.strerror or exc}") from None


def stop_history(history: HistoryWriter) -> bool:
    """SIGTERM: send what the spool holds to SQL (10 s at most); what is left waits on disk for the next start."""
    done = history.flush(timeout=10)
    if not done:
        log.warning(
            "history: %d bytes not yet in the database stay in the spool %s; the next start writes them",
            history.spool.bytes_waiting(),
            history.spool.directory,
        )
    history.close()
    return done


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
        ("redis", old.redis.target(), new.redis.target()),
        ("database.url", old.database.url, new.database.url),
        ("milter.socket", old.milter.socket, new.milter.socket),
        ("smtpd", old.smtpd, new.smtpd),
        ("mailer", old.mailer, new.mailer),
    ):
        if before != after:
            log.warning("%s changed in %s: it takes effect at the next restart, not on reload", what, config_path)
    return loaded
