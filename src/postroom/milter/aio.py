"""The milter protocol on one asyncio thread: the engine for ``[milter] engine = "asyncio"``.

libmilter (the default engine, through pymilter) runs one thread per connection from Postfix, and every callback
takes Python's global lock.  Under load postroom's end of message gives that lock up about a dozen times (the Redis
call, the log line, the history spool, each header edit), each time another connection's thread takes it, and the
mail waits to get it back: about half of postroom's CPU over an empty milter, and most of its latency
(docs/performance.md).  This engine speaks Sendmail's milter protocol (version 6, as libmilter's ``mfdef.h`` and
Postfix's ``milter8.c`` define it) for every connection on one event loop thread, and runs the same
``PostroomMilter`` callbacks pymilter runs: connect, MAIL, RCPT, headers and body on the loop (they only collect
facts), and each end of message on the loop too while ends of message are quick, on a pool of threads while
they are not (``Ends``).  No connection's thread takes the lock from another's.  What that buys depends on the
host (docs/performance.md): about a quarter less milter CPU per mail where the milter gets the CPU it asks for;
where Postfix and Dovecot keep every CPU busy, libmilter, whose protocol work runs in C beside the pipeline on
another CPU, passes more mail, which is why it stays the default.

The objects are pymilter's own ``Milter.Base`` subclasses: this module gives them the context pymilter's C module
would (macros, the edits, the SMTP reply), negotiates with ``protocol_mask()`` as pymilter does, decodes
envelope and header bytes the way ``Milter.Base`` does (UTF-8 with surrogate escapes), and answers each return
code as libmilter does, so both engines make Postfix see the same conversation (tests/test_milter_aio.py on the
wire; tests/test_miltertest*.py and the end-to-end tests run both engines).  A Python milter protocol library
would do the same, but none is more than an alpha release with one maintainer; the protocol is small and fixed
since 2006.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import Milter

from postroom import coop
from postroom.milter.adapter import ACTION_FLAGS, Pipeline, make_factory

log = logging.getLogger("postroom.milter")

# A Milter.Base object (PostroomMilter in the daemon); pymilter has no type hints.
MilterObject = Any

VERSION = 6
# Protocol steps this engine knows (SMFIP_* up to SMFIP_HDR_LEADSPC); others an MTA offers (the larger body chunk
# sizes, SMFIP_MDS_*) are declined, so every packet stays within what libmilter's own limits allow.
KNOWN_STEPS = 0x1FFFFF
MAX_PACKET = 1024 * 1024
BODY_CHUNK = 65535  # libmilter's MILTER_CHUNK_SIZE: what one replacement body packet carries

# Connect's protocol family letters (Postfix's milter8.c) as the socket family pymilter passes to connect().
_FAMILY = {b"4": socket.AF_INET, b"6": socket.AF_INET6, b"L": socket.AF_UNIX}
# Macro stages from the newest to the oldest: a name is looked up in that order, as smfi_getsymval does.
_STAGES = (b"E", b"N", b"T", b"L", b"R", b"M", b"H", b"C")
_AFTER_MAIL = (b"E", b"N", b"T", b"L", b"R")


def _packet(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + code + data


def _z(*parts: str) -> bytes:
    # Header values and addresses reach us as pymilter's strings: UTF-8, undecodable bytes kept as surrogates.  A
    # NUL would end the string early on Postfix's side; pymilter refuses it the same way (the adapter then applies
    # the failure policy).
    for p in parts:
        if "\0" in p:
            raise ValueError("embedded null character")
    return b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in parts)


def _str(value: bytes) -> str:
    # As Milter.Base decodes what libmilter hands it: UTF-8, undecodable bytes kept as surrogate escapes.
    return value.decode("utf-8", "surrogateescape")


def _strings(data: bytes) -> list[bytes]:
    """A packet's NUL-terminated strings."""
    parts = data.split(b"\0")
    return parts[:-1] if parts and parts[-1] == b"" else parts


def _macro_name(name: str) -> str:
    # Postfix sends "i" where a milter asks for "{i}" (and may send "{i}"): one name either way, as libmilter does.
    return name[1:-1] if name.startswith("{") and name.endswith("}") else name


