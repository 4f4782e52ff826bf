"""Processes, ports and logs: what every server of the testbed is started, waited for and stopped with."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"

# sockaddr_un.sun_path is 108 bytes including the NUL. The longest socket paths below the
# temp dir are Dovecot's (dovecot/run/ + e.g. "replication-notify-fifo", about 40 characters).
_MAX_ROOT_LENGTH = 60
_LOG_TAIL_LINES = 40
_STOP_TIMEOUT = 10.0
_START_TIMEOUT = 15.0
_POLL = 0.05


class StackError(RuntimeError):
    """A service of the stack failed; the message carries the tail of the log that says why."""


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
