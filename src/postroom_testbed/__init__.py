"""A whole private mail stack (Postfix, Dovecot, Redis) on free loopback ports in one temp dir.

Not part of postroom's mail handling: a package of its own beside ``postroom``, one module per server
(:mod:`.postfix`, :mod:`.dovecot`, :mod:`.redis_server`; :mod:`.postgres_server` for the history outage
tests), with :mod:`.processes` (ports, process groups, logs),
:mod:`.stack` (the three together), :mod:`.daemons` (the real ``postroom milter`` / ``postroom smtpd`` started
against a stack) and :mod:`.deploy` (both, configured from a postroom config).

Why it ships in the same distribution rather than under tests/: ``postroom demo`` runs its private Redis from
here, and ``postroom demo --postfix`` a whole stack, from an installed postroom; the end-to-end tests and the
benchmarks in bench/ import the same code, so what the demo shows is what the tests check.

Mail flows the way it does in production: SMTP into Postfix (MX listener or SASL submission), through the milter
under test, over LMTP into Dovecot, and out again over IMAP.

Requirements: run as root on Linux with the Debian packages ``postfix``, ``dovecot-imapd``, ``dovecot-lmtpd`` and
``redis-server`` installed (the private Redis alone needs only ``redis-server``).  Nothing under /etc,
/var/spool/postfix or /run/dovecot is read for configuration or written; several stacks can run side by side.

Set ``POSTROOM_TESTBED_KEEP=1`` to keep the temp dir of every stack (logs, queue, mail) for a post-mortem of a
failing test.  ``python -m postroom_testbed`` runs a stack until Ctrl-C.
"""

from __future__ import annotations

from postroom_testbed.daemons import MilterDaemon, PostroomDaemon, SmtpdDaemon
from postroom_testbed.deploy import ADAPTERS, MILTER_ADAPTERS, Adapter, Deployment, config_for_stack, deploy
from postroom_testbed.dovecot import Dovecot, Login, MailUser, imap_quote
from postroom_testbed.postfix import MILTER_MACROS, SUBMISSION_DAEMON_NAME, Postfix
from postroom_testbed.postgres_server import PostgresServer, postgres_server
from postroom_testbed.processes import LOOPBACK, StackError, free_port, log_tail, pid_alive
from postroom_testbed.redis_server import RedisServer
from postroom_testbed.stack import Stack

__all__ = [
    "ADAPTERS",
    "LOOPBACK",
    "MILTER_ADAPTERS",
    "MILTER_MACROS",
    "SUBMISSION_DAEMON_NAME",
    "Adapter",
    "Deployment",
    "Dovecot",
    "Login",
    "MailUser",
    "MilterDaemon",
    "Postfix",
    "PostgresServer",
    "PostroomDaemon",
    "RedisServer",
    "SmtpdDaemon",
    "Stack",
    "StackError",
    "config_for_stack",
    "deploy",
    "free_port",
    "imap_quote",
    "log_tail",
    "pid_alive",
    "postgres_server",
]
