"""The real postroom daemons (``postroom milter``, ``postroom smtpd``) started against a stack."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from postroom_testbed.processes import _POLL, _STOP_TIMEOUT, LOOPBACK, _end_group, _error, _listening_ports, _mkdir


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
