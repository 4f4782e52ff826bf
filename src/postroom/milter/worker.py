"""The pipeline in worker processes: the milter process only collects each mail and applies the verdict.

Why: libmilter runs one thread per Postfix connection and pymilter takes Python's global lock for every callback.
With the pipeline (rules, Redis, history) in those threads, the other connections' callbacks wait for the lock
while one mail's pipeline runs, and every wait is a futex sleep and wake-up: with 10 sessions that lock traffic
cost the milter about as much system time as the pipeline's own work (bench/milter_direct.py; `perf` showed
take_gil under every milter callback).  Here each mail's facts go over a private socket to a worker process that
runs the pipeline on one thread, and the milter process holds the lock only for the short callbacks.

Channels: each worker inherits one end of a socketpair (its control channel; no path in the file system, so no
other process can reach it).  A milter thread that needs a connection makes a new socketpair and hands one end
to a worker over that channel (SCM_RIGHTS); connections are pooled and carry one mail at a time.  Frames are a
4-byte length and a pickle: both ends are this program.

Failures: a worker that dies, or does not answer within the reply timeout, fails the mails in flight on it (the
adapter applies [milter] on_error: degraded delivery or tempfail, never a loss) and is started again.  A worker
ignores SIGTERM and SIGINT (systemd and a terminal send them to every process of the service) and stops when its
control channel closes: after the milter process has finished the mails in flight.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postroom import log as plog
from postroom.config import Config
from postroom.mailer import OutgoingMail
from postroom.mime import Message
from postroom.rules import Ruleset
from postroom.runtime import Runtime
from postroom.verdict import Envelope, Verdict

__all__ = ["REPLY_SECONDS", "Handled", "LocalPipeline", "RemotePipeline", "WorkerError", "WorkerPool", "serve_worker"]

log = logging.getLogger("postroom.milter")

_LENGTH = struct.Struct("!I")
# Auto-replies of a mail wait in the worker until the milter process says Postfix took the mail; a mail that was
# rejected or whose connection broke never says so, and its replies are dropped after this long.
PENDING_SECONDS = 3600.0
# How long a milter thread waits for a worker's verdict.  The pipeline's slowest legitimate path is a few Redis
# calls at [redis] timeout_seconds each; a worker silent this long is stuck and is killed (then started again), and
# the mail gets the failure policy well before Postfix's milter_content_timeout (300 s) would apply its own.
REPLY_SECONDS = 60.0
# How long a new worker may take to start (imports, database, Redis) before the milter stops waiting for it.
START_SECONDS = 60.0
_READY = b"R"
# How long a worker waits for the rest of a frame once its first byte arrived.
_FRAME_SECONDS = 30.0


class WorkerError(RuntimeError):
    """No answer from a worker process: the mail gets the failure policy."""


def skipped_body() -> bytes:
    raise RuntimeError("the body of this mail was skipped: nothing was to read it (Ruleset.reads_body)")


@dataclass(frozen=True)
class Handled:
    """What the adapter needs back from the pipeline for one mail."""

    verdict: Verdict
    logged: bool  # the pipeline logged a line for every ticket it recorded; the adapter does not repeat them
    outgoing: list[OutgoingMail] = field(default_factory=list)  # in-process: auto-replies to send once accepted
    pending: int = 0  # in a worker: the id its auto-replies wait under; 0 when there are none


@dataclass(frozen=True)
class LocalPipeline:
    """The pipeline in the milter process itself ([milter] workers = 0)."""

    runtime: Runtime

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def rules(self) -> Ruleset:
        return self.runtime.rules

    def handle(self, message: Message, now: float) -> Handled:
        outcome = self.runtime.process(message, now)
        self.runtime.record(outcome)
        return Handled(outcome.verdict, bool(outcome.records), outgoing=outcome.outgoing)

    def accepted(self, handled: Handled) -> None:
        self.runtime.send(handled.outgoing)


# -- frames ------------------------------------------------------------------------------------------------------


def _send(conn: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    conn.sendall(_LENGTH.pack(len(data)) + data)


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    # MSG_WAITALL: one system call for the whole frame unless a signal or the timeout cuts it short.
    data = conn.recv(size, socket.MSG_WAITALL)
    while len(data) < size:
        more = conn.recv(size - len(data), socket.MSG_WAITALL)
        if not more:
            raise EOFError("the other end closed the connection")
        data += more
    return data


def _recv(conn: socket.socket) -> Any:
    """One frame from a connection on which nothing else can be waiting (the worker's side)."""
    head = conn.recv(_LENGTH.size, socket.MSG_WAITALL)
    if not head:
        raise EOFError("the other end closed the connection")
    if len(head) < _LENGTH.size:
        head += _recv_exactly(conn, _LENGTH.size - len(head))
    (size,) = _LENGTH.unpack(head)
    return pickle.loads(_recv_exactly(conn, size))


def _recv_reply(conn: socket.socket) -> Any:
    """The one frame that answers a request: usually a single read (a verdict is far below 64 KiB)."""
    data = conn.recv(65536)
    if len(data) < _LENGTH.size:
        if not data:
            raise EOFError("the worker closed the connection")
        data += _recv_exactly(conn, _LENGTH.size - len(data))
    (size,) = _LENGTH.unpack_from(data)
    body = data[_LENGTH.size :]
    if len(body) < size:
        body += _recv_exactly(conn, size - len(body))
    return pickle.loads(body)


def _set_timeouts(conn: socket.socket, seconds: float) -> None:
    """Time limits on a blocking socket: Python's own socket timeout polls before every read and write, which
    in the milter process is one more release of the global lock per call."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


# -- the worker process --------------------------------------------------------------------------------------------


class _Worker:
    """One worker's state: the runtime (swapped on SIGHUP) and the auto-replies waiting for their mail."""

    def __init__(self, runtime: Runtime, reload: Callable[[Runtime], Runtime | None] | None) -> None:
        self.runtime = runtime
        self._reload = reload
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[float, list[OutgoingMail]]] = {}

    def on_hup(self, signum: int, frame: object) -> None:
        # Python runs this in the main thread, possibly in the middle of a mail: that mail keeps the runtime it
        # took (process() reads self.runtime once), the next one gets the new runtime.
        if self._reload is not None:
            new = self._reload(self.runtime)
            if new is not None:
                self.runtime = new
                log.info("worker: reloaded; the next mail uses the new config and rules")

    def process(self, envelope: Envelope, headers: list[tuple[str, str]], body: bytes | None, now: float) -> Handled:
        token = plog.queue_id.set(envelope.queue_id)
        try:
            message = Message(envelope, headers, body=skipped_body if body is None else (lambda: body))
            handled = LocalPipeline(self.runtime).handle(message, now)
        finally:
            plog.queue_id.reset(token)
        if not handled.outgoing:
            return handled
        # The auto-replies stay here; the milter process only learns under which id.
        self._expire(time.monotonic())
        pending = next(self._ids)
        self._pending[pending] = (time.monotonic(), handled.outgoing)
        return Handled(handled.verdict, handled.logged, pending=pending)

    def accepted(self, pending: int) -> None:
        entry = self._pending.pop(pending, None)
        if entry is not None:
            self.runtime.send(entry[1])

    def _expire(self, now: float) -> None:
        # Dicts keep insertion order: the oldest entries come first.
        for key, (since, _) in list(self._pending.items()):
            if now - since < PENDING_SECONDS:
                break
            del self._pending[key]

    def answer(self, request: tuple[Any, ...]) -> object | None:
        """The reply to one request, or None for a request that has none."""
        kind = request[0]
        if kind == "process":
            try:
                return self.process(*request[1:])
            except Exception as exc:
                # The pipeline itself never raises (pipeline.process applies the failure policy); this is our own
                # bug around it.  Answer at once so the mail gets the policy now instead of after a timeout.
                log.exception("worker: could not handle the mail")
                return WorkerError(f"{type(exc).__name__}: {exc}")
        if kind == "accepted":
            self.accepted(request[1])
            return None
        log.error("worker: unknown request %r", kind)
        return None


