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

Config: a worker never reads the config files.  The milter process sends it what the milter loaded and checked:
at start the config it started with (Redis, database and mailer addresses, which only a restart changes) and
the one in force, on SIGHUP the newly loaded one, written into the control channel.  The channel is one ordered
stream for loads and connection hand-overs, and each mail names the config generation it started with, so a worker
always has that generation before it runs the mail.  A worker started again after a crash runs what the others
run, even if the files have been broken since.

Failures: a worker that dies, or does not answer within the reply timeout of the mail it is working on, fails that
mail (the adapter applies [milter] on_error: degraded delivery or tempfail, never a loss) and is started again.
The mails queued behind it were not started (a worker says so on a mail's connection when it starts it): they go
to another worker or to the replacement, as do mails that arrive while no worker runs.  A worker
ignores SIGHUP, SIGTERM and SIGINT (systemd and a terminal send them to every process of the service) and stops
when its control channel closes: after the milter process has finished the mails in flight.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postroom import log as plog
from postroom.body import Body
from postroom.bundle import Loaded
from postroom.config import Config
from postroom.mailer import OutgoingMail
from postroom.mime import Message
from postroom.rules import Ruleset
from postroom.runtime import Runtime
from postroom.verdict import Envelope, Verdict

__all__ = [
    "REPLY_SECONDS",
    "Bundle",
    "Handled",
    "LocalPipeline",
    "RemotePipeline",
    "WorkerError",
    "WorkerPool",
    "receive_bundle",
    "serve_worker",
]

log = logging.getLogger("postroom.milter")

_LENGTH = struct.Struct("!I")
# The control channel's messages after the first frame (the Bundle): a connection handed over (its descriptor rides
# on this byte, SCM_RIGHTS) and a new config (this byte, a length and the pickle of (generation, Loaded)).
_HANDOVER = b"c"
_LOAD = b"L"
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
# A worker writes this byte on a mail's connection when it starts that mail: a mail whose worker died before the
# byte came was never started (it waited behind another mail) and goes to the next or a replacement worker.
_STARTED = b"S"
# How long a mail may wait for a worker to start it (behind a slow mail, or while a dead worker is replaced), on
# top of REPLY_SECONDS once started: together well below Postfix's milter_content_timeout (300 s).
QUEUE_SECONDS = 180.0
# How long a mail waits for a worker while none runs (one is being replaced: that takes a second or two), and how
# often a mail not yet started is handed on to another worker before it gets the failure policy.
REPLACE_SECONDS = 15.0
HAND_ONS = 3
# How long a worker waits for the rest of a frame once its first byte arrived.
_FRAME_SECONDS = 30.0


class WorkerError(RuntimeError):
    """No answer from a worker process: the mail gets the failure policy."""


@dataclass(frozen=True)
class Spooled:
    """In a request instead of the body: the body is the file whose descriptor came with the request."""

    size: int


def _with_body_file(request: tuple[Any, ...], fds: list[int]) -> tuple[Any, ...]:
    """The request with a spooled body's descriptor turned into a Body (the worker closes it after the mail)."""
    body = request[4] if request[0] == "process" else None
    if not isinstance(body, Spooled):
        for fd in fds:
            os.close(fd)
        return request
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise WorkerError(f"a spooled body came with {len(fds)} descriptors")
    return (*request[:4], Body.from_file(os.fdopen(fds[0], "rb"), body.size), *request[5:])


class _NotStarted(Exception):
    """The worker ended before it started this mail: another worker may take it."""


def skipped_body() -> bytes:
    raise RuntimeError("the body of this mail was skipped: nothing was to read it (Ruleset.reads_body)")


@dataclass(frozen=True)
class Bundle:
    """What a worker runs with, as the milter process loaded and checked it."""

    started: Loaded  # the config the milter started with: Redis, database and mailer are opened from it
    current: Loaded  # the config, rules, templates, keys and canned replies in force (the last good reload)
    generation: int = 0  # counts reloads; a mail names the generation it started with


@dataclass(frozen=True)
class Handled:
    """What the adapter needs back from the pipeline for one mail."""

    verdict: Verdict
    logged: bool  # the pipeline logged a line for every ticket it recorded; the adapter does not repeat them
    outgoing: list[OutgoingMail] = field(default_factory=list)  # in-process: auto-replies to send once accepted
    pending: int = 0  # in a worker: the id its auto-replies wait under; 0 when there are none
    worker: int = 0  # the pid of the worker that holds them
    store_unavailable: bool = False  # Redis was unreachable (the milter process counts it for /metrics)


@dataclass(frozen=True)
class LocalPipeline:
    """The pipeline in the milter process itself ([milter] workers = 0)."""

    runtime: Runtime

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def rules(self) -> Ruleset:
        return self.runtime.parts.rules

    def handle(self, message: Message, now: float) -> Handled:
        outcome = self.runtime.handle(message, now)
        return Handled(
            outcome.verdict,
            bool(outcome.records),
            outgoing=outcome.outgoing,
            store_unavailable=outcome.store_unavailable,
        )

    def accepted(self, handled: Handled) -> None:
        self.runtime.send(handled.outgoing)


# -- frames ------------------------------------------------------------------------------------------------------


def _send(conn: socket.socket, obj: object, fds: Sequence[int] = ()) -> None:
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    frame = _LENGTH.pack(len(data)) + data
    if fds:
        # The descriptors ride on the frame's length; the receiver takes them with its first read.
        sent = socket.send_fds(conn, [frame[: _LENGTH.size]], list(fds))
        frame = frame[sent:]
    conn.sendall(frame)


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


def _recv_request(conn: socket.socket) -> tuple[Any, list[int]]:
    """One request frame and the descriptors that came with it (a spooled body's file)."""
    head, fds, _flags, _addr = socket.recv_fds(conn, _LENGTH.size, 4)
    if not head:
        for fd in fds:
            os.close(fd)
        raise EOFError("the other end closed the connection")
    try:
        if len(head) < _LENGTH.size:
            head += _recv_exactly(conn, _LENGTH.size - len(head))
        (size,) = _LENGTH.unpack(head)
        return pickle.loads(_recv_exactly(conn, size)), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _recv_reply(conn: socket.socket, data: bytes = b"") -> Any:
    """The one frame that answers a request: usually a single read (a verdict is far below 64 KiB)."""
    data = data or conn.recv(65536)
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
    """One worker's state: the runtimes of the current and the previous config, and the auto-replies waiting."""

    def __init__(self, runtime: Runtime, generation: int) -> None:
        self._runtimes = {generation: runtime}
        self.newest = generation
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[float, list[OutgoingMail]]] = {}

    @property
    def runtime(self) -> Runtime:
        return self._runtimes[self.newest]

    def load(self, generation: int, loaded: Loaded) -> None:
        # The previous runtime stays for a mail that started under it in the milter process (its body was kept
        # or skipped by the old rules); a mail that outlived two reloads runs with the newest.
        runtime = self.runtime.reloaded(loaded)
        self._runtimes = {self.newest: self.runtime, generation: runtime}
        self.newest = generation
        log.info("worker: reloaded; the next mail uses the new config and rules")

    def process(
        self, generation: int, envelope: Envelope, headers: list[tuple[str, str]], body: bytes | Body | None, now: float
    ) -> Handled:
        token = plog.queue_id.set(envelope.queue_id)
        spool = Body.of(body) if isinstance(body, bytes) else body
        try:
            message = Message(envelope, headers, body=skipped_body if spool is None else spool)
            runtime = self._runtimes.get(generation, self.runtime)
            handled = LocalPipeline(runtime).handle(message, now)
        finally:
            plog.queue_id.reset(token)
            if spool is not None:
                spool.close()
        if not handled.outgoing:
            return handled
        # The auto-replies stay here; the milter process only learns under which id.
        self._expire(time.monotonic())
        pending = next(self._ids)
        self._pending[pending] = (time.monotonic(), handled.outgoing)
        return Handled(handled.verdict, handled.logged, pending=pending, store_unavailable=handled.store_unavailable)

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


