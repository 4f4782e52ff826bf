"""A whole private mail stack (Postfix, Dovecot, Redis) on free loopback ports in one temp dir.

Used by the end-to-end tests, the benchmarks and the local demo (``python -m postroom.testbed``).
Mail flows the way it does in production: SMTP into Postfix (MX listener or SASL submission),
through the milter under test, over LMTP into Dovecot, and out again over IMAP.

Requirements: run as root on Linux with the Debian packages ``postfix``, ``dovecot-imapd``,
``dovecot-lmtpd`` and ``redis-server`` installed. Nothing under /etc, /var/spool/postfix or
/run/dovecot is read for configuration or written; several stacks can run side by side.

Set ``POSTROOM_TESTBED_KEEP=1`` to keep the temp dir of every stack (logs, queue, mail) for a
post-mortem of a failing test.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import email
import email.policy
import imaplib
import os
import re
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage, Message
from pathlib import Path
from types import TracebackType
from typing import Literal

import redis

from postroom.admin import snippets
from postroom.config import Config, to_toml, with_changes

__all__ = [
    "ADAPTERS",
    "MILTER_MACROS",
    "SUBMISSION_DAEMON_NAME",
    "Adapter",
    "Deployment",
    "Dovecot",
    "Login",
    "MailUser",
    "MilterDaemon",
    "Postfix",
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
    "main",
    "pid_alive",
]

LOOPBACK = "127.0.0.1"
# Dovecot delivers and serves mail as this uid/gid; it needs no passwd entry.
VMAIL_UID = 5000
VMAIL_GID = 5000
# Postfix 3.7 defaults, written out so the config documents what the milter receives at each
# stage (checked with a pymilter milter against this stack):
# - {auth_type}, {auth_authen} arrive with MAIL FROM, only on the submission port after AUTH;
#   libmilter keeps them readable in the RCPT, DATA, EOH and EOM callbacks.
# - {i} (queue id) is absent at MAIL FROM and at the first RCPT: Postfix creates the queue file
#   only after the milter has accepted the first recipient. It is there from the second RCPT
#   on and at DATA, EOH and EOM; read it at EOM.
# - {daemon_name} is "ORIGINATING" on the submission port (see SUBMISSION_DAEMON_NAME) and
#   $myhostname on the MX port.
MILTER_MACROS: dict[str, str] = {
    "milter_connect_macros": "j {daemon_name} {daemon_addr} v _",
    "milter_helo_macros": "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    "milter_mail_macros": "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}",
    "milter_rcpt_macros": "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
    "milter_data_macros": "i",
    "milter_end_of_header_macros": "i",
    "milter_end_of_data_macros": "i",
}
# Value of {daemon_name} for mail that came in on the submission port, as in Debian's
# master.cf, so a milter can tell staff replies from inbound mail without looking at auth.
SUBMISSION_DAEMON_NAME = "ORIGINATING"
# sockaddr_un.sun_path is 108 bytes including the NUL. The longest socket paths below the
# temp dir are Dovecot's (dovecot/run/ + e.g. "replication-notify-fifo", about 40 characters).
_MAX_ROOT_LENGTH = 60
_LOG_TAIL_LINES = 40
_STOP_TIMEOUT = 10.0
_START_TIMEOUT = 15.0
_POLL = 0.05


class StackError(RuntimeError):
    """A service of the stack failed; the message carries the tail of the log that says why."""


@dataclass(frozen=True)
class MailUser:
    """A mailbox in Dovecot; the IMAP/LMTP user name is the full address."""

    address: str
    password: str = "secret"


@dataclass(frozen=True)
class Login:
    """A SASL login for the submission port (e.g. a staff member "meier"), checked by Dovecot."""

    name: str
    password: str = "secret"


# ---------------------------------------------------------------------------------------------
# helpers


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now.

    The kernel picks a random ephemeral port, so two processes asking at the same time rarely
    collide; the set catches the kernel handing the same port twice to this process before a
    service has bound it.
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise StackError("no free port found on 127.0.0.1")


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of a log file, or a note why there are none."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    tail = text.splitlines()[-lines:]
    if not tail:
        return f"({path} is empty)"
    return "\n".join(tail)


def _error(message: str, *logs: Path) -> StackError:
    parts = [message]
    for log in logs:
        parts.append(f"--- tail of {log} ---\n{log_tail(log)}")
    return StackError("\n".join(parts))


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a pid from /proc, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses; the fields after the last ")" do not.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie.

    Daemonized services end up as children of PID 1, which on these machines reaps them only
    about a second after they exit; a zombie is dead for every purpose of the tests.
    """
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return sorted(members)


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


def _end_group(pgid: int, timeout: float = _STOP_TIMEOUT) -> None:
    """Wait for a process group to die, then SIGKILL whatever is left of it."""
    if _group_gone(pgid, timeout):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if not _group_gone(pgid, timeout):
        raise StackError(f"processes {_group_members(pgid)} of process group {pgid} survived SIGKILL")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _listening_ports(owner: int) -> set[int]:
    """TCP ports on 127.0.0.1 that process ``owner`` itself listens on.

    Read from /proc instead of probing with connect(): a probe would start a real IMAP/SMTP
    session, log noise, and (for Postfix) a milter connection. Checking the socket's owner
    means a port grabbed by someone else in the meantime is not mistaken for our service.
    """
    inodes = _socket_inodes(owner)
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, port_hex = fields[1].split(":")
        if fields[3] == "0A" and address in ("0100007F", "00000000") and fields[9] in inodes:
            ports.add(int(port_hex, 16))
    return ports