class Context:
    """What pymilter's C context is to ``Milter.Base``: the connection's macros, and what its end of message asks
    Postfix to change, collected as protocol packets in order (libmilter writes each at once; we write them all
    before the final answer, which Postfix reads in the same order)."""

    def __init__(self) -> None:
        self.macros: dict[bytes, dict[str, str]] = {}
        self.edits: list[bytes] = []
        self.reply: str | None = None

    def getsymval(self, name: str) -> str | None:
        key = _macro_name(name)
        for stage in _STAGES:
            value = self.macros.get(stage, {}).get(key)
            if value is not None:
                return value
        return None

    def setreply(self, rcode: str, xcode: str | None, msg: str | None, *more: str) -> None:
        # smfi_setreply: "550 5.7.1 text"; smfi_setmlreply: "550-5.7.1 line\r\n" for each line but the last,
        # then "550 5.7.1 last", with a default status code when none is given.
        lines = [msg or "", *more]
        if len(lines) == 1:
            self.reply = " ".join(part for part in (rcode, xcode, lines[0]) if part is not None)
            return
        status = xcode or ("4.0.0" if rcode.startswith("4") else "5.0.0")
        self.reply = "".join(f"{rcode}-{status} {line}\r\n" for line in lines[:-1]) + f"{rcode} {status} {lines[-1]}"

    def addheader(self, name: str, value: str, idx: int = -1) -> None:
        if idx < 0:
            self.edits.append(_packet(b"h", _z(name, value)))
        else:
            self.edits.append(_packet(b"i", struct.pack(">I", idx) + _z(name, value)))

    def chgheader(self, name: str, idx: int, value: str | None) -> None:
        self.edits.append(_packet(b"m", struct.pack(">I", idx) + _z(name, value or "")))

    def addrcpt(self, rcpt: str, params: str | None = None) -> None:
        if params:
            self.edits.append(_packet(b"2", _z(rcpt, params)))
        else:
            self.edits.append(_packet(b"+", _z(rcpt)))

    def delrcpt(self, rcpt: str) -> None:
        self.edits.append(_packet(b"-", _z(rcpt)))

    def chgfrom(self, sender: str, params: str | None = None) -> None:
        self.edits.append(_packet(b"e", _z(sender, params) if params else _z(sender)))

    def replacebody(self, body: bytes) -> None:
        for start in range(0, len(body), BODY_CHUNK):
            self.edits.append(_packet(b"b", body[start : start + BODY_CHUNK]))

    def progress(self) -> None:
        """Postfix's timeouts are long (milter_content_timeout 300 s); nothing postroom does needs one."""


def answer(rc: int, protocol: int, ctx: Context) -> bytes:
    """The packet libmilter sends for a callback's return code (nothing for a no-reply step)."""
    reply, ctx.reply = ctx.reply, None
    if rc == Milter.NOREPLY:
        return b""
    if rc == Milter.CONTINUE:
        return _packet(b"c")
    if rc in (Milter.REJECT, Milter.TEMPFAIL):
        # libmilter sends the reply text only where its code agrees with the verdict (5xx reject, 4xx tempfail).
        wanted = "5" if rc == Milter.REJECT else "4"
        if reply is not None and reply.startswith(wanted):
            return _packet(b"y", reply.encode("utf-8", "surrogateescape") + b"\0")
        return _packet(b"r" if rc == Milter.REJECT else b"t")
    if rc == Milter.ACCEPT:
        return _packet(b"a")
    if rc == Milter.DISCARD:
        return _packet(b"d")
    if rc == Milter.SKIP:
        return _packet(b"s" if protocol & Milter.P_SKIP else b"c")
    log.error("a callback returned %r, which is no milter answer; answering tempfail", rc)
    return _packet(b"t")


class Ends:
    """Where ends of message run: on the loop's own thread (in a greenlet, postroom.coop), or on a pool of threads.

    On the loop an end of message costs no hand-over of Python's lock (bench/milter_direct.py: 6-10 context switches
    per mail against 20-30 when every end of message went through pool threads, whose CPU was above libmilter's),
    and while it waits for its Redis script or its look-up the loop serves the other connections.  What still
    blocks there is the rest of the store's calls (the assignment state's, the epoch check), a new connection's
    hand-shake with Redis, and anything unforeseen; should a stretch of an end of message keep the loop to itself
    for more than ``slow`` seconds (a Redis that stopped answering, say), the following ones go to the pool for
    ``hold`` seconds, where they wait side by side as with libmilter's threads, and then the loop tries again.
    With ``[milter] workers`` >= 1 every end of message waits for a worker process over a pipe, so they all go to
    the pool.
    """

    def __init__(self, threads: int, *, inline: bool, slow: float = 0.2, hold: float = 10.0) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="eom")
        self.threads = threads
        self.inline = inline
        self.slow = slow
        self.hold = hold
        self.pool_until = 0.0

    async def run(self, fn: Callable[..., int], *args: Any) -> int:
        if not self.inline or time.monotonic() < self.pool_until:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        rc, blocked = await coop.run(fn, *args)
        if blocked > self.slow:
            self.pool_until = time.monotonic() + self.hold
            log.warning(
                "an end of message kept the milter's loop for %.2f s; the next ones run on %d threads for %.0f s",
                blocked,
                self.threads,
                self.hold,
            )
        return rc

    def close(self) -> None:
        self.pool.shutdown(wait=True)