def ignore_stop_signals() -> None:
    """The milter process decides when a worker stops (it closes the channel once its mails in flight are done)
    and when it reloads (it sends the new config): signals sent to the whole service change nothing here."""
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def receive_bundle(channel: socket.socket) -> Bundle:
    """The first frame on a worker's channel: what to run with.  Raises EOFError if the milter process is gone."""
    bundle = _recv(channel)
    if not isinstance(bundle, Bundle):
        raise TypeError(f"expected the config bundle from the milter process, got {type(bundle).__name__}")
    return bundle


def serve_worker(runtime: Runtime, channel: socket.socket, generation: int = 0) -> None:
    """Answer the milter process's requests on one thread until ``channel`` closes.  Blocks."""
    worker = _Worker(runtime, generation)
    selector = selectors.DefaultSelector()
    control = _Control(channel, worker, selector)
    _set_timeouts(channel, _FRAME_SECONDS)
    channel.sendall(_READY)
    selector.register(channel, selectors.EVENT_READ, None)
    while True:
        for key, _ in selector.select():
            conn: socket.socket | None = key.data
            if conn is None:
                if not control.read():
                    log.info("worker: the milter process closed the channel; stopping")
                    selector.close()
                    return
                continue
            try:
                request, fds = _recv_request(conn)
            except (EOFError, OSError, pickle.UnpicklingError) as exc:
                if not isinstance(exc, EOFError):
                    log.warning("worker: dropping a connection: %s", exc)
                selector.unregister(conn)
                conn.close()
                continue
            if request[0] == "process":
                control.catch_up(request[1])
                # A milter thread that gave up on the mail is found out by the answer below.
                with contextlib.suppress(OSError):
                    conn.sendall(_STARTED)
            try:
                request = _with_body_file(request, fds)
            except WorkerError as exc:
                reply: object | None = exc
            else:
                reply = worker.answer(request)
            if reply is not None:
                try:
                    _send(conn, reply)
                except OSError as exc:
                    # The milter thread gave up on this mail (its timeout) or its process is gone.
                    log.warning("worker: could not answer: %s", exc)
                    selector.unregister(conn)
                    conn.close()