def _wait_listening(
    ports: Iterable[int],
    proc: subprocess.Popen[bytes],
    what: str,
    log: Path,
    timeout: float = _START_TIMEOUT,
) -> None:
    wanted = set(ports)
    deadline = time.monotonic() + timeout
    while True:
        missing = wanted - _listening_ports(proc.pid)
        if not missing:
            return
        if proc.poll() is not None:
            raise _error(f"{what} exited with status {proc.returncode} during start-up", log)
        if time.monotonic() > deadline:
            raise _error(f"{what} did not listen on port(s) {sorted(missing)} within {timeout:.0f}s", log)
        time.sleep(_POLL)


# free_port() only finds a port free; until the service binds it, another process (or an
# outgoing connection of a benchmark) may take it. Services that fail with this in their log
# are started again on new ports.
_PORT_CLASH = "Address already in use"
_START_ATTEMPTS = 3


def _start_with_port_retry(start_once: Callable[[], None], new_ports: Callable[[], None]) -> None:
    for attempt in range(_START_ATTEMPTS):
        try:
            start_once()
            return
        except StackError as exc:
            if _PORT_CLASH not in str(exc) or attempt == _START_ATTEMPTS - 1:
                raise
        new_ports()


def _run_on_terminal(cmd: Sequence[str], timeout: float) -> tuple[int, str]:
    """Run a command with stdout and stderr on a pseudo-terminal; (exit status, output).

    The postfix command reports errors such as a bad main.cf only to syslog (absent here) and,
    when stderr is a terminal, to stderr; it cannot use maillog_file before postlogd runs.
    A pipe would also be wrong: ``postfix start`` leaves a daemon behind, and a daemon
    holding the pipe would make us wait for EOF forever. So: a pty, read until the command
    itself has exited.
    """
    primary, secondary = os.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary)
    except BaseException:
        os.close(primary)
        raise
    finally:
        os.close(secondary)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            exited = proc.poll() is not None
            ready, _, _ = select.select([primary], [], [], 0 if exited else _POLL)
            chunk = b""
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: nobody holds the terminal open any more
                    chunk = b""
                output += chunk
            if exited and not chunk:
                break
            if not exited and time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                text = output.decode(errors="replace")
                raise StackError(f"{' '.join(cmd)} did not finish within {timeout:.0f}s:\n{text}")
    finally:
        os.close(primary)
    return proc.returncode, output.decode(errors="replace").replace("\r\n", "\n")


def _binary(name: str) -> str:
    for directory in (None, "/usr/sbin", "/usr/bin"):
        found = shutil.which(name, path=directory)
        if found:
            return found
    raise StackError(f"{name} not found; install it (see /work/shared/HARNESS.md)")


def _mkdir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    # mkdtemp and the umask give 0700 or 0750; postfix, dovecot and uid 5000 must traverse.
    path.chmod(mode)
    return path


def _check_field(kind: str, value: str) -> None:
    # passwd-file fields are colon separated and one entry is one line.
    if not value or any(c in value for c in ":\n\r") or value != value.strip():
        raise ValueError(f"{kind} {value!r} cannot be used in a Dovecot passwd-file")


def _imap_utf7_encode(name: str) -> str:
    """Mailbox name in IMAP modified UTF-7 (RFC 3501 section 5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def _imap_utf7_decode(name: str) -> str:
    def decode(match: re.Match[str]) -> str:
        chunk = match.group(1)
        if not chunk:
            return "&"
        raw = chunk.replace(",", "/")
        return base64.b64decode(raw + "=" * (-len(raw) % 4)).decode("utf-16-be")

    return re.sub(r"&([^-]*)-", decode, name)


def imap_quote(folder: str) -> str:
    """A folder name as an IMAP quoted string; imaplib sends arguments verbatim."""
    encoded = _imap_utf7_encode(folder)
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


_LIST_LINE = re.compile(rb'^\((?P<flags>[^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (?P<name>.+)$')


def _parse_list_name(raw: bytes) -> str:
    name = raw.decode("ascii", errors="replace")
    if name.startswith('"') and name.endswith('"'):
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    return _imap_utf7_decode(name)


def _crlf(data: bytes) -> bytes:
    # Postfix 3.7 accepts bare LF, but newer Postfix versions may reject it (smtpd_forbid_bare_newline);
    # send what a well-behaved client sends.
    return re.sub(rb"\r?\n", b"\r\n", data)


def _as_bytes(msg: bytes | Message) -> bytes:
    if isinstance(msg, bytes):
        return _crlf(msg)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


# ---------------------------------------------------------------------------------------------
# Redis


class RedisServer:
    """A private redis-server on a free port, no persistence, data dir inside ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dir = workdir / "redis"
        self.log_path = workdir / "redis.log"
        self.pidfile = self.dir / "redis.pid"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Pid of the server (also after it stopped, to check it is gone)."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if not self.is_running():
            _start_with_port_retry(self._start_once, self._new_ports)

    def _new_ports(self) -> None:
        self.port = free_port()

    def _start_once(self) -> None:
        _mkdir(self.dir)
        cmd = [
            _binary("redis-server"),
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--save", "",
            "--appendonly", "no",
            # Kept in the foreground as our own child (pid file still written): a crash at
            # start-up shows as an exit status at once, and stop() can wait() on it, with no
            # pid file race and no zombie left for PID 1.
            "--daemonize", "no",
            "--pidfile", str(self.pidfile),
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        _wait_listening([self.port], self._proc, "redis-server", self.log_path)

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_TIMEOUT)


# ---------------------------------------------------------------------------------------------
# Dovecot


