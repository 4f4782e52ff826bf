"""Sends the mail postroom writes itself (auto-replies) through the local Postfix, off the mail path.

:meth:`Mailer.submit` puts a message into a bounded queue and returns at once; one background thread talks SMTP
to ``[mailer] host:port``.  A temporary failure (Postfix down, a 4xx reply) is retried a few times with growing
pauses while other messages go on; a permanent one (5xx) is not.  Every log line carries the queue id of the mail
that caused the message, and a sent message's line also names the queue id Postfix gave it, so an admin can
follow one customer mail through both.  A full queue drops the new message with a log line: a customer's mail
never waits for our answer to it.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import smtplib
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from postroom.config import Config
from postroom.log import message_logger

DEFAULT_RETRY_DELAYS = (2.0, 10.0, 60.0, 300.0)


@dataclass(frozen=True)
class OutgoingMail:
    mail_from: str  # the envelope sender; "" is the null sender <> that auto-replies use (RFC 3834 section 3.3)
    rcpts: tuple[str, ...]
    data: bytes  # the complete message, CRLF line ends
    cause_queue_id: str  # the Postfix queue id of the mail that made us write this one
    what: str  # for the log: "auto-reply 'ack' for Support #17"


class PermanentFailure(RuntimeError):
    """Postfix refused the message for good (5xx); trying again would not help."""


@dataclass(order=True)
class _Job:
    due: float
    seq: int  # unique, so the heap never gets to compare mails
    mail: OutgoingMail = field(compare=False)
    attempt: int = field(default=0, compare=False)


_STOP = object()


class Mailer:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 25,
        *,
        timeout: float = 30.0,
        queue_size: int = 1000,
        attempts: int = 3,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.attempts = attempts
        self.retry_delays = tuple(retry_delays) or (0.0,)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._retries: list[_Job] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._busy = 0  # messages submitted and neither sent nor given up
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    @classmethod
    def from_config(cls, config: Config) -> Mailer:
        m = config.mailer
        return cls(m.host, m.port, timeout=m.timeout_seconds, queue_size=m.queue_size, attempts=m.attempts)

    # -- the caller's side: never blocks --

    def start(self) -> Mailer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="postroom-mailer", daemon=True)
            self._thread.start()
        return self

    def submit(self, mail: OutgoingMail) -> bool:
        """Queue a message; False (and a log line) when the queue is full."""
        log = message_logger(mail.cause_queue_id, "postroom.mailer")
        with self._idle:
            self._busy += 1
        try:
            self._queue.put_nowait(_Job(0.0, next(self._seq), mail, 0))
        except queue.Full:
            self._done(dropped=True)
            log.error("%s to %s dropped: the mailer queue is full", mail.what, ", ".join(mail.rcpts))
            return False
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every submitted message is sent or given up; False on timeout (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued (within ``timeout``), then end the thread; messages still waiting are logged."""
        self.flush(timeout)
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.join(timeout)

    # -- the thread --

    def _done(self, *, sent: bool = False, dropped: bool = False) -> None:
        with self._idle:
            self._busy -= 1
            if sent:
                self.sent += 1
            elif dropped:
                self.dropped += 1
            else:
                self.failed += 1
            self._idle.notify_all()

    def _run(self) -> None:
        while True:
            wait = None
            if self._retries:
                wait = max(0.0, self._retries[0].due - time.monotonic())
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = None
            if item is _STOP:
                for job in self._retries:
                    message_logger(job.mail.cause_queue_id, "postroom.mailer").error(
                        "%s to %s not sent: postroom stopped before the next try",
                        job.mail.what,
                        ", ".join(job.mail.rcpts),
                    )
                    self._done()
                self._retries.clear()
                return
            if isinstance(item, _Job):
                self._attempt(item)
            now = time.monotonic()
            while self._retries and self._retries[0].due <= now:
                self._attempt(heapq.heappop(self._retries))

    def _attempt(self, job: _Job) -> None:
        mail = job.mail
        log = message_logger(mail.cause_queue_id, "postroom.mailer")
        job.attempt += 1
        try:
            reply = self._send(mail)
        except PermanentFailure as exc:
            log.error("%s to %s refused by %s:%d: %s", mail.what, ", ".join(mail.rcpts), self.host, self.port, exc)
            self._done()
            return
        except (OSError, smtplib.SMTPException) as exc:
            if job.attempt >= self.attempts:
                log.error("%s to %s given up after %d tries: %s", mail.what, ", ".join(mail.rcpts), job.attempt, exc)
                self._done()
                return
            delay = self.retry_delays[min(job.attempt - 1, len(self.retry_delays) - 1)]
            log.warning(
                "%s to %s: try %d failed (%s), next in %.0fs", mail.what, ", ".join(mail.rcpts), job.attempt, exc, delay
            )
            job.due = time.monotonic() + delay
            heapq.heappush(self._retries, job)
            return
        log.info("%s to %s sent: %s", mail.what, ", ".join(mail.rcpts), reply)
        self._done(sent=True)

    def _send(self, mail: OutgoingMail) -> str:
        """One SMTP conversation; the server's final reply ("2.0.0 Ok: queued as 4ABC") on success."""
        # gethostname, not smtplib's getfqdn default: a slow resolver must not stall the thread.
        with smtplib.SMTP(self.host, self.port, local_hostname=socket.gethostname(), timeout=self.timeout) as smtp:
            smtp.ehlo_or_helo_if_needed()
            code, text = smtp.mail(mail.mail_from)
            _check(code, text, "MAIL FROM")
            accepted = 0
            refusals = []
            for rcpt in mail.rcpts:
                code, text = smtp.rcpt(rcpt)
                if code in (250, 251):
                    accepted += 1
                else:
                    refusals.append((rcpt, code, text))
            if not accepted:
                rcpt, code, text = refusals[0]
                _check(code, text, f"RCPT TO {rcpt}")
            code, text = smtp.data(mail.data)
            _check(code, text, "DATA")
            result = text.decode("utf-8", "replace")
            for rcpt, code, text in refusals:
                result += f"; {rcpt} refused: {code} {text.decode('utf-8', 'replace')}"
            return result


def _check(code: int, text: bytes, step: str) -> None:
    if 200 <= code < 300:
        return
    message = f"{step}: {code} {text.decode('utf-8', 'replace')}"
    if code >= 500:
        raise PermanentFailure(message)
    raise smtplib.SMTPResponseException(code, message)
