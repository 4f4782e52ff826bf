"""A private redis-server on a free port."""

from __future__ import annotations

import subprocess
from pathlib import Path

from postroom_testbed.processes import (
    _STOP_TIMEOUT,
    LOOPBACK,
    _binary,
    _mkdir,
    _start_with_port_retry,
    _wait_listening,
    free_port,
)

# ---------------------------------------------------------------------------------------------
# Redis


class RedisServer:
    """A private redis-server on a free port, data dir inside ``workdir``.

    No persistence unless ``appendonly`` is set (then AOF with ``appendfsync everysec``, as docs/deploy-milter.md
    asks of production), so a restart after :meth:`kill` comes back empty or with its AOF.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dir = workdir / "redis"
        self.log_path = workdir / "redis.log"
        self.pidfile = self.dir / "redis.pid"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self.appendonly = False

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
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
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

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer: nothing is saved on the way out."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(_STOP_TIMEOUT)

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