@dataclass
class Shared:
    """What every connection of one engine shares."""

    factory: Callable[[], MilterObject]
    ends: Ends
    timeout: float
    connections: set[_Connection] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # ends of message in progress


class _Connection(asyncio.Protocol):
    """One connection from the MTA: packets are read as they arrive, in a callback rather than a coroutine per
    read (the engine's own cost per mail is Python on one thread; a coroutine resumed for every packet was a good
    part of it), and answered at once; an end of message is the one step that runs as a task."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ctx = Context()
        self.milter: MilterObject | None = None
        self.actions = 0
        self.protocol = 0
        self.last_seen = time.monotonic()
        self.in_eom = False
        self.closed = False
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.shared.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.last_seen = time.monotonic()
        if not self.in_eom:
            self._process()
        elif len(self.buffer) > 2 * MAX_PACKET and self.transport is not None:
            # Postfix waits for the answer before it sends more; whoever does not is not read until it comes.
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        # Postfix is done sending.  With an end of message still running, the connection stays open for its
        # answer and the packets sent after it; otherwise the transport closes now.
        self.eof = True
        return True if self.in_eom else None

    def connection_lost(self, exc: Exception | None) -> None:
        # Postfix closed the connection (a quit, its own timeout, or smtpd ended) or we did.
        self.shared.connections.discard(self)
        self._end_milter()
        self.closed = True

    def _new_milter(self) -> MilterObject:
        m = self.shared.factory()
        m._ctx = self.ctx
        m._actions = self.actions
        m._protocol = self.protocol
        return m

    def _call(self, method: Callable[..., int], *args: Any) -> int:
        try:
            return method(*args)
        except Exception:
            # pymilter prints the traceback and answers tempfail; postroom's callbacks catch their own errors, so
            # this is a bug in the callbacks' glue, and Postfix keeps the mail.
            log.exception("the milter callback %s failed; answering tempfail", getattr(method, "__name__", method))
            return Milter.TEMPFAIL  # type: ignore[no-any-return]

    def _process(self) -> None:
        """Answer every complete packet in the buffer, up to an end of message (which answers when its task is done)."""
        buffer = self.buffer
        try:
            while len(buffer) >= 4 and not self.closed:  # 4: the packet's length field
                size = int.from_bytes(buffer[:4], "big")
                if not 0 < size <= MAX_PACKET:
                    log.error("milter protocol: a packet of %d bytes; closing the connection", size)
                    self.close()
                    return
                if len(buffer) < 4 + size:
                    return
                code, data = bytes(buffer[4:5]), bytes(buffer[5 : 4 + size])
                del buffer[: 4 + size]
                if code == b"E" and self.milter is not None:
                    self.in_eom = True
                    task = asyncio.get_running_loop().create_task(self._end_of_message(self.milter, data))
                    self.shared.tasks.add(task)
                    task.add_done_callback(self.shared.tasks.discard)
                    return
                out = self.handle(code, data)
                if out is None:
                    self.close()
                    return
                if out:
                    self._write(out)
        except Exception:
            # A packet this engine cannot read: that connection ends (Postfix applies milter_default_action to its
            # mail), every other one goes on.
            log.exception("milter protocol error; closing the connection")
            self.close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _end_milter(self) -> None:
        # The object keeps its context: an end of message still running on it may yet add its edits (which go
        # nowhere once the connection is gone).
        if self.milter is not None:
            m, self.milter = self.milter, None
            self._call(m.close)

    def close(self) -> None:
        """End the connection (its milter object is closed when the transport reports it gone)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def handle(self, code: bytes, data: bytes) -> bytes | None:  # noqa: PLR0911, PLR0912 (one arm per command)
        """The answer to one packet (b"" for none), or None to close the connection."""
        m = self.milter
        if code == b"O":
            return self._negotiate(data)
        if code == b"D":
            if data:
                strings = _strings(data[1:])
                self.ctx.macros[data[:1]] = {
                    _macro_name(_str(k)): _str(v) for k, v in zip(strings[::2], strings[1::2], strict=False)
                }
            return b""
        if m is None:
            # A command before negotiation (or after a quit): nothing a well-behaved MTA sends.
            log.error("milter protocol: command %r before option negotiation; closing the connection", code)
            return None
        if code == b"C":
            return self._answer(self._call(m.connect, *_connect_args(data)))
        if code == b"H":
            return self._answer(self._call(m.hello, _str((_strings(data) or [b""])[0])))
        if code == b"M":
            for stage in _AFTER_MAIL:
                self.ctx.macros.pop(stage, None)
            return self._answer(self._call(m.envfrom_bytes, *(_strings(data) or [b""])))
        if code == b"R":
            return self._answer(self._call(m.envrcpt_bytes, *(_strings(data) or [b""])))
        if code == b"T":
            return self._answer(self._call(m.data))
        if code == b"L":
            strings = _strings(data)
            name = _str(strings[0]) if strings else ""
            value = strings[1] if len(strings) > 1 else b""
            return self._answer(self._call(m.header_bytes, name, value))
        if code == b"N":
            return self._answer(self._call(m.eoh))
        if code == b"B":
            return self._answer(self._call(m.body, data))
        if code == b"E":  # only before negotiation; afterwards _process starts the end of message
            return None
        if code == b"A":
            self._call(m.abort)
            for stage in (b"M", *_AFTER_MAIL):
                self.ctx.macros.pop(stage, None)
            return b""
        if code == b"U":
            return self._answer(self._call(m.unknown, _str(data.rstrip(b"\0"))))
        if code == b"K":
            # Postfix reuses this milter connection for its next SMTP connection: a new milter object, as
            # libmilter makes a new context, under the options already negotiated.
            self._end_milter()
            self.ctx = Context()
            self.milter = self._new_milter()
            return b""
        if code == b"Q":
            return None
        log.warning("milter protocol: unknown command %r; answering continue", code)
        return _packet(b"c")

    def _answer(self, rc: int) -> bytes:
        return answer(rc, self.protocol, self.ctx)

    def _negotiate(self, data: bytes) -> bytes | None:
        if len(data) < 12:
            log.error("milter protocol: a short option negotiation; closing the connection")
            return None
        version, offered_actions, offered_steps = struct.unpack(">III", data[:12])
        if version < 2:  # libmilter's oldest protocol with option negotiation
            log.error("milter protocol: the MTA speaks version %d; closing the connection", version)
            return None
        factory = self.shared.factory
        # What pymilter negotiates: the actions it registered, and the steps Milter.Base's decorators mark as not
        # implemented (@nocallback) or not answered (@noreply) where the MTA offers to skip them, plus SKIP.
        self.actions = offered_actions & ACTION_FLAGS
        self.protocol = offered_steps & ~factory.protocol_mask() & KNOWN_STEPS  # type: ignore[attr-defined]
        self._end_milter()
        self.milter = self._new_milter()
        return _packet(b"O", struct.pack(">III", VERSION, self.actions, self.protocol))

    async def _end_of_message(self, m: MilterObject, data: bytes) -> None:
        try:
            self._write(await self._eom_answer(m, data))
        except Exception:
            log.exception("milter protocol error at end of message; closing the connection")
            self.close()
        finally:
            self.in_eom = False
            self.last_seen = time.monotonic()
        if self.transport is not None and not self.closed and not self.transport.is_reading():
            self.transport.resume_reading()
        self._process()  # what Postfix sent meanwhile (an abort, a quit, the next mail)
        if self.eof and not self.in_eom:
            self.close()

    async def _eom_answer(self, m: MilterObject, data: bytes) -> bytes:
        if data:
            # The last body chunk may ride on the end-of-message packet.
            rc = self._call(m.body, data)
            if rc not in (Milter.CONTINUE, Milter.NOREPLY, Milter.SKIP):
                return self._answer(rc)
        self.ctx.edits.clear()
        rc = await self.shared.ends.run(self._call, m.eom)
        edits, self.ctx.edits = self.ctx.edits, []
        for stage in _AFTER_MAIL:
            self.ctx.macros.pop(stage, None)
        return b"".join(edits) + self._answer(rc)