def serve_worker(
    runtime: Runtime, channel: socket.socket, reload: Callable[[Runtime], Runtime | None] | None = None
) -> None:
    """Answer the milter process's requests on one thread until ``channel`` closes.  Blocks."""
    worker = _Worker(runtime, reload)
    signal.signal(signal.SIGHUP, worker.on_hup)
    # The milter process decides when mail stops: it closes the channel once its mails in flight are done.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Ready: from now on SIGHUP reloads (until now it would have killed this process).
    channel.sendall(_READY)
    selector = selectors.DefaultSelector()
    selector.register(channel, selectors.EVENT_READ, None)
    while True:
        for key, _ in selector.select():
            conn: socket.socket | None = key.data
            if conn is None:
                if not _accept_connections(channel, selector):
                    log.info("worker: the milter process closed the channel; stopping")
                    selector.close()
                    return
                continue
            try:
                request = _recv(conn)
            except (EOFError, OSError, pickle.UnpicklingError) as exc:
                if not isinstance(exc, EOFError):
                    log.warning("worker: dropping a connection: %s", exc)
                selector.unregister(conn)
                conn.close()
                continue
            reply = worker.answer(request)
            if reply is not None:
                try:
                    _send(conn, reply)
                except OSError as exc:
                    # The milter thread gave up on this mail (its timeout) or its process is gone.
                    log.warning("worker: could not answer: %s", exc)
                    selector.unregister(conn)
                    conn.close()


