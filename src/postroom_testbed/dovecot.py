"""Dovecot (IMAP and LMTP) with its own users and logins, and the IMAP helpers the tests read mail with."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from postroom_testbed.processes import (
    _STOP_TIMEOUT,
    LOOPBACK,
    _binary,
    _end_group,
    _group_members,
    _mkdir,
    _start_with_port_retry,
    _wait_listening,
    free_port,
)

# Dovecot delivers and serves mail as this uid/gid; it needs no passwd entry.
VMAIL_UID = 5000
VMAIL_GID = 5000


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


# ---------------------------------------------------------------------------------------------
# Dovecot


class Dovecot:
    """Dovecot with LMTP in, IMAP out and an inet ``service auth`` listener for Postfix SASL.

    Users are full addresses; LMTP to ``user+Detail@domain`` saves into folder "Detail" of
    ``user@domain`` (created on demand). Logins are further passdb entries in the same
    passwd-file, so Postfix can check staff credentials without them having a mailbox.
    """

    def __init__(
        self,
        workdir: Path,
        users: Sequence[MailUser],
        logins: Sequence[Login] = (),
        extra_config: Callable[[Dovecot], str] | None = None,
    ) -> None:
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
        # Appended to the config on every start, made from this instance (its ports and mail dir are known then):
        # e.g. what `postroom dovecot-snippet` prints.
        self.extra_config = extra_config
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
# Written by postroom_testbed for one private test instance; nothing is included from /etc/dovecot.
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
        extra = self.extra_config(self) if self.extra_config is not None else ""
        self.config_path.write_text(self.config_text() + extra)
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
