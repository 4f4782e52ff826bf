"""The pymilter adapter: collect the callbacks' facts, call the pipeline once at end of message, apply the verdict.

Nothing here decides anything about tickets.  The pipeline runs in this process (the default, [milter] workers = 0)
or in worker processes (postroom.milter.worker).  Each mail keeps the pipeline (config, rules) that was
current at its MAIL FROM, so a reload never changes the body policy under a mail in flight.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import Milter
import milter

from postroom import log as plog
from postroom import metrics, replies
from postroom.body import Body
from postroom.bounce import might_be_report
from postroom.config import Config
from postroom.milter.worker import Handled, LocalPipeline, skipped_body
from postroom.mime import fold
from postroom.pipeline import STATUS_HEADER, Message
from postroom.policy import Failure, on_failure
from postroom.rules import Ruleset
from postroom.runtime import Runtime  # shared with the after-queue filter
from postroom.verdict import (
    Action,
    AddHeader,
    AddRecipient,
    ChangeSender,
    Envelope,
    RemoveHeader,
    RemoveRecipient,
    ReplaceBody,
    SetHeader,
    Verdict,
    effective_edits,
)

__all__ = ["ACTION_FLAGS", "Pipeline", "PostroomMilter", "Runtime", "make_factory", "run"]

log = logging.getLogger("postroom.milter")

# Everything the verdicts can ask for; Postfix refuses an edit whose flag was not negotiated.
ACTION_FLAGS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.ADDRCPT | Milter.DELRCPT | Milter.CHGFROM | Milter.MODBODY


class Pipeline(Protocol):
    """What the adapter runs each mail through: worker.LocalPipeline or worker.RemotePipeline."""

    @property
    def config(self) -> Config: ...

    @property
    def rules(self) -> Ruleset: ...

    def handle(self, message: Message, now: float) -> Handled:
        """Run the pipeline and record its history; raises only when no worker answered."""
        ...

    def accepted(self, handled: Handled) -> None:
        """Postfix took the mail: send what it caused (auto-replies)."""
        ...


class _Holder:
    def __init__(self, pipeline: Pipeline) -> None:
        self._lock = threading.Lock()
        self._pipeline = pipeline

    def get(self) -> Pipeline:
        with self._lock:
            return self._pipeline

    def set(self, pipeline: Pipeline) -> None:
        with self._lock:
            self._pipeline = pipeline


class PostroomMilter(Milter.Base):  # type: ignore[misc]
    holder: _Holder  # set on the subclass made by make_factory

    def __init__(self) -> None:
        self.pipeline = self.holder.get()
        self.conn_id = f"conn{Milter.uniqueID()}"
        self.client_addr = ""
        self.spool = Body()
        self._reset()

    def _reset(self) -> None:
        self.mail_from = ""
        self.auth_login = ""
        self.rcpts: list[str] = []
        self.headers: list[tuple[str, str]] = []
        # In memory while small, spooled to an unlinked temporary file past body.SPOOL_BYTES: a large mail costs
        # its size once, not once per reader.
        self.spool.close()
        self.spool = Body()
        self.body_skipped = False
        self.keeps_body: bool | None = None  # decided at the first body chunk

    @Milter.noreply  # type: ignore[untyped-decorator]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        if isinstance(hostaddr, tuple) and hostaddr:
            self.client_addr = str(hostaddr[0])
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def envfrom(self, mail_from: str, *params: str) -> int:
        self._reset()
        # Each mail runs with the config and rules current at its MAIL FROM: a reload applies from the next mail
        # on, also on an open connection, and never changes the body policy under a mail in flight.
        self.pipeline = self.holder.get()
        self.mail_from = mail_from
        # The SMTP login is the only identity we trust; Postfix sends it with MAIL FROM.
        self.auth_login = self.getsymval("{auth_authen}") or ""
        return Milter.CONTINUE  # type: ignore[no-any-return]

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envrcpt(self, rcpt: str, *params: str) -> int:
        self.rcpts.append(rcpt)
        return Milter.CONTINUE  # type: ignore[no-any-return]

    @Milter.noreply  # type: ignore[untyped-decorator]
    def header(self, name: str, value: str) -> int:
        self.headers.append((name, value))
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def body(self, chunk: bytes) -> int:
        # Customer mail needs its body only for rules that read it; agents' mail always (commands, DKIM).  Not
        # @noreply: the first chunk of a body nobody reads answers SKIP, and Postfix sends no more of it.
        if self.keeps_body is None:
            # A delivery report's body names the mail it reports on (postroom.bounce): kept for every mail that
            # may be one.
            self.keeps_body = bool(
                self.auth_login or self.pipeline.rules.reads_body or might_be_report(self.mail_from, self.headers)
            )
        if not self.keeps_body:
            self.body_skipped = True
            return Milter.SKIP if self._protocol & Milter.P_SKIP else Milter.CONTINUE  # type: ignore[no-any-return]
        self.spool.append(chunk)
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def eom(self) -> int:
        qid = self.getsymval("{i}") or self.conn_id
        token = plog.queue_id.set(qid)
        try:
            return self._eom(qid)
        finally:
            plog.queue_id.reset(token)
            self.spool.close()

    def _eom(self, qid: str) -> int:
        pipeline = self.pipeline
        envelope = Envelope(
            mail_from=self.mail_from,
            rcpts=list(self.rcpts),
            queue_id=qid,
            auth_login=self.auth_login,
            client_addr=self.client_addr,
        )
        message = Message(envelope, self.headers, body=skipped_body if self.body_skipped else self.spool)
        started = time.perf_counter()
        try:
            handled = pipeline.handle(message, time.time())
        except Exception:
            # No worker answered (it died or hung): the same policy as a crash inside the pipeline.
            policy = on_failure(pipeline.config, authenticated=bool(self.auth_login))
            log.exception("the pipeline did not answer; policy %s", policy.value)
            metrics.observe(bool(self.auth_login), policy.value, time.perf_counter() - started)
            return self._apply_failed(pipeline.config)
        metrics.observe(
            bool(self.auth_login),
            metrics.verdict_label(handled.verdict),
            time.perf_counter() - started,
            store_unavailable=handled.store_unavailable,
        )
        try:
            rc = self._apply(handled.verdict)
        except Exception:
            # The verdict was half applied; the mail must still not be lost.
            log.exception("could not apply the verdict (%s)", handled.verdict.summary)
            return self._apply_failed(pipeline.config)
        # One line per mail: the pipeline logs a line (queue id, mailbox, ticket, event, owner) for every ticket
        # it records, which the summary would only repeat.
        if handled.verdict.summary and not handled.logged:
            log.info("%s: %s", handled.verdict.action.value, handled.verdict.summary)
        if rc == Milter.ACCEPT:
            try:
                pipeline.accepted(handled)
            except Exception:
                log.exception("the mail was accepted but its auto-replies could not be sent")
        return rc

    def _apply_failed(self, config: Config) -> int:
        if on_failure(config, authenticated=bool(self.auth_login)) is Failure.TEMPFAIL:
            reply = replies.S451_TEMPORARY_FAILURE
            self.setreply(str(reply.code), reply.status, *reply.lines())
            return Milter.TEMPFAIL  # type: ignore[no-any-return]
        try:
            self.addheader(STATUS_HEADER, "degraded")
        except Exception:
            log.exception("could not even mark the mail degraded; delivering it as it is")
        return Milter.ACCEPT  # type: ignore[no-any-return]

    def _apply(self, verdict: Verdict) -> int:
        if verdict.action in (Action.REJECT, Action.TEMPFAIL):
            reply = verdict.reply
            if reply is not None:
                lines = [line.replace("%", "%%") for line in reply.lines()]
                self.setreply(str(reply.code), reply.status, *lines)
            return Milter.REJECT if verdict.action is Action.REJECT else Milter.TEMPFAIL  # type: ignore[no-any-return]
        if verdict.action is Action.DISCARD:
            return Milter.DISCARD  # type: ignore[no-any-return]
        counts = Counter(name.lower() for name, _ in self.headers)
        # Recipients are deleted last: if Postfix refuses an edit half way, the mail keeps a recipient
        # (a mail whose only recipient was deleted is accepted and silently removed from the queue).
        edits = sorted(effective_edits(self.rcpts, verdict.edits), key=lambda e: isinstance(e, RemoveRecipient))
        for edit in edits:
            match edit:
                case AddHeader(name, value, top):
                    self.addheader(name, _folded(name, value), 0 if top else -1)
                case SetHeader(name, value, first_only):
                    self._set_header(name, _folded(name, value), counts, first_only=first_only)
                case RemoveHeader(name):
                    self._remove_header(name, counts)
                case AddRecipient(address):
                    self.addrcpt(f"<{address.strip('<>')}>")
                case RemoveRecipient(address):
                    self.delrcpt(address)
                case ChangeSender(address):
                    self.chgfrom(f"<{address.strip('<>')}>")
                case ReplaceBody(body):
                    self.replacebody(body)
        return Milter.ACCEPT  # type: ignore[no-any-return]

    def _set_header(self, name: str, value: str, counts: Counter[str], *, first_only: bool) -> None:
        n = counts.get(name.lower(), 0)
        # Delete surplus copies from the bottom up so the indexes still point at the originals.
        for idx in range(1 if first_only else n, 1, -1):
            self.chgheader(name, idx, "")
        if n:
            self.chgheader(name, 1, value)
        else:
            self.addheader(name, value)
        counts[name.lower()] = n if first_only and n else 1

    def _remove_header(self, name: str, counts: Counter[str]) -> None:
        for idx in range(counts.get(name.lower(), 0), 0, -1):
            self.chgheader(name, idx, "")
        counts[name.lower()] = 0

    def abort(self) -> int:
        self._reset()
        return Milter.CONTINUE  # type: ignore[no-any-return]

    def close(self) -> int:
        return Milter.CONTINUE  # type: ignore[no-any-return]


def _folded(name: str, value: str) -> str:
    """Our one-line value folded for libmilter: a multi-line value is "\\n" plus white space (Postfix writes the
    CR), so no line of a long subject comes near the 998 bytes at which Postfix would break an encoded word."""
    return fold(name, value, "\n")


def make_factory(pipeline: Pipeline | Runtime) -> tuple[type[PostroomMilter], _Holder]:
    holder = _Holder(LocalPipeline(pipeline) if isinstance(pipeline, Runtime) else pipeline)
    cls = type("BoundPostroomMilter", (PostroomMilter,), {"holder": holder})
    return cls, holder


def _listen_failure(socket: str, exc: Exception) -> OSError:
    if isinstance(exc, OSError):
        return exc
    # libmilter says only "cannot opensocket": name the socket and the usual reasons.
    return OSError(
        f"cannot listen on [milter] socket {socket} ({exc}): does its folder exist, and may postroom write there? "
        "(systemd's RuntimeDirectory=postroom makes /run/postroom)"
    )


def run(
    pipeline: Pipeline,
    reload: Callable[[Pipeline], Pipeline | None] | None = None,
    name: str = "postroom",
) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP calls ``reload`` and swaps in what it returns.  Blocks.

    libmilter treats SIGHUP like SIGTERM (its signal thread stops the milter), so libmilter runs in a thread of
    its own: it blocks HUP, TERM and INT there and in the threads it starts, while this (main) thread keeps them
    and handles them in Python.  Linux delivers a signal sent to the process to the main thread when the main
    thread does not block it, so libmilter's signal thread never sees them.
    """
    config = pipeline.config
    factory, holder = make_factory(pipeline)
    Milter.factory = factory
    Milter.set_flags(ACTION_FLAGS)
    failure: list[Exception] = []

    def serve() -> None:
        try:
            Milter.runmilter(name, config.milter.socket, config.milter.timeout_seconds)
        except (milter.error, OSError) as exc:  # e.g. the socket cannot be opened: re-raised below
            failure.append(exc)

    def on_hup(signum: int, frame: object) -> None:
        if reload is None:
            log.info("SIGHUP: nothing to reload")
            return
        new = reload(holder.get())
        if new is not None:
            # A mail in flight keeps the pipeline it took at its MAIL FROM; the next MAIL FROM takes this one.
            holder.set(new)
            log.info("SIGHUP: reloaded; the next mail uses the new config and rules")

    def on_stop(signum: int, frame: object) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        milter.stop()

    old_umask = os.umask(config.milter.socket_umask)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    thread = threading.Thread(target=serve, name="libmilter")
    try:
        log.info("listening on %s", config.milter.socket)
        thread.start()
        while thread.is_alive():
            # A timed join returns now and then, so Python runs the signal handlers in this thread.
            thread.join(0.5)
    finally:
        os.umask(old_umask)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise _listen_failure(config.milter.socket, failure[0])