class _Control:
    """The worker's end of its control channel: connections handed over and new configs, in the order written."""

    def __init__(self, channel: socket.socket, worker: _Worker, selector: selectors.BaseSelector) -> None:
        self._channel = channel
        self._worker = worker
        self._selector = selector
        self._buffer = b""
        self._fds: collections.deque[int] = collections.deque()

    def read(self) -> bool:
        """Read what arrived and act on each complete message; False once the milter process closed the channel."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self._channel, 65536, 64)
        except InterruptedError:
            return True
        if not data and not fds:
            return False
        self._buffer += data
        self._fds.extend(fds)
        self._dispatch()
        return True

    def catch_up(self, generation: int) -> None:
        """Before a mail of a config generation this worker does not have yet: the milter process wrote that load
        into this channel before it sent any such mail, so it is here to be read (a pooled connection's request
        and the channel can turn ready in the same select, in either order)."""
        while self._worker.newest < generation:
            try:
                if not self.read():
                    return  # the milter process is stopping; the main loop sees the end of the channel
            except BlockingIOError:
                log.error("worker: config generation %d never arrived; using %d", generation, self._worker.newest)
                return

    def _dispatch(self) -> None:
        while self._buffer:
            kind = self._buffer[:1]
            if kind == _HANDOVER:
                # A descriptor arrives with its byte, so it is in _fds by the time its byte is read.
                self._buffer = self._buffer[1:]
                conn = socket.socket(fileno=self._fds.popleft())
                _set_timeouts(conn, _FRAME_SECONDS)
                self._selector.register(conn, selectors.EVENT_READ, conn)
            elif kind == _LOAD:
                head = 1 + _LENGTH.size
                if len(self._buffer) < head:
                    return
                (size,) = _LENGTH.unpack_from(self._buffer, 1)
                if len(self._buffer) < head + size:
                    return  # the rest of the frame comes with the next read
                generation, loaded = pickle.loads(self._buffer[head : head + size])
                self._buffer = self._buffer[head + size :]
                self._worker.load(generation, loaded)
            else:
                raise WorkerError(f"unknown control message {kind!r} from the milter process")


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
        self.lock = threading.Lock()  # one message at a time on the channel; guards the flag below
        self.alive = True
        self.configured = False  # its Bundle is written: loads may follow it on the channel
        # When it last started or answered a mail; a worker still starting (imports, database) is not stuck.
        self.progress = time.monotonic() + START_SECONDS

    def __str__(self) -> str:
        return f"worker {self.index} (pid {self.proc.pid})"

    def configure(self, bundle: Bundle) -> None:
        """Write the bundle, the first frame on the channel.  The caller holds ``lock`` (WorkerPool._launch)."""
        # The timeout stays: it also bounds handing a connection over to a worker that stopped reading.
        self.channel.settimeout(START_SECONDS)
        _send(self.channel, bundle)
        self.configured = True

    def wait_ready(self) -> None:
        try:
            ready = self.channel.recv(1) == _READY
        except OSError:  # also: the pool closed the channel meanwhile (the milter is stopping)
            ready = False
        self.progress = time.monotonic()
        if not ready:
            log.error("%s did not start", self)

    def load(self, bundle: Bundle) -> None:
        """Write a new config into the channel, ahead of every connection handed over after it."""
        frame = pickle.dumps((bundle.generation, bundle.current), pickle.HIGHEST_PROTOCOL)
        with self.lock:
            # Not configured: it could not take its bundle and is dying (see WorkerPool._launch).
            if self.configured and self.alive:
                self.channel.sendall(_LOAD + _LENGTH.pack(len(frame)) + frame)

    def connect(self, timeout: float) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _set_timeouts(ours, timeout)
            with self.lock:
                if not self.configured:
                    raise OSError("it did not take its config")  # its channel must start with the bundle
                socket.send_fds(self.channel, [_HANDOVER], [theirs.fileno()])
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours


class WorkerPool:
    """The worker processes of one milter, their supervision and the pooled connections to them."""

    def __init__(
        self,
        command: Sequence[str],
        count: int,
        reply_timeout: float,
        loaded: Loaded,
        *,
        replace_wait: float = REPLACE_SECONDS,
    ) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self._command = list(command)
        self._timeout = reply_timeout
        self._replace_wait = replace_wait
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a worker was started
        self._bundle = Bundle(loaded, loaded)
        self._idle: list[tuple[_Process, socket.socket]] = []
        self._turn = itertools.count()
        self._stopping = threading.Event()
        self._processes: list[_Process] = []
        for index in range(count):
            self._launch(index)
        for process in list(self._processes):
            process.wait_ready()
        self._watchers = [self._watch(p) for p in self._processes]

    @property
    def pids(self) -> list[int]:
        return [p.proc.pid for p in self._processes]

    def _launch(self, index: int) -> _Process:
        """Start a worker in slot ``index``; raises OSError if it cannot be started.

        It becomes the pool's and gets the newest bundle in one step under its lock: a reload either comes before
        (and the bundle is the new one) or finds it and writes the load after the bundle; a mail's connection is
        handed over only after the bundle.
        """
        process = _Process(self._command, index)
        with process.lock:
            with self._lock:
                if index == len(self._processes):
                    self._processes.append(process)
                else:
                    self._processes[index] = process
                bundle = self._bundle
                self._changed.notify_all()
            try:
                process.configure(bundle)
            except OSError as exc:  # it died at once: its supervisor starts the next one
                log.error("%s did not take its config: %s", process, exc)
        return process

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
            log.error("%s exited with status %d; starting a new one", process, status)
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
                new = self._launch(index)
            except OSError:
                delay = min(delay * 2, 30.0)
                log.exception("could not start worker %d; trying again in %g s", index, delay)
                continue
            new.wait_ready()
            return new
        return None

    def call(self, request: tuple[Any, ...], *, reply: bool = True, pid: int = 0, fds: Sequence[int] = ()) -> Any:
        """Send a request (to worker ``pid``, or any) and return the answer; raises WorkerError when none comes."""
        return self.call_worker(request, reply=reply, pid=pid, fds=fds)[1]

    def call_worker(
        self, request: tuple[Any, ...], *, reply: bool = True, pid: int = 0, fds: Sequence[int] = ()
    ) -> tuple[int, Any]:
        """:meth:`call`, also naming the pid of the worker that answered.  ``fds`` go with the request (a spooled
        body's file), again with each hand-on."""
        deadline = time.monotonic() + QUEUE_SECONDS
        for hand_on in itertools.count():
            process, conn = self._checkout(deadline, pid)
            try:
                if conn is None:
                    raise _NotStarted("it could not take a connection")
                try:
                    _send(conn, request, fds)
                    answer = self._answer(process, conn, deadline) if reply else None
                except BaseException:
                    conn.close()
                    raise
                with self._lock:
                    self._idle.append((process, conn))
                if isinstance(answer, WorkerError):
                    raise answer
                return process.proc.pid, answer
            except _NotStarted as exc:
                if pid or hand_on >= HAND_ONS or time.monotonic() > deadline:
                    raise WorkerError(f"{process}: {exc}") from None
                # It died, or was killed for another mail, before it started this one: the next worker takes it.
                log.warning("%s ended before it started a mail (%s); handing the mail on", process, exc)
                time.sleep(0.05)  # the supervisor marks it dead and starts a new one
            except BlockingIOError as exc:
                log.error("%s gave no answer in %g s; killing it", process, self._timeout)
                process.alive = False
                process.proc.kill()
                raise WorkerError(f"{process}: no answer in {self._timeout:g} s") from exc
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                raise WorkerError(f"{process}: {exc}") from exc
        raise AssertionError("unreachable: the loop returns or raises")

    def _answer(self, process: _Process, conn: socket.socket, deadline: float) -> Any:
        """The worker's answer to the mail just sent; _NotStarted when the worker ended before it started it.

        Before the start byte, a read timeout only means the worker is busy with an earlier mail, whose own thread
        kills it if it hangs: this mail waits on (up to ``deadline``).  After it, the reply timeout is this mail's.
        """
        while True:
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                if not process.alive or time.monotonic() > deadline:
                    raise _NotStarted("no worker started it in time") from None
                if time.monotonic() - process.progress > self._timeout:
                    # Neither started nor answered a mail for a whole reply timeout, with this one waiting: stuck
                    # outside any mail (a mail it is stuck in is killed by its own thread at the same time).
                    log.error("%s made no progress in %g s with mail waiting; killing it", process, self._timeout)
                    process.alive = False
                    process.proc.kill()
                    raise _NotStarted("killed: it made no progress") from None
                continue
            except OSError as exc:
                raise _NotStarted(str(exc)) from None
            if not data:
                raise _NotStarted("the worker closed the connection")
            process.progress = time.monotonic()
            if data[:1] != _STARTED:
                return _recv_reply(conn, data)  # an answer to a request that is no mail
            answer = _recv_reply(conn, data[1:])
            process.progress = time.monotonic()
            return answer

    def _checkout(self, deadline: float, pid: int = 0) -> tuple[_Process, socket.socket | None]:
        """A connection to a live worker (to ``pid`` if given); while none runs, wait a little for its replacement."""
        deadline = min(deadline, time.monotonic() + self._replace_wait)
        with self._lock:
            while True:
                for i in range(len(self._idle) - 1, -1, -1):
                    process, conn = self._idle[i]
                    if not process.alive:
                        del self._idle[i]
                        conn.close()
                    elif not pid or process.proc.pid == pid:
                        del self._idle[i]
                        return process, conn
                live = [p for p in self._processes if p.alive and (not pid or p.proc.pid == pid)]
                if live or pid:
                    break
                if self._stopping.is_set() or not self._changed.wait(max(0.0, deadline - time.monotonic())):
                    raise WorkerError("no worker process is running")
        if not live:
            raise WorkerError(f"worker pid {pid} is gone")
        process = live[next(self._turn) % len(live)]
        try:
            return process, process.connect(self._timeout)
        except OSError as exc:
            # It is dying (the supervisor has not seen it yet): nothing was handed over, the caller may go on.
            log.warning("%s could not take a connection: %s", process, exc)
            process.alive = False
            return process, None

    def reload(self, loaded: Loaded) -> int:
        """Send every worker the new config; returns its generation, which the mails that use it name.

        It does not wait for the workers: each reads the config before any mail that names it (see _Control).
        """
        with self._lock:
            bundle = self._bundle = Bundle(self._bundle.started, loaded, self._bundle.generation + 1)
            processes = list(self._processes)
        for process in processes:
            try:
                process.load(bundle)
            except OSError as exc:
                # It is dying: the supervisor starts a new one, with this config.
                log.error("%s could not take the new config: %s", process, exc)
        return bundle.generation

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
                log.error("%s did not stop in time; killing it", process)
                process.proc.kill()
                process.proc.wait()


@dataclass(frozen=True)
class RemotePipeline:
    """The pipeline in worker processes ([milter] workers >= 1): what the adapter calls instead of a Runtime."""

    config: Config
    rules: Ruleset
    pool: WorkerPool
    generation: int = 0  # the pool's config generation these config and rules are

    def handle(self, message: Message, now: float) -> Handled:
        body: bytes | Spooled | None = None
        fds: list[int] = []
        if isinstance(message.body, Body) and message.body.spooled:
            # A large body stays in its file: the worker gets the descriptor, not a pickled copy.
            body = Spooled(message.body.size)
            fds = [message.body.fileno()]
        elif message.body is not skipped_body:
            body = message.body()
        request = ("process", self.generation, message.envelope, message.headers, body, now)
        pid, answer = self.pool.call_worker(request, fds=fds)
        handled: Handled = answer
        return dataclasses.replace(handled, worker=pid) if handled.pending else handled

    def accepted(self, handled: Handled) -> None:
        if handled.pending:
            # The auto-replies wait in the worker that made them, under an id only it knows.
            self.pool.call(("accepted", handled.pending), reply=False, pid=handled.worker)


def worker_command(config_path: Path) -> list[str]:
    """How the milter process starts a worker: this interpreter, this postroom.  The config file is named for the
    worker's log lines and `ps`; the worker reads nothing from it (the milter process sends what it loaded)."""
    return [sys.executable, "-m", "postroom", "milter-worker", "--config", os.fspath(config_path)]