class Dovecot:
    """Dovecot with LMTP in, IMAP out and an inet ``service auth`` listener for Postfix SASL.

    Users are full addresses; LMTP to ``user+Detail@domain`` saves into folder "Detail" of
    ``user@domain`` (created on demand). Logins are further passdb entries in the same
    passwd-file, so Postfix can check staff credentials without them having a mailbox.
    """

    def __init__(self, workdir: Path, users: Sequence[MailUser], logins: Sequence[Login] = ()) -> None:
        names = [u.address.lower() for u in users] + [login.name.lower() for login in logins]
        for user in users:
            _check_field("address", user.address)
            _check_field("password", user.password)
        for login in logins:
            _check_field("login", login.name)
            _check_field("password", login.password)
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate user or login name in {names}")
        self.workdir = workdir
        self.users = list(users)
        self.logins = list(logins)
        self.dir = workdir / "dovecot"
        self.base_dir = self.dir / "run"
        self.state_dir = self.dir / "state"
        self.mail_dir = workdir / "mail"
        self.config_path = self.dir / "dovecot.conf"
        self.passwd_path = self.dir / "users"
        self.log_path = workdir / "dovecot.log"
        self.imap_port = free_port()
        self.lmtp_port = free_port()
        self.auth_port = free_port()
        # Shows up in the process titles ("dovecot-postroom-stack-xyz/lmtp"), telling stacks apart.
        self.instance_name = "dovecot-" + re.sub(r"[^A-Za-z0-9-]", "-", workdir.name)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Pid of the master (also after it stopped, to check it is gone)."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pids(self) -> list[int]:
        """The master and all its live children (they share the master's process group)."""
        return _group_members(self._proc.pid) if self._proc is not None else []

    def config_text(self) -> str:
        return f"""\
# Written by postroom.testbed for one private test instance; nothing is included from /etc/dovecot.
protocols = imap lmtp
listen = {LOOPBACK}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
instance_name = {self.instance_name}
log_path = {self.log_path}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
# Tests try wrong passwords on purpose; Dovecot's delays after a failure (2 s, then a penalty
# for the IP growing to 15 s) would slow down every later login from 127.0.0.1. A failed
# login still takes up to 0.5 s: Dovecot sends failure replies from a 500 ms timer.
auth_failure_delay = 0
mail_location = maildir:~/Maildir
first_valid_uid = {VMAIL_UID}
last_valid_uid = {VMAIL_UID}
first_valid_gid = {VMAIL_GID}
last_valid_gid = {VMAIL_GID}
recipient_delimiter = +
lmtp_save_to_detail_mailbox = yes
lda_mailbox_autocreate = yes
lda_mailbox_autosubscribe = yes
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_path}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.passwd_path}
  default_fields = uid={VMAIL_UID} gid={VMAIL_GID} home={self.mail_dir}/%u
}}
service imap-login {{
  inet_listener imap {{
    address = {LOOPBACK}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {LOOPBACK}
    port = {self.lmtp_port}
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service auth {{
  # Postfix (smtpd_sasl_type = dovecot) speaks the auth client protocol over TCP here.
  inet_listener auth-client {{
    address = {LOOPBACK}
    port = {self.auth_port}
  }}
}}
"""

    def passwd_text(self) -> str:
        # Dovecot lowercases user names before the lookup (auth_username_format = %Lu).
        entries = [f"{u.address.lower()}:{{PLAIN}}{u.password}::::::" for u in self.users]
        entries += [f"{login.name.lower()}:{{PLAIN}}{login.password}::::::" for login in self.logins]
        return "\n".join(entries) + "\n"

    def start(self) -> None:
        if not self.is_running():
            _start_with_port_retry(self._start_once, self._new_ports)

    def _new_ports(self) -> None:
        self.imap_port, self.lmtp_port, self.auth_port = free_port(), free_port(), free_port()

    def _start_once(self) -> None:
        _mkdir(self.dir)
        _mkdir(self.state_dir)
        _mkdir(self.mail_dir)
        # LMTP and IMAP run as the virtual mail uid and create the users' homes in here.
        os.chown(self.mail_dir, VMAIL_UID, VMAIL_GID)
        self.config_path.write_text(self.config_text())
        self.passwd_path.write_text(self.passwd_text())
        # The auth process runs as the unprivileged "dovecot" user and must read it.
        self.passwd_path.chmod(0o644)
        # -F keeps the master as our child so we hold its pid and exit status. stdin from
        # /dev/null and output into the log: an inherited pipe would make pytest wait for EOF.
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [_binary("dovecot"), "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_listening([self.imap_port, self.lmtp_port, self.auth_port], self._proc, "dovecot", self.log_path)

    def stop(self, *, graceful: bool = False) -> None:
        """Stop Dovecot and all its processes.

        By default the whole process group gets SIGKILL: on SIGTERM the master sleeps a fixed
        second to let its children log their exit, a second per test for nothing, since mail
        is on disk once LMTP has answered and the stack's state is thrown away anyway (a
        restarted Dovecot finds all delivered mail). ``graceful=True`` does the SIGTERM way.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if graceful:
                proc.terminate()
            else:
                # start_new_session made the master a process group leader; its children
                # stay in its group.
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(_STOP_TIMEOUT)
        _end_group(proc.pid)


# ---------------------------------------------------------------------------------------------
# Postfix

_QUEUES_IN_FLIGHT = ("maildrop", "incoming", "active", "deferred")

# Standard services, chroot off (the chroot would need copies of /etc files in the temp dir).
_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A private Postfix instance: ``postfix -c CONFDIR`` with its own queue and data dirs.

    How it runs beside (or without) the system Postfix, without editing /etc/postfix: every
    command gets ``-c CONFDIR`` (postfix, postqueue, postconf), and main.cf points
    ``queue_directory`` and ``data_directory`` into the temp dir, so master.pid, master.lock,
    the public/private sockets and the queue are all private. Postfix's own check that a
    non-default config dir is listed in ``alternate_config_directories`` of /etc/postfix/main.cf
    applies only to the set-gid commands (postqueue, postdrop) run by a non-root user; as root
    ``postfix -c`` and ``postqueue -c`` are accepted as they are (so the testbed needs root).
    ``data_directory`` must belong to the postfix user (master.lock). The daemons log only to
    ``maillog_file`` (through postlogd), which is why its tail is in the error messages here;
    errors the postfix command finds before any daemon runs (a bad main.cf) go to its stderr.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        lmtp_port: int,
        auth_port: int,
        domains: Sequence[str],
        mailboxes: Sequence[str],
        milter: str | None,
        milter_default_action: str = "accept",
        default_transport: str = "error:5.1.2 the testbed delivers only to its own domains",
        main_cf: Mapping[str, str] | None = None,
        filter_port: int | None = None,
        reinject_port: int | None = None,
    ) -> None:
        if not domains:
            raise ValueError("Postfix needs at least one domain")
        self.workdir = workdir
        self.dir = workdir / "postfix"
        self.config_dir = self.dir / "etc"
        self.queue_dir = self.dir / "queue"
        self.data_dir = self.dir / "data"
        self.log_path = workdir / "postfix.log"
        # Output of the postfix/postqueue commands; the daemons log to log_path.
        self.command_log_path = workdir / "postfix-commands.log"
        self.lmtp_port = lmtp_port
        self.auth_port = auth_port
        self.domains = list(domains)
        self.mailboxes = [m.lower() for m in mailboxes]
        self.milter = milter
        self.milter_default_action = milter_default_action
        self.default_transport = default_transport
        self.extra_main_cf = dict(main_cf or {})
        self.smtp_port = free_port()
        self.submission_port = free_port()
        # After-queue mode: the MX and submission listeners hand every mail to a content filter on filter_port
        # (postroom smtpd), which hands it back to the listener on reinject_port.
        self.filter_port = filter_port
        # A port the caller chose is kept on a port clash (the caller's filter is pointed at it); ours is renewed.
        self._reinject_port_given = reinject_port is not None
        self.reinject_port = (reinject_port or free_port()) if filter_port is not None else None
        # Only for the log lines; maillog_file keeps instances apart anyway.
        self.syslog_name = "postfix-" + re.sub(r"[^A-Za-z0-9-]", "-", workdir.name)
        self._started = False

    # -- configuration --------------------------------------------------------------------

    def main_cf_settings(self) -> dict[str, str]:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": self.syslog_name,
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.workdir}",
            "myhostname": f"mx.{self.domains[0]}",
            "mydestination": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "recipient_delimiter": "+",
            "alias_maps": "",
            "alias_database": "",
            "smtputf8_enable": "no",
            "biff": "no",
            "append_dot_mydomain": "no",
            "virtual_mailbox_domains": ", ".join(self.domains),
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}",
            "virtual_transport": f"lmtp:inet:{LOOPBACK}:{self.lmtp_port}",
            # Without DNS or a network, mail to other domains would sit in the deferred queue
            # retrying forever; failing at once makes a test's mistake visible in the log.
            "default_transport": self.default_transport,
            # The MX listener takes mail for our domains from anyone (every test client is on
            # 127.0.0.1, so permit_mynetworks would turn it into an open relay); the submission
            # listener overrides this with SASL.
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "",
            # A deferred mail (milter tempfail, Dovecot down) is retried within seconds.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "lmtp_destination_concurrency_limit": "50",
            # smtpd sleeps this long before every 4xx/5xx reply, a second per rejection test.
            "smtpd_error_sleep_time": "0s",
            "milter_protocol": "6",
            "milter_default_action": self.milter_default_action,
            **MILTER_MACROS,
        }
        if self.milter:
            settings["smtpd_milters"] = self.milter
        settings.update(self.extra_main_cf)
        return settings

    def main_cf_text(self) -> str:
        lines = ["# Written by postroom.testbed for one private test instance."]
        lines += [f"{name} = {value}".rstrip() for name, value in self.main_cf_settings().items()]
        return "\n".join(lines) + "\n"

    def master_cf_text(self) -> str:
        submission_options = {
            "syslog_name": f"{self.syslog_name}/submission",
            "smtpd_sasl_auth_enable": "yes",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": f"inet:{LOOPBACK}:{self.auth_port}",
            # Loopback only: plain AUTH without TLS is what lets smtplib log in.
            "smtpd_tls_security_level": "none",
            "smtpd_tls_auth_only": "no",
            "smtpd_sasl_security_options": "noanonymous",
            "smtpd_relay_restrictions": "permit_sasl_authenticated,reject",
            "smtpd_recipient_restrictions": "permit_sasl_authenticated,reject",
            "milter_macro_daemon_name": SUBMISSION_DAEMON_NAME,
        }
        mx_options: dict[str, str] = {}
        after_queue = ""
        if self.filter_port is not None:
            # What `postroom postfix-snippet --mode after-queue` prints, from the same tables.
            filtered = {"content_filter": f"{snippets.TRANSPORT}:[{LOOPBACK}]:{self.filter_port}"}
            filtered.update(snippets.FILTERED_LISTENER)
            mx_options.update(filtered)
            submission_options.update(filtered)
            submission_options.update(snippets.SUBMISSION_LISTENER)
            after_queue = (
                f"{snippets.TRANSPORT} unix - - n - {snippets.MAX_PROCESSES} smtp"
                + snippets.options(snippets.TRANSPORT_OPTIONS)
                + f"\n{LOOPBACK}:{self.reinject_port} inet n - n - {snippets.MAX_PROCESSES} smtpd"
                + snippets.options({"syslog_name": f"{self.syslog_name}/reinject", **snippets.REINJECT_OPTIONS})
                + "\n"
            )
        return (
            "# Written by postroom.testbed for one private test instance.\n"
            f"{LOOPBACK}:{self.smtp_port} inet n - n - - smtpd{snippets.options(mx_options)}\n"
            f"{LOOPBACK}:{self.submission_port} inet n - n - - smtpd{snippets.options(submission_options)}\n"
            + after_queue
            + _MASTER_SERVICES
        )

    def write_config(self) -> None:
        _mkdir(self.config_dir)
        _mkdir(self.queue_dir)
        _mkdir(self.data_dir)
        # master.lock lives here and is created by the postfix user.
        shutil.chown(self.data_dir, "postfix")
        self._write_config_file("main.cf", self.main_cf_text())
        self._write_config_file("master.cf", self.master_cf_text())
        self._write_config_file("vmailbox", "".join(f"{m} OK\n" for m in self.mailboxes))

    def _write_config_file(self, name: str, text: str) -> None:
        path = self.config_dir / name
        path.write_text(text)
        # Postfix reads main.cf and texthash: tables only once they are at least a second or two
        # old (it guards against reading a file that is still being written) and polls every
        # 300 ms until then, which cost two seconds per start. Backdating skips that wait.
        past = time.time() - 10
        os.utime(path, (past, past))

    # -- commands ---------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Postfix command against this instance; its output is also kept in the command log."""
        cmd = [_binary(args[0]), "-c", str(self.config_dir), *args[1:]]
        returncode, output = _run_on_terminal(cmd, timeout)
        with self.command_log_path.open("a") as log:
            log.write(f"$ {' '.join(cmd)}\n{output}")
        if check and returncode != 0:
            raise _error(
                f"{' '.join(cmd)} failed with exit status {returncode}:\n{output.rstrip()}",
                self.log_path,
            )
        return subprocess.CompletedProcess(cmd, returncode, output)

    def postconf(self, name: str) -> str:
        """The effective value of a main.cf parameter of this instance."""
        cmd = [_binary("postconf"), "-c", str(self.config_dir), "-h", name]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()

    def set_main_cf(self, settings: Mapping[str, str]) -> None:
        """Change main.cf parameters and, if running, reload (e.g. toggle milter_default_action)."""
        self.extra_main_cf.update(settings)
        self._write_config_file("main.cf", self.main_cf_text())
        if self.is_running():
            self._run("postfix", "reload")

    # -- life cycle -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The master's pid from its pid file, if it is running."""
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def is_running(self) -> bool:
        return self.pid is not None

    def pids(self) -> list[int]:
        """The master and its children (the master is a process group leader)."""
        pid = self.pid
        return _group_members(pid) if pid is not None else []

    def start(self) -> None:
        if not self.is_running():
            _start_with_port_retry(self._start_once, self._new_ports)

    def _new_ports(self) -> None:
        self.smtp_port, self.submission_port = free_port(), free_port()
        if self.reinject_port is not None and not self._reinject_port_given:
            self.reinject_port = free_port()

    def _start_once(self) -> None:
        self.write_config()
        self._started = True
        # "start" runs master -w, which returns only after the master has bound the listeners
        # (no need to wait for the ports) and reports failure through the exit status; the
        # reason is in maillog_file, or in the command's output for a broken main.cf.
        self._run("postfix", "start", timeout=_START_TIMEOUT + 30)
        if not self.is_running():
            raise _error("postfix start returned but the master is not running", self.log_path)

    def stop(self) -> None:
        if not self._started:
            return
        pid = self.pid
        if pid is None:
            return
        # "abort" sends the master the same SIGTERM as "stop" (the master passes it on to its
        # process group) but does not sleep a whole second before checking the master is gone;
        # _end_group does the waiting, with SIGKILL as the last resort.
        self._run("postfix", "abort", check=False)
        _end_group(pid)

    def reload(self) -> None:
        self._run("postfix", "reload")

    def flush(self) -> None:
        """Retry deferred mail now (postqueue -f)."""
        self._run("postqueue", "-f")

    # -- queue and log ------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)

    def queue_ids(self, *queues: str) -> list[str]:
        """Queue ids of the files in the named queues (default: all queues mail passes through).

        Reads the queue directories directly; deferred/ and defer/ are hashed into
        subdirectories, hence the walk.
        """
        ids: list[str] = []
        for queue in queues or _QUEUES_IN_FLIGHT:
            for _dirpath, _dirnames, filenames in os.walk(self.queue_dir / queue):
                ids.extend(filenames)
        return sorted(ids)

    def deferred_count(self) -> int:
        return len(self.queue_ids("deferred"))

    def hold_count(self) -> int:
        """Messages in the hold queue (a milter's SMFIR_QUARANTINE puts them there)."""
        return len(self.queue_ids("hold"))

    def queue_empty(self) -> bool:
        """No mail in maildrop, incoming, active or deferred; held mail does not count."""
        return not self.queue_ids()

    def wait_queue_empty(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.queue_empty():
            if time.monotonic() > deadline:
                queued = {queue: self.queue_ids(queue) for queue in _QUEUES_IN_FLIGHT}
                raise _error(f"Postfix queue not empty after {timeout:.0f}s: {queued}", self.log_path)
            time.sleep(_POLL)


# ---------------------------------------------------------------------------------------------
# the whole stack

_live_stacks: weakref.WeakSet[Stack] = weakref.WeakSet()


class Stack:
    """Redis, Dovecot and Postfix in one temp dir; a context manager.

    ``milter="auto"`` configures ``smtpd_milters = unix:<root>/milter.sock``
    (:attr:`milter_socket_path`) for a milter the test starts itself; any other string is used
    as the ``smtpd_milters`` value as it is. Until a milter listens there, Postfix applies
    ``milter_default_action``.

    ``filter="after-queue"`` sets up Postfix's after-queue content filter instead (the amavis pattern, as
    ``postroom postfix-snippet --mode after-queue`` prints it): the MX and submission listeners queue each mail
    and hand it to a filter the test starts on :attr:`filter_port`, which hands it back to the listener on
    :attr:`reinject_port`. Until a filter listens, Postfix keeps the mail in its deferred queue.
    """

    def __init__(
        self,
        *,
        domains: Sequence[str] = ("example.test", "customer.test"),
        users: Sequence[MailUser],
        logins: Sequence[Login] = (),
        milter: str | None = None,
        keep_dir: bool = False,
        milter_default_action: str = "accept",
        main_cf: Mapping[str, str] | None = None,
        parent_dir: Path | None = None,
        filter: str | None = None,  # shadows the builtin: the word Postfix's documentation uses
        filter_port: int | None = None,
        reinject_port: int | None = None,
    ) -> None:
        if filter not in (None, "after-queue"):
            raise ValueError(f'filter must be None or "after-queue", not {filter!r}')
        if filter is not None and milter is not None:
            raise ValueError("a stack runs a milter or an after-queue filter, not both")
        self.filter = filter
        self._filter_port = filter_port
        self._reinject_port = reinject_port
        self.domains = list(domains)
        self.users = list(users)
        self.logins = list(logins)
        self.milter = milter
        self.keep_dir = keep_dir or os.environ.get("POSTROOM_TESTBED_KEEP", "") not in ("", "0")
        self.milter_default_action = milter_default_action
        self.main_cf = dict(main_cf or {})
        self.parent_dir = parent_dir
        self._root: Path | None = None
        self._redis: RedisServer | None = None
        self._dovecot: Dovecot | None = None
        self._postfix: Postfix | None = None

    # -- parts ----------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        if self._root is None:
            raise StackError("Stack.root is not available: the stack is not started")
        return self._root

    @property
    def redis(self) -> RedisServer:
        if self._redis is None:
            raise StackError("Stack.redis is not available: the stack is not started")
        return self._redis

    @property
    def dovecot(self) -> Dovecot:
        if self._dovecot is None:
            raise StackError("Stack.dovecot is not available: the stack is not started")
        return self._dovecot

    @property
    def postfix(self) -> Postfix:
        if self._postfix is None:
            raise StackError("Stack.postfix is not available: the stack is not started")
        return self._postfix

    @property
    def milter_socket_path(self) -> Path:
        return self.root / "milter.sock"

    @property
    def filter_port(self) -> int:
        """Where Postfix delivers to the after-queue filter (the filter listens here)."""
        if self.filter is None:
            raise StackError("Stack.filter_port: this stack has no after-queue filter")
        if self._filter_port is None:
            self._filter_port = free_port()
        return self._filter_port

    @property
    def reinject_port(self) -> int:
        """Postfix's listener that takes mail back from the after-queue filter."""
        port = self.postfix.reinject_port
        if port is None:
            raise StackError("Stack.reinject_port: this stack has no after-queue filter")
        return port

    @property
    def milter_spec(self) -> str:
        """The milter in Postfix notation, e.g. for pymilter's ``Milter.runmilter``."""
        return f"unix:{self.milter_socket_path}"

    def process_ids(self) -> list[int]:
        """All live processes of the stack: Redis, Dovecot's and Postfix's process groups."""
        pids: list[int] = []
        if self._redis is not None and self._redis.pid is not None and pid_alive(self._redis.pid):
            pids.append(self._redis.pid)
        if self._dovecot is not None:
            pids += self._dovecot.pids()
        if self._postfix is not None:
            pids += self._postfix.pids()
        return sorted(pids)

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> Stack:
        if self._root is not None:
            raise StackError(f"this Stack was started before (in {self._root}); make a new one")
        try:
            root = Path(tempfile.mkdtemp(prefix="postroom-stack-", dir=self.parent_dir))
            self._root = root
            _mkdir(root)
            if len(str(root)) > _MAX_ROOT_LENGTH:
                raise StackError(f"temp dir {root} is too long for unix socket paths; pass a shorter parent_dir")
            _live_stacks.add(self)
            self._redis = RedisServer(root)
            self._dovecot = Dovecot(root, self.users, self.logins)
            self._redis.start()
            # Dovecot first: a port clash makes it pick new ports, which Postfix must know.
            self._dovecot.start()
            milter = self.milter_spec if self.milter == "auto" else self.milter
            self._postfix = Postfix(
                root,
                lmtp_port=self._dovecot.lmtp_port,
                auth_port=self._dovecot.auth_port,
                domains=self.domains,
                mailboxes=[u.address for u in self.users],
                milter=milter,
                milter_default_action=self.milter_default_action,
                main_cf=self.main_cf,
                filter_port=self.filter_port if self.filter is not None else None,
                reinject_port=self._reinject_port,
            )
            self._postfix.start()
        except BaseException as exc:
            try:
                self.stop()
            except StackError as stop_error:
                # The start-up error is the one to see; keep the clean-up failure as a note.
                exc.add_note(str(stop_error))
            raise
        return self

    def stop(self) -> None:
        """Stop every service and remove the temp dir; each step runs even if another fails."""
        errors: list[str] = []
        for part in (self._postfix, self._dovecot, self._redis):
            if part is None:
                continue
            try:
                part.stop()
            except Exception as exc:  # noqa: BLE001 - the remaining services must still be stopped
                errors.append(f"stopping {type(part).__name__}: {exc!r}")
        _live_stacks.discard(self)
        root = self._root
        if root is not None and root.exists():
            if self.keep_dir:
                print(f"postroom.testbed: kept {root}", file=sys.stderr)
            else:
                try:
                    shutil.rmtree(root)
                except OSError as exc:
                    errors.append(f"removing {root}: {exc!r}")
        if errors:
            raise StackError("stack did not stop cleanly:\n" + "\n".join(errors))

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- mail ---------------------------------------------------------------------------------------

    def send(
        self,
        msg: bytes | Message,
        *,
        mail_from: str,
        rcpts: Sequence[str],
        port: int | None = None,
        login: Login | None = None,
    ) -> dict[str, tuple[int, bytes]]:
        """Send one message over SMTP; with ``login`` to the submission port after AUTH.

        Returns the recipients Postfix refused (empty when all were accepted), as smtplib does.
        Raises smtplib's errors unchanged, so tests can assert on a rejection:
        SMTPRecipientsRefused when every recipient is refused, SMTPDataError when the end of
        data is refused (e.g. by the milter), SMTPSenderRefused for MAIL FROM.
        """
        if port is None:
            port = self.postfix.submission_port if login is not None else self.postfix.smtp_port
        data = _as_bytes(msg)
        with smtplib.SMTP(LOOPBACK, port, local_hostname="client.test", timeout=60) as smtp:
            smtp.ehlo()
            if login is not None:
                smtp.login(login.name, login.password)
            return smtp.sendmail(mail_from, list(rcpts), data)

    def _password(self, address: str, password: str | None) -> str:
        if password is not None:
            return password
        for user in self.users:
            if user.address.lower() == address.lower():
                return user.password
        return "secret"

    def _imap(self, address: str, password: str | None) -> imaplib.IMAP4:
        imap = imaplib.IMAP4(LOOPBACK, self.dovecot.imap_port, timeout=30)
        try:
            imap.login(address, self._password(address, password))
        except BaseException:
            imap.shutdown()
            raise
        return imap

    def fetch_raw(self, address: str, folder: str = "INBOX", password: str | None = None) -> list[bytes]:
        """All messages of a folder in arrival order, byte for byte as stored (CRLF line ends).

        For checks that need the exact bytes, such as a DKIM signature. Read-only: the messages
        stay unseen. Raises StackError if the folder does not exist.
        """
        imap = self._imap(address, password)
        try:
            status, detail = imap.select(imap_quote(folder), readonly=True)
            if status != "OK":
                raise StackError(
                    f"cannot select folder {folder!r} of {address}: {detail!r}; folders: {self._folders(imap)}"
                )
            _status, data = imap.search(None, "ALL")
            numbers = data[0].split() if data and data[0] else []
            messages: list[bytes] = []
            for number in numbers:
                _status, parts = imap.fetch(number.decode(), "(BODY.PEEK[])")
                messages += [part[1] for part in parts if isinstance(part, tuple)]
            return messages
        finally:
            imap.logout()

    def find_raw(self, address: str, text: str, folder: str = "INBOX", password: str | None = None) -> list[bytes]:
        """The messages of a folder whose headers or body contain ``text`` (IMAP SEARCH TEXT), as stored.

        One search instead of fetching the whole folder, for folders that grow over a test session (a bounce
        that quotes a Message-ID, one reply among hundreds). Read-only; [] for a missing folder.
        """
        if '"' in text or "\\" in text or not text.isascii():
            raise ValueError(f"cannot search for {text!r}: quotes, backslashes and non-ASCII are not supported")
        imap = self._imap(address, password)
        try:
            status, _detail = imap.select(imap_quote(folder), readonly=True)
            if status != "OK":
                return []
            _status, data = imap.search(None, "TEXT", f'"{text}"')
            messages: list[bytes] = []
            for number in data[0].split() if data and data[0] else []:
                _status, parts = imap.fetch(number.decode(), "(BODY.PEEK[])")
                messages += [part[1] for part in parts if isinstance(part, tuple)]
            return messages
        finally:
            imap.logout()

    def fetch(self, address: str, folder: str = "INBOX", password: str | None = None) -> list[EmailMessage]:
        """All messages of a folder in arrival order, parsed with email.policy.default.

        Line ends are turned into "\\n" first, so ``get_content()`` compares with ordinary
        Python strings. Read-only; raises StackError if the folder does not exist.
        """
        return [
            email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.default)
            for raw in self.fetch_raw(address, folder, password)
        ]

    def _folders(self, imap: imaplib.IMAP4) -> list[str]:
        _status, data = imap.list('""', '"*"')
        names = []
        for item in data:
            if isinstance(item, tuple):
                # A name sent as an IMAP literal: the name itself is the second element.
                names.append(_imap_utf7_decode(item[1].decode("ascii", errors="replace")))
            elif isinstance(item, bytes):
                match = _LIST_LINE.match(item)
                if match:
                    names.append(_parse_list_name(match.group("name")))
        return sorted(names)

    def folders(self, address: str, password: str | None = None) -> list[str]:
        imap = self._imap(address, password)
        try:
            return self._folders(imap)
        finally:
            imap.logout()

    def wait_for(
        self, address: str, folder: str, count: int, timeout: float = 20.0, password: str | None = None
    ) -> list[EmailMessage]:
        """Poll until the folder holds at least ``count`` messages and return them all."""
        deadline = time.monotonic() + timeout
        messages: list[EmailMessage] = []
        while True:
            try:
                messages = self.fetch(address, folder, password)
            except StackError:
                messages = []  # the folder is created by the first delivery into it
            if len(messages) >= count:
                return messages
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        try:
            folders: object = self.folders(address, password)
        except (OSError, imaplib.IMAP4.error) as exc:
            folders = f"(cannot list: {exc!r})"
        queued = {queue: self.postfix.queue_ids(queue) for queue in (*_QUEUES_IN_FLIGHT, "hold")}
        raise _error(
            f"{address} folder {folder!r}: {len(messages)} message(s) after {timeout:.0f}s, "
            f"wanted {count}; folders: {folders}; Postfix queues: {queued}",
            self.postfix.log_path,
            self.dovecot.log_path,
        )


class PostroomDaemon:
    """A postroom daemon as a child process with its config file and log in ``workdir``, for tests and benches.

    The config is written to ``workdir`` from TOML text; :meth:`reconfigure` rewrites it (the new config takes
    effect at the next :meth:`start`).  Subclasses say what "listening" means.
    """

    kind = "postroom"

    def __init__(self, workdir: Path, config_toml: str, *, command: Sequence[str] | None = None) -> None:
        self.workdir = _mkdir(workdir)
        self.config_path = workdir / "postroom.toml"
        self.config_path.write_text(config_toml)
        self.log_path = workdir / f"{self.kind}.log"
        self.command = list(command or [sys.executable, "-m", "postroom", self.kind, "--config", str(self.config_path)])
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def reconfigure(self, config_toml: str) -> None:
        self.config_path.write_text(config_toml)

    def _prepare(self) -> None:
        """Called before the process starts."""

    def _listening(self) -> bool:
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError

    def start(self, timeout: float = 15.0) -> None:
        self._prepare()
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self._listening():
            if self._proc.poll() is not None:
                raise _error(f"{self.kind} exited with {self._proc.returncode} before listening", self.log_path)
            if time.monotonic() > deadline:
                self.stop()
                raise _error(f"{self.kind} not listening on {self._where()} after {timeout:.0f}s", self.log_path)
            time.sleep(_POLL)

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # The milter's worker processes share its process group (start_new_session made it the leader).
        _end_group(proc.pid, timeout)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class MilterDaemon(PostroomDaemon):
    """``postroom milter`` (or any milter command) as a child process on a unix socket, for tests and benches.

    The config is written to ``workdir`` from a :class:`postroom.config.Config`; the socket is made with
    umask 0 there because Postfix's smtpd runs as another user than the root test process.
    """

    kind = "milter"

    def __init__(
        self, workdir: Path, config_toml: str, socket_path: Path, *, command: Sequence[str] | None = None
    ) -> None:
        self.socket_path = socket_path
        super().__init__(workdir, config_toml, command=command)

    def _prepare(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def _listening(self) -> bool:
        return self.socket_path.exists()

    def _where(self) -> str:
        return str(self.socket_path)


class SmtpdDaemon(PostroomDaemon):
    """``postroom smtpd``, the after-queue content filter, as a child process listening on a loopback port."""

    kind = "smtpd"

    def __init__(self, workdir: Path, config_toml: str, port: int, *, command: Sequence[str] | None = None) -> None:
        self.port = port
        super().__init__(workdir, config_toml, command=command)

    def _listening(self) -> bool:
        return self._proc is not None and self.port in _listening_ports(self._proc.pid)

    def _where(self) -> str:
        return f"{LOOPBACK}:{self.port}"


Adapter = Literal["milter", "smtpd"]
ADAPTERS: tuple[Adapter, ...] = ("milter", "smtpd")


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

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.stack.redis.url, decode_responses=True)


@contextlib.contextmanager
def deploy(base: Config, customers: Sequence[str] = (), adapter: Adapter = "milter") -> Iterator[Deployment]:
    """Start a stack whose mailboxes and logins are the config's, plus postroom as ``adapter``: the milter
    (``postroom milter``) or the after-queue filter (``postroom smtpd``); stop everything on exit."""
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, not {adapter!r}")
    addresses = [box.address for box in base.mailboxes.values()]
    addresses += [agent.address for agent in base.agents.values()]
    users = [MailUser(a) for a in dict.fromkeys([*addresses, *customers])]
    logins = [Login(name) for name in base.agents]
    milter, after_queue = ("auto", None) if adapter == "milter" else (None, "after-queue")
    with Stack(users=users, logins=logins, milter=milter, filter=after_queue) as stack:
        workdir = stack.root / "postroom"
        config = config_for_stack(base, stack, workdir)
        daemon: MilterDaemon | SmtpdDaemon
        if adapter == "milter":
            daemon = MilterDaemon(workdir, to_toml(config), stack.milter_socket_path)
        else:
            daemon = SmtpdDaemon(workdir, to_toml(config), stack.filter_port)
        daemon.start()
        try:
            yield Deployment(stack, daemon, config, adapter)
        finally:
            daemon.stop()


def _stop_forgotten_stacks() -> None:
    # A stack used without "with" (e.g. the demo killed by Ctrl-C) must not outlive Python.
    for stack in list(_live_stacks):
        try:
            stack.stop()
        except Exception as exc:  # noqa: BLE001 - best effort at interpreter exit
            print(f"postroom.testbed: {exc}", file=sys.stderr)


atexit.register(_stop_forgotten_stacks)


# ---------------------------------------------------------------------------------------------
# demo


def main(argv: Sequence[str] | None = None) -> int:
    """Run a stack until Ctrl-C and print how to reach it: ``python -m postroom.testbed``."""
    parser = argparse.ArgumentParser(prog="python -m postroom.testbed", description=main.__doc__)
    parser.add_argument(
        "--milter", default=None, help='"auto" for unix:<tempdir>/milter.sock, or a Postfix milter spec'
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir on exit")
    args = parser.parse_args(argv)
    # Killed by a signal, Python would skip the with-block's clean-up and leave the daemons
    # running. Also set SIGINT: a shell starts background jobs with it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    users = [MailUser("support@example.test"), MailUser("alice@customer.test")]
    logins = [Login("meier")]
    with Stack(users=users, logins=logins, milter=args.milter, keep_dir=args.keep) as stack:
        print(
            f"""\
postroom testbed in {stack.root}
  SMTP (MX)      127.0.0.1:{stack.postfix.smtp_port}
  submission     127.0.0.1:{stack.postfix.submission_port}  (AUTH PLAIN {logins[0].name} / {logins[0].password})
  IMAP           127.0.0.1:{stack.dovecot.imap_port}  ({", ".join(u.address for u in users)} / secret)
  Redis          {stack.redis.url}
  milter         {stack.postfix.milter or "(none)"}
  logs           {stack.postfix.log_path} {stack.dovecot.log_path}
  try: swaks --server 127.0.0.1:{stack.postfix.smtp_port} --to support+Meier@example.test
Ctrl-C stops it.""",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