def _connect_args(data: bytes) -> tuple[str, int, Any]:
    """SMFIC_CONNECT's hostname, family and address, as pymilter hands them to connect()."""
    end = data.find(b"\0")
    hostname = _str(data[:end]) if end >= 0 else ""
    rest = data[end + 1 :] if end >= 0 else b""
    family_code = rest[:1]
    family = _FAMILY.get(family_code, 0)
    if family in (socket.AF_INET, socket.AF_INET6) and len(rest) >= 3:  # family letter + port
        (port,) = struct.unpack(">H", rest[1:3])
        address = rest[3:].rstrip(b"\0").decode("ascii", "replace")
        address = address.removeprefix("IPv6:")
        hostaddr: Any = (address, port) if family == socket.AF_INET else (address, port, 0, 0)
        return hostname, family, hostaddr
    if family == socket.AF_UNIX:
        return hostname, family, _str(rest[3:].rstrip(b"\0"))
    return hostname, family, None


# -- the server --------------------------------------------------------------------------------------------------


def _listen_address(spec: str) -> tuple[str, str | None, int]:
    """("unix", path, 0) or ("inet", host, port) from libmilter's socket forms."""
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local"):
        return "unix", rest, 0
    port, _, host = rest.partition("@")
    return "inet", host or ("::" if kind == "inet6" else None), int(port)


