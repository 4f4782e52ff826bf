"""A stack with postroom in front of Dovecot, configured from a postroom config: what the e2e tests use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import redis

from postroom.config import Config, to_toml, with_changes
from postroom_testbed.daemons import MilterDaemon, SmtpdDaemon
from postroom_testbed.dovecot import Login, MailUser
from postroom_testbed.processes import LOOPBACK
from postroom_testbed.stack import Stack

# "milter" speaks the milter protocol through libmilter (the default engine), "milter-asyncio" through postroom's
# own asyncio engine ([milter] engine = "asyncio"), "smtpd" is the after-queue content filter.
Adapter = Literal["milter", "milter-asyncio", "smtpd"]
ADAPTERS: tuple[Adapter, ...] = ("milter", "milter-asyncio", "smtpd")
MILTER_ADAPTERS: tuple[Adapter, ...] = ("milter", "milter-asyncio")  # the two engines of `postroom milter`


def config_for_stack(base: Config, stack: Stack, workdir: Path) -> Config:
    """``base`` pointed at the stack: its milter socket (umask 0 for Postfix) or its after-queue filter ports,
    its Redis, SQLite in ``workdir``."""
    changes: dict[str, dict[str, object]] = {
        "milter": {"socket": f"unix:{stack.milter_socket_path}", "socket_umask": 0},
        "redis": {"url": stack.redis.url},
        "database": {"url": f"sqlite:///{workdir / 'history.sqlite3'}"},
        # Auto-replies go out through this stack's Postfix, as they go through the local one in production.
        "mailer": {"host": LOOPBACK, "port": stack.postfix.smtp_port},
    }
    if stack.filter is not None:
        changes["smtpd"] = {
            "listen_host": LOOPBACK,
            "listen_port": stack.filter_port,
            "reinject_host": LOOPBACK,
            "reinject_port": stack.reinject_port,
        }
    return with_changes(base, changes)


@dataclass
class Deployment:
    """A stack with the real postroom in front of Dovecot, as a milter or as an after-queue filter."""

    stack: Stack
    daemon: MilterDaemon | SmtpdDaemon
    config: Config
    adapter: Adapter = "milter"

    @property
    def milter(self) -> MilterDaemon | SmtpdDaemon:
        """The postroom daemon; the name is from the days when it was always the milter."""
        return self.daemon

    @property
    def before_queue(self) -> bool:
        """A milter (either engine): Postfix asks postroom inside the SMTP session, before the mail is queued."""
        return self.adapter != "smtpd"

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.stack.redis.url, decode_responses=True)


@contextlib.contextmanager
def deploy(
    base: Config,
    customers: Sequence[str] = (),
    adapter: Adapter = "milter",
    *,
    parent_dir: Path | None = None,
    keep_dir: bool = False,
) -> Iterator[Deployment]:
    """Start a stack whose mailboxes and logins are the config's, plus postroom as ``adapter``: the milter
    (``postroom milter``, on libmilter or with the asyncio engine) or the after-queue filter (``postroom smtpd``);
    stop everything on exit.
    ``parent_dir`` and ``keep_dir`` are the Stack's: where its folder goes, and whether it stays after the stop."""
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, not {adapter!r}")
    addresses = [box.address for box in base.mailboxes.values()]
    addresses += [agent.address for agent in base.agents.values()]
    users = [MailUser(a) for a in dict.fromkeys([*addresses, *customers])]
    logins = [Login(name) for name in base.agents]
    before_queue = adapter != "smtpd"
    milter, after_queue = ("auto", None) if before_queue else (None, "after-queue")
    stack_at = Stack(
        users=users, logins=logins, milter=milter, filter=after_queue, parent_dir=parent_dir, keep_dir=keep_dir
    )
    with stack_at as stack:
        workdir = stack.root / "postroom"
        config = config_for_stack(base, stack, workdir)
        if adapter == "milter-asyncio":
            config = with_changes(config, {"milter": {"engine": "asyncio"}})
        daemon: MilterDaemon | SmtpdDaemon
        if before_queue:
            daemon = MilterDaemon(workdir, to_toml(config), stack.milter_socket_path)
        else:
            daemon = SmtpdDaemon(workdir, to_toml(config), stack.filter_port)
        daemon.start()
        try:
            yield Deployment(stack, daemon, config, adapter)
        finally:
            daemon.stop()