def _accept_connections(channel: socket.socket, selector: selectors.BaseSelector) -> bool:
    """Take the connections the milter process passed; False once the channel is closed."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(channel, 64, 64)
    except InterruptedError:
        return True
    if not data and not fds:
        return False
    for fd in fds:
        conn = socket.socket(fileno=fd)
        _set_timeouts(conn, _FRAME_SECONDS)
        selector.register(conn, selectors.EVENT_READ, conn)
    return True


# -- the milter process's side ---------------------------------------------------------------------------------


class _Process:
    """One worker process as the milter process sees it; replaced as a whole when the worker dies."""

    def __init__(self, command: Sequence[str], index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen([*command, "--channel-fd", str(theirs.fileno())], pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.index = index
        self.channel = ours
        self.lock = threading.Lock()  # one hand-over at a time on the channel; guards the two flags below
        self.alive = True
        self.ready = False
        self.reload_pending = False

    def wait_ready(self) -> None:
        """Wait for the worker's ready byte: it handles SIGHUP only from then on (before, SIGHUP kills it)."""
        try:
            # The timeout stays: it also bounds handing a connection over to a worker that stopped reading.
            self.channel.settimeout(START_SECONDS)
            ready = self.channel.recv(1) == _READY
        except OSError:  # also: the pool closed the channel meanwhile (the milter is stopping)
            ready = False
        if not ready:
            log.error("worker %d (pid %d) did not start", self.index, self.proc.pid)
            return
        with self.lock:
            self.ready = True
            pending, self.reload_pending = self.reload_pending, False
        if pending:
            self.proc.send_signal(signal.SIGHUP)

    def reload(self) -> None:
        with self.lock:
            if not self.ready:
                # It is still reading the files; make sure it reads them again once it can.
                self.reload_pending = True
                return
        if self.alive:
            self.proc.send_signal(signal.SIGHUP)

    def connect(self, timeout: float) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _set_timeouts(ours, timeout)
            with self.lock:
                socket.send_fds(self.channel, [b"c"], [theirs.fileno()])
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours


class WorkerPool:
    """The worker processes of one milter, their supervision and the pooled connections to them."""

    def __init__(self, command: Sequence[str], count: int, reply_timeout: float) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self._command = list(command)
        self._timeout = reply_timeout
        self._lock = threading.Lock()
        self._idle: list[tuple[_Process, socket.socket]] = []
        self._turn = itertools.count()
        self._stopping = threading.Event()
        self._processes = [_Process(self._command, i) for i in range(count)]
        for process in self._processes:
            process.wait_ready()
        self._watchers = [self._watch(p) for p in self._processes]

    @property
    def pids(self) -> list[int]:
        return [p.proc.pid for p in self._processes]

    def _watch(self, process: _Process) -> threading.Thread:
        thread = threading.Thread(target=self._supervise, args=(process,), name=f"worker-{process.index}", daemon=True)
        thread.start()
        return thread

    def _supervise(self, process: _Process) -> None:
        delay = 0.5
        while True:
            started = time.monotonic()
            status = process.proc.wait()
            process.alive = False
            process.channel.close()
            if self._stopping.is_set():
                return
            log.error(
                "worker %d (pid %d) exited with status %d; starting a new one", process.index, process.proc.pid, status
            )
            # A worker that dies at once (a database it cannot reach, say) is not restarted in a tight loop.
            delay = 0.5 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            new = self._replace(process.index, delay)
            if new is None:
                return
            process = new

    def _replace(self, index: int, delay: float) -> _Process | None:
        """A new worker in the place of a dead one, after ``delay``; None once the pool is stopping."""
        while not self._stopping.wait(delay):
            try:
                new = _Process(self._command, index)
            except OSError:
                delay = min(delay * 2, 30.0)
                log.exception("could not start worker %d; trying again in %g s", index, delay)
                continue
            with self._lock:
                self._processes[index] = new
            new.wait_ready()
            return new
        return None

    def call(self, request: tuple[Any, ...], *, reply: bool = True) -> Any:
        process, conn = self._checkout()
        try:
            _send(conn, request)
            answer = _recv_reply(conn) if reply else None
        except BlockingIOError as exc:
            conn.close()
            log.error(
                "worker %d (pid %d) gave no answer in %g s; killing it", process.index, process.proc.pid, self._timeout
            )
            process.proc.kill()
            raise WorkerError(
                f"worker {process.index} (pid {process.proc.pid}): no answer in {self._timeout:g} s"
            ) from exc
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            conn.close()
            raise WorkerError(f"worker {process.index} (pid {process.proc.pid}): {exc}") from exc
        with self._lock:
            self._idle.append((process, conn))
        if isinstance(answer, WorkerError):
            raise answer
        return answer

    def _checkout(self) -> tuple[_Process, socket.socket]:
        with self._lock:
            while self._idle:
                process, conn = self._idle.pop()
                if process.alive:
                    return process, conn
                conn.close()
            live = [p for p in self._processes if p.alive]
        if not live:
            raise WorkerError("no worker process is running")
        process = live[next(self._turn) % len(live)]
        try:
            return process, process.connect(self._timeout)
        except OSError as exc:
            raise WorkerError(f"worker {process.index} (pid {process.proc.pid}): {exc}") from exc

    def reload(self) -> None:
        """Pass SIGHUP on: each worker loads config, rules and templates again between two mails."""
        for process in list(self._processes):
            process.reload()

    def close(self, timeout: float = 15.0) -> None:
        """Stop the workers: closing their channels lets each finish, flush its history and exit."""
        self._stopping.set()
        with self._lock:
            for _, conn in self._idle:
                conn.close()
            self._idle.clear()
            processes = list(self._processes)
        for process in processes:
            process.channel.close()
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d (pid %d) did not stop in time; killing it", process.index, process.proc.pid)
                process.proc.kill()
                process.proc.wait()


@dataclass(frozen=True)
class RemotePipeline:
    """The pipeline in worker processes ([milter] workers >= 1): what the adapter calls instead of a Runtime."""

    config: Config
    rules: Ruleset
    pool: WorkerPool

    def handle(self, message: Message, now: float) -> Handled:
        body = None if message.body is skipped_body else message.body()
        handled: Handled = self.pool.call(("process", message.envelope, message.headers, body, now))
        return handled

    def accepted(self, handled: Handled) -> None:
        if handled.pending:
            self.pool.call(("accepted", handled.pending), reply=False)


def worker_command(config_path: Path) -> list[str]:
    """How the milter process starts a worker: this interpreter, this postroom, the same config file."""
    return [sys.executable, "-m", "postroom", "milter-worker", "--config", os.fspath(config_path)]