async def start_server(spec: str, umask: int, shared: Shared) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()

    def protocol() -> _Connection:
        return _Connection(shared)

    kind, where, port = _listen_address(spec)
    if kind == "inet":
        return await loop.create_server(protocol, where, port, reuse_address=True)
    assert where is not None
    path = Path(where)
    # A socket file left by a milter that died is removed, as libmilter does; any other file is not ours.
    with suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    old_umask = os.umask(umask)
    try:
        return await loop.create_unix_server(protocol, str(path))
    finally:
        os.umask(old_umask)


async def idle_watch(shared: Shared) -> None:
    # One sweep a second instead of a timer per read: libmilter's [milter] timeout_seconds for a silent MTA.
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        for conn in list(shared.connections):
            if not conn.in_eom and now - conn.last_seen > shared.timeout:
                log.warning("closing a milter connection silent for %.0f s", now - conn.last_seen)
                conn.close()


def _on_signals(
    loop: asyncio.AbstractEventLoop,
    holder: Any,
    reload: Callable[[Pipeline], Pipeline | None] | None,
    stop: asyncio.Event,
) -> set[asyncio.Task[None]]:
    """SIGHUP reloads (reading the files on a thread; mail keeps flowing with the pipeline it has), SIGTERM and
    SIGINT stop; the reloads in progress."""
    reloads: set[asyncio.Task[None]] = set()

    async def on_hup() -> None:
        if reload is None:
            log.info("SIGHUP: nothing to reload")
            return
        new = await asyncio.to_thread(reload, holder.get())
        if new is not None:
            holder.set(new)
            log.info("SIGHUP: reloaded; the next mail uses the new config and rules")

    def hup() -> None:
        task = loop.create_task(on_hup())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def on_stop(signum: int) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    loop.add_signal_handler(signal.SIGHUP, hup)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    return reloads


async def _wind_down(server: asyncio.AbstractServer, shared: Shared, spec: str) -> None:
    server.close()
    # Mails at their end of message finish (their verdict reaches Postfix); connections between mails close, and
    # Postfix applies milter_default_action to a mail it was still sending, as with libmilter's stop.
    deadline = time.monotonic() + 10
    while any(c.in_eom for c in shared.connections) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for conn in list(shared.connections):
        conn.close()
    await server.wait_closed()
    shared.ends.close()
    kind, where, _ = _listen_address(spec)
    if kind == "unix" and where:
        with suppress(OSError):
            Path(where).unlink()


async def _serve(pipeline: Pipeline, reload: Callable[[Pipeline], Pipeline | None] | None) -> None:
    config = pipeline.config
    factory, holder = make_factory(pipeline)
    ends = Ends(config.milter.eom_threads, inline=config.milter.workers == 0)
    shared = Shared(factory, ends, float(config.milter.timeout_seconds))
    try:
        server = await start_server(config.milter.socket, config.milter.socket_umask, shared)
    except OSError as exc:
        ends.close()
        raise OSError(
            exc.errno,
            f"cannot listen on [milter] socket {config.milter.socket} ({exc.strerror or exc}): does its folder "
            "exist, and may postroom write there? (systemd's RuntimeDirectory=postroom makes /run/postroom)",
        ) from exc
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads = _on_signals(loop, holder, reload, stop)
    watch = loop.create_task(idle_watch(shared))
    log.info("listening on %s (asyncio engine)", config.milter.socket)
    try:
        await stop.wait()
    finally:
        watch.cancel()
        for task in reloads:
            task.cancel()
        await _wind_down(server, shared, config.milter.socket)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(pipeline: Pipeline, reload: Callable[[Pipeline], Pipeline | None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP calls ``reload`` and swaps in what it returns.  Blocks; runs in the
    main thread (signal handlers)."""
    asyncio.run(_serve(pipeline, reload))
