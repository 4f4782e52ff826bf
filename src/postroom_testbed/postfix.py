"""A private Postfix: MX and SASL submission listeners, the milter or after-queue filter in front of LMTP."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from postroom.admin import snippets
from postroom_testbed.processes import (
    _LOG_TAIL_LINES,
    _POLL,
    _START_TIMEOUT,
    LOOPBACK,
    _binary,
    _end_group,
    _error,
    _group_members,
    _mkdir,
    _run_on_terminal,
    _start_with_port_retry,
    free_port,
    log_tail,
    pid_alive,
)

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
        lines = ["# Written by postroom_testbed for one private test instance."]
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
            "# Written by postroom_testbed for one private test instance.\n"
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
