"""A private PostgreSQL cluster (initdb + pg_ctl in a temp dir, on a free port) that a test can stop or freeze.

The machine's own server is shared by every test run; an outage test needs one it may break.  Run as root, the
cluster runs as the ``postgres`` user (PostgreSQL refuses root), in a folder that user owns.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from postroom_testbed.processes import LOOPBACK, free_port


def _bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not versions:
        raise RuntimeError("PostgreSQL's pg_ctl was not found: apt-get install postgresql")
    return versions[-1].parent


class PostgresServer:
    """initdb'd once; :meth:`start`, :meth:`stop` (fast or immediate), :meth:`freeze` and :meth:`thaw`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="postroom-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = free_port()
        self._bin = _bindir()
        self._user = "postgres" if os.geteuid() == 0 else ""
        if self._user:
            pw = pwd.getpwnam(self._user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self._bin / tool), *args]
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses={LOOPBACK} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log_path), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clean shutdown; ``immediate``: as after a crash (recovery at the next start)."""
        with contextlib.suppress(RuntimeError):
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def _pids(self) -> list[int]:
        try:
            master = int((self.data / "postmaster.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return []
        children = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True, check=False)
        return [master, *(int(p) for p in children.stdout.split())]

    def freeze(self) -> None:
        """SIGSTOP the server and its backends: connections hang, as with a server that stopped answering."""
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        self.thaw()
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        deadline = time.monotonic() + 10
        while not (server.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield server
    finally:
        server.close()
