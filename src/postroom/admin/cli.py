"""The ``postroom`` command: run the daemons and look after the installation."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from postroom import __version__
from postroom import log as plog
from postroom.admin.common import (
    CONFIG_OPTION,
    daemon_runtime,
    fail,
    load_bundle_or_exit,
    load_or_exit,
    migrate_apart,
    reload_bundle,
    reload_runtime,
)
from postroom.admin.group import MainGroup, use_formatter
from postroom.config import Config, DkimKey, example_config_path
from postroom.dkim import generate, public_txt, zone_line
from postroom.history import migrate
from postroom.runtime import Runtime
from postroom.store.redis import RedisStore
from postroom.words import plural

if TYPE_CHECKING:
    from postroom.milter.adapter import Pipeline

log = logging.getLogger("postroom")

# Shared with the subcommands in postroom.admin.*; the old name stays for the commands defined here.
_load = load_or_exit


@click.group(cls=MainGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="postroom")
def main() -> None:
    """postroom turns a shared mailbox (support@, sales@) into a team inbox at the SMTP level.

    It runs beside Postfix as a milter (or as an after-queue content filter): customer mail gets a ticket
    number and lands in the owning agent's folder; agents answer from their own mail client.
    """


@main.command("milter")
@CONFIG_OPTION
def milter_command(config_path: Path) -> None:
    """Run the Postfix milter in the foreground until SIGTERM; SIGHUP reloads config and rules.

    Point Postfix at it with `smtpd_milters = unix:/run/postroom/milter.sock` and
    `milter_default_action = accept` (see `postroom postfix-snippet`).  With [milter] workers >= 1 the pipeline runs
    in that many child processes, which this process starts, restarts and stops.
    """
    from postroom.milter import serve  # noqa: PLC0415  (only the daemon needs libmilter loaded)
    from postroom.milter.worker import (  # noqa: PLC0415
        REPLY_SECONDS,
        LocalPipeline,
        RemotePipeline,
        WorkerPool,
        worker_command,
    )

    config = _load(config_path)
    plog.setup(config.milter.log_level)
    if config.milter.workers == 0:
        with daemon_runtime(config_path, "milter") as runtime:

            def reload_local(current: Pipeline) -> Pipeline | None:
                assert isinstance(current, LocalPipeline)
                new = reload_runtime(current.runtime, config_path)
                return None if new is None else LocalPipeline(new)

            stop_metrics = _serve_metrics(runtime, runtime.config.metrics.milter_listen)
            try:
                serve(LocalPipeline(runtime), reload=reload_local)
            finally:
                stop_metrics()
        return
    loaded = load_bundle_or_exit(config_path)
    if loaded.config.database.auto_migrate:
        migrate_apart(loaded.config.database.url)  # once, before the workers open the database
    log.info(
        "postroom %s milter starting with %s and %s",
        __version__,
        config_path,
        plural(config.milter.workers, "worker process"),
    )
    pool = WorkerPool(worker_command(config_path), config.milter.workers, REPLY_SECONDS, loaded)

    def reload_remote(current: Pipeline) -> Pipeline | None:
        new = reload_bundle(current.config, config_path)
        if new is None:
            return None
        # Each worker reads the new config before any mail that names its generation; a mail in flight keeps its own.
        return RemotePipeline(new.config, new.rules, pool, pool.reload(new))

    stop_metrics = _serve_metrics(loaded.config, loaded.config.metrics.milter_listen)
    try:
        serve(RemotePipeline(loaded.config, loaded.rules, pool), reload=reload_remote)
    finally:
        stop_metrics()
        pool.close()
        log.info("postroom milter stopped")


@main.command("milter-worker", hidden=True)
@CONFIG_OPTION
@click.option("--channel-fd", type=int, required=True, help="The inherited socket to the milter process.")
def milter_worker_command(config_path: Path, channel_fd: int) -> None:
    """A worker process of `postroom milter` (started by it, not by hand): runs the pipeline for its mails."""
    from postroom.milter.worker import ignore_stop_signals, receive_bundle, serve_worker  # noqa: PLC0415

    ignore_stop_signals()  # first: until now SIGHUP would have killed this process
    channel = socket.socket(fileno=channel_fd)
    try:
        bundle = receive_bundle(channel)
    except (EOFError, OSError) as exc:
        raise click.ClickException(f"no config from the milter process: {exc}") from None
    plog.setup(bundle.current.config.milter.log_level)
    with daemon_runtime(config_path, "milter worker", loaded=bundle.started, migrate_db=False) as runtime:
        serve_worker(runtime.reloaded(bundle.current), channel, bundle.generation)


@main.command("smtpd")
@CONFIG_OPTION
def smtpd_command(config_path: Path) -> None:
    """Run the after-queue content filter in the foreground until SIGTERM; SIGHUP reloads config and rules.

    The alternative to the milter, for sites that filter the amavis way: Postfix hands every queued mail to
    postroom on [smtpd] listen_host:listen_port (content_filter = postroom:[127.0.0.1]:10025), postroom edits it
    and hands it back to the Postfix listener on reinject_host:reinject_port, answering Postfix only once that
    listener has the mail.  See `postroom postfix-snippet` and docs/deploy-after-queue.md.
    """
    from postroom.smtpd import run  # noqa: PLC0415  (only the daemon needs aiosmtpd loaded)

    config = _load(config_path)
    plog.setup(config.milter.log_level)
    with daemon_runtime(config_path, "smtpd") as runtime:
        stop_metrics = _serve_metrics(runtime, runtime.config.metrics.smtpd_listen)
        try:
            run(runtime, reload=lambda current: reload_runtime(current, config_path))
        finally:
            stop_metrics()


def _serve_metrics(daemon: Runtime | Config, listen: str) -> Callable[[], None]:
    """/metrics for this daemon ([metrics]), on the daemon's own Redis store and history writer where it has them
    (the milter process with workers has neither); a port already taken is logged and mail goes on without metrics.
    """
    from postroom import metrics  # noqa: PLC0415

    if isinstance(daemon, Config):
        config, store, depth = daemon, None, None
    else:
        config, store = daemon.config, daemon.parts.store
        depth = None if daemon.history is None else daemon.history.depth
    try:
        return metrics.serve(config, listen, depth, store if isinstance(store, RedisStore) else None)
    except OSError as exc:
        log.error("metrics: cannot listen on %s (%s); running without /metrics", listen, exc)
        return lambda: None


@main.command("demo")
@click.option("--keep", is_flag=True, help="Leave the demo's SMTP server and Redis running until Ctrl-C.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Work folder for Redis, SQLite, the config and the Maildir folders (kept); default a temp dir.",
)
@click.option(
    "--postfix", is_flag=True, help="Play the inbound story on a private Postfix, Dovecot and Redis (needs root)."
)
def demo_command(keep: bool, workdir: Path | None, postfix: bool) -> None:
    """Play the story: customers write, a rule routes, agents reply, a rival reply is refused.

    Runs without root: a private redis-server (installed with apt-get when missing and run as root), SQLite and
    a development SMTP server on 127.0.0.1 that runs every mail through postroom's pipeline and files it into
    Maildir folders.  Agents log in with AUTH, password "demo".  Everything it started is stopped at the end.

    With --postfix: the inbound story through a private Postfix, Dovecot and Redis with the real milter, Dovecot
    configured by `postroom dovecot-snippet` (each agent logs in with their own password, printed at the start;
    Meier takes a ticket by dragging its mail into Support/Meier); needs root and the Debian packages postfix,
    dovecot-imapd, dovecot-lmtpd, dovecot-sieve and redis-server (`./dev demo` installs them).
    """
    # rich, aiosmtpd and the testbed only for the demo.
    if postfix:
        from postroom.demo_postfix import run as run_postfix  # noqa: PLC0415

        raise SystemExit(run_postfix(keep=keep, workdir=workdir))
    from postroom.demo import run as run_demo  # noqa: PLC0415

    raise SystemExit(run_demo(keep=keep, workdir=workdir))


@main.group("config")
def config_group() -> None:
    """Check configuration files."""


@config_group.command("check")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@CONFIG_OPTION
@click.option("--connect", is_flag=True, help="Also reach Redis (and report its persistence) and the database.")
def config_check(path: Path | None, config_path: Path, connect: bool) -> None:
    """The pre-flight before starting a daemon: load everything `postroom milter` and `postroom smtpd` load.

    The config, its rules_file, auto-reply templates, DKIM key files and canned replies are read and checked
    against each other (unknown agents, one address twice, a missing file); every mistake is printed in one run
    as FILE:LINE: key: message, and the exit status is 2 if there is any.  With --connect it also connects to
    Redis (saying whether it persists with AOF) and to the database (saying whether its schema is current); an
    unreachable one is an error too.  Nothing is changed or created.  (The form `config check PATH` still works
    but is deprecated: use --config PATH as every other command does.)
    """
    from postroom.admin.preflight import check  # noqa: PLC0415  (only this command reaches out to the services)

    if path is not None:
        click.echo("postroom: `config check PATH` is deprecated; use `config check --config PATH`", err=True)
        config_path = path
    report = check(config_path, connect=connect)
    for line in report.errors:
        click.echo(line, err=True)
    for line in report.warnings:
        click.echo(f"warning: {line}", err=True)
    if report.errors:
        raise fail(f"{config_path}: {plural(len(report.errors), 'error')}")
    click.echo(f"{config_path}: OK ({'; '.join(report.notes)})")


@config_group.command("example")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def config_example(directory: Path) -> None:
    """Copy the example config into DIRECTORY with what it names beside it: rules.toml, templates/, canned/ and
    dkim/ (an example key everybody has: make your own with `postroom dkim genkey`).  Files that exist are left
    as they are.  Then edit DIRECTORY/postroom.toml and run `postroom config check --config` on it.
    """
    source = example_config_path().parent
    for path in sorted(source.rglob("*")):
        target = directory / path.relative_to(source)
        if path.is_dir() or path.name == "demo-rules.toml":
            continue
        if target.exists():
            click.echo(f"{target}: exists, left as it is")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        # The example key is a private key (of a well-known example, but the copy is where a real one will go).
        mode = 0o600 if target.suffix == ".key" else 0o644
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(path.read_bytes())
        click.echo(f"{target}: written")


@main.group("dkim")
def dkim_group() -> None:
    """DKIM keys for the shared domains."""


@dkim_group.command("genkey")
@click.argument("domain")
@click.argument("selector")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/etc/postroom/dkim"),
    show_default=True,
    help="Where to write DOMAIN.SELECTOR.key.",
)
@click.option("--bits", type=click.IntRange(1024, 4096), default=2048, show_default=True)
def dkim_genkey(domain: str, selector: str, directory: Path, bits: int) -> None:
    """Write a new RSA key for DOMAIN and print the DNS TXT record and the config lines for it.

    The record is printed as a zone-file line whose value is split into strings of at most 255 bytes, as DNS
    requires for a 2048-bit key; most DNS providers' web forms take the strings joined into one value.
    """
    problems = DkimKey.problems(domain, selector)
    if problems:
        raise fail("\n".join(f"postroom dkim genkey: {p}" for p in problems))
    domain = domain.lower()
    path = directory / f"{domain}.{selector}.key"
    if path.exists():
        click.echo(f"{path} exists; not overwriting a key that may be published", err=True)
        raise SystemExit(2)
    directory.mkdir(parents=True, exist_ok=True)
    pem = generate(bits)
    # Only the daemon's user may read a private key: create it 0600 rather than chmod after writing.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    click.echo(f"wrote {path} (chown it to the postroom user)")
    click.echo("\nDNS record:")
    click.echo(zone_line(domain, selector, public_txt(pem)))
    click.echo("\npostroom.toml:")
    click.echo(f'[dkim."{domain}"]\nselector = "{selector}"\nkey_file = "{path}"')


@main.group("db")
def db_group() -> None:
    """The SQL history database."""


@db_group.command("upgrade")
@CONFIG_OPTION
def db_upgrade(config_path: Path) -> None:
    """Create or migrate the history schema to the newest revision."""
    config = _load(config_path)
    before, now = migrate(config.database.url)
    where = f"database at {config.database.url.split('@')[-1]}"
    if before is None:
        click.echo(f"{where}: created the history schema (revision {now})")
    elif before != now:
        click.echo(f"{where}: migrated the history schema from revision {before} to {now}")
    else:
        click.echo(f"{where}: already at the newest revision {now}; nothing to do")


# The admin commands load their modules when they run (or --help lists them): `postroom milter` never holds what
# only they use (tests/test_layers.py checks which).
main.add_lazy(
    {
        "postfix-snippet": "postroom.admin.snippets:postfix_snippet_command",
        "dovecot-snippet": "postroom.admin.dovecot:dovecot_snippet_command",
        "imap-event": "postroom.admin.dovecot:imap_event_command",
        "imap-subscribe": "postroom.admin.dovecot:imap_subscribe_command",
        "imap-event-followup": "postroom.admin.dovecot:imap_event_followup_command",
        "tickets": "postroom.admin.tickets:tickets_group",
        "rules": "postroom.admin.rules_cli:rules_group",
        "remind": "postroom.admin.time_cli:remind_command",
        "digest": "postroom.admin.time_cli:digest_command",
        "stats": "postroom.admin.time_cli:stats_command",
        "admin": "postroom.admin.rebuild_cli:admin_group",
        "sweep": "postroom.admin.sweep_cli:sweep_command",
    }
)
use_formatter(main)

if __name__ == "__main__":
    sys.exit(main())
