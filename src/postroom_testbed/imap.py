"""A testbed stack whose Dovecot runs what ``postroom dovecot-snippet --write`` writes, with the milter in front.

Agents log in over IMAP with their own passwords and see the shared mailboxes as public namespaces; moving a
mail runs ``postroom imap-event`` as Dovecot's mail user.  Used by the end-to-end tests and ``postroom demo
--postfix``, so both run the configuration an administrator gets.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from postroom.config import Config, to_toml, with_changes
from postroom.imap_event import subscribe_team_inboxes
from postroom_testbed import Deployment, Dovecot, Login, MailUser, MilterDaemon, Stack, config_for_stack
from postroom_testbed.dovecot import VMAIL_UID

# The shared mailbox's own mail, where the testbed's userdb (home = mail dir / user) and mail_location put it.
_SNIPPET_DIR = "dovecot-postroom"


@dataclass(frozen=True)
class Team:
    """A deployment whose agents log in to Dovecot with their own passwords."""

    deployment: Deployment
    passwords: Mapping[str, str]  # agent login -> password
    snippet_output: str  # what dovecot-snippet --write said


def python_for_mail_user(root: Path) -> str:
    """An interpreter Dovecot's mail user (uid 5000) can run, on this checkout and the venv's packages.

    The venv's own interpreter may sit in root's home, which that user cannot enter: Debian's /usr/bin/python3
    runs postroom instead, from this source tree and the venv's site-packages.  A checkout (or venv) below a
    directory others cannot enter (a CI clone in a mkdtemp folder) is linked into ``root`` first.  In production
    postroom is installed where the mail user can run it and ``--python`` stays at its default.
    """
    path = root / "python-for-vmail"
    source = Path(__file__).resolve().parents[1]
    packages = Path(sysconfig.get_paths()["purelib"])
    if not (_others_can_enter(source) and _others_can_enter(packages)):
        lib = root / "vmail-lib"
        _linked_copy(source / "postroom", lib / "postroom")
        _linked_copy(packages, lib / "site-packages")
        source, packages = lib, lib / "site-packages"
    path.write_text(f'#!/bin/sh\nPYTHONPATH="{source}:{packages}" exec /usr/bin/python3 "$@"\n')
    path.chmod(0o755)
    return str(path)


def _others_can_enter(directory: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in (directory, *directory.parents))


def _linked_copy(tree: Path, target: Path) -> None:
    """``tree`` at ``target`` as hard links where the file system allows (the files keep their modes), else copies."""

    def link(src: str, dst: str) -> object:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        return dst

    shutil.copytree(tree, target, copy_function=link, ignore=shutil.ignore_patterns("__pycache__"))
    for directory, _dirs, _files in os.walk(target):
        Path(directory).chmod(0o755)


class _SnippetWriter:
    """Called by the stack's Dovecot when it writes its config: run dovecot-snippet --write and include it."""

    def __init__(self, base: Config) -> None:
        self.base = base
        self.stack: Stack | None = None
        self.config: Config | None = None
        self.output = ""

    def __call__(self, dovecot: Dovecot) -> str:
        from postroom.admin.cli import main  # noqa: PLC0415  (the CLI imports the testbed's users lazily)

        assert self.stack is not None
        root = self.stack.root
        workdir = root / "postroom"
        workdir.mkdir(exist_ok=True)
        workdir.chmod(0o777)  # imap-event, run as the mail user, writes the SQLite history here too
        secret = root / "imap-master.secret"
        secret.write_text("master-secret\n")
        secret.chmod(0o644)  # imap-event's follow-up logs in as the master user, as the mail user
        self.config = with_changes(
            self.base,
            {
                "redis": {"url": self.stack.redis.url},
                "database": {"url": f"sqlite:///{workdir / 'history.sqlite3'}"},
                "imap": {"port": dovecot.imap_port, "master_password_file": str(secret)},
            },
        )
        # The milter's config file, written again (with the mailer's port) once Postfix is up.
        config_path = workdir / "postroom.toml"
        config_path.write_text(to_toml(self.config))
        args = ["dovecot-snippet", "--config", str(config_path), "--dir", str(root / _SNIPPET_DIR)]
        args += ["--mail-location", f"maildir:{dovecot.mail_dir}/{{address}}/Maildir"]
        args += ["--python", python_for_mail_user(root), "--write"]
        result = CliRunner().invoke(main, args)
        if result.exit_code != 0:
            raise RuntimeError(f"postroom dovecot-snippet failed: {result.output}")
        self.output = result.output
        return f"!include {root / _SNIPPET_DIR / 'postroom.conf'}\n"


@contextlib.contextmanager
def deploy_team(
    base: Config,
    passwords: Mapping[str, str],
    customers: Sequence[str] = (),
    *,
    parent_dir: Path | None = None,
    keep_dir: bool = False,
) -> Iterator[Team]:
    """The config's shared mailboxes and agents (each with their password) behind the real milter.
    ``parent_dir`` and ``keep_dir`` are the Stack's: where its folder goes, and whether it stays after the stop."""
    users = [MailUser(box.address) for box in base.mailboxes.values()]
    users += [MailUser(c) for c in customers]
    logins = [Login(login, passwords[login]) for login in base.agents]
    writer = _SnippetWriter(base)
    stack = Stack(
        users=users, logins=logins, milter="auto", dovecot_extra=writer, parent_dir=parent_dir, keep_dir=keep_dir
    )
    writer.stack = stack
    with stack:
        assert writer.config is not None
        workdir = stack.root / "postroom"
        config = config_for_stack(writer.config, stack, workdir)
        daemon = MilterDaemon(workdir, to_toml(config), stack.milter_socket_path)
        daemon.start()
        subscribe_team_inboxes(config)  # what the admin runs once: `postroom imap-subscribe`
        try:
            db = workdir / "history.sqlite3"
            os.chown(db, VMAIL_UID, -1)  # SQLite gives its -wal and -shm files the database file's owner
            db.chmod(0o666)
            yield Team(Deployment(stack, daemon, config), dict(passwords), writer.output)
        finally:
            daemon.stop()
