"""The after-queue content filter: Postfix delivers every queued mail here, postroom edits it and hands it back.

The amavis pattern of Postfix's FILTER_README: a ``content_filter = postroom:[127.0.0.1]:10025`` transport delivers
each mail over SMTP; this server runs the same pipeline as the milter, makes the verdict's edits to the mail itself
and sends the result with smtplib to a Postfix listener on 127.0.0.1:10026 that has no content filter and no
milters.  Postfix gets its 250 only once that listener has taken the mail, so a mail is never acknowledged
before it is safe in Postfix's queue again; any failure answers 451 and Postfix keeps the mail and tries again.

Nothing here decides anything about tickets: what the milter adapter collects from macros comes from Postfix's
own Received header (:mod:`postroom.smtpd.message`), and the verdict is applied by :mod:`postroom.smtpd.rewrite`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import signal
import smtplib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from postroom import __version__, metrics, replies
from postroom import log as plog
from postroom.config import SmtpdConfig
from postroom.pipeline import Message
from postroom.policy import Failure, on_failure
from postroom.replies import Reply
from postroom.runtime import Runtime
from postroom.smtpd.message import RawMail, Submitter, parse, submitter, without_login_claims
from postroom.smtpd.rewrite import Outgoing, degraded, rewrite
from postroom.verdict import Action, Verdict
from postroom.verdict import Envelope as MailEnvelope

__all__ = ["FilterHandler", "FilterSMTP", "ReinjectionError", "reinject", "run", "serve"]

log = logging.getLogger("postroom.smtpd")

# What Postfix's smtp client may forward with XFORWARD (Postfix's XFORWARD_README); we pass it on unchanged, so
# Postfix logs the re-injected mail with the real client and orig_queue_id= the first queue id.
XFORWARD_ATTRIBUTES = "NAME ADDR PORT PROTO HELO IDENT SOURCE"
# MAIL FROM parameters that describe the content and must reach Postfix again; SIZE is recomputed.
_FORWARDED_MAIL_OPTIONS = re.compile(r"^(BODY=\S+|SMTPUTF8)$", re.IGNORECASE)
_QUEUED_AS = re.compile(r"queued as (\S+)")
_connections = itertools.count(1)


class ReinjectionError(Exception):
    """Postfix's re-injection listener did not take the mail; the reason goes into the 451 reply."""


def smtp_reply(reply: Reply) -> str:
    """A possibly multi-line SMTP reply as aiosmtpd sends it (it adds the final CRLF)."""
    lines = reply.lines()
    return "\r\n".join(
        f"{reply.code}{'-' if i < len(lines) - 1 else ' '}{reply.status} {line}" for i, line in enumerate(lines)
    )


def refusal(verdict: Verdict) -> str | None:
    """The SMTP reply (logged) for a verdict that refuses or discards the mail; None for one to pass on."""
    if verdict.action in (Action.REJECT, Action.TEMPFAIL):
        log.info("%s: %s", verdict.action.value, verdict.summary)
        fallback = replies.S550_BAD_MESSAGE if verdict.action is Action.REJECT else replies.S451_TEMPORARY_FAILURE
        return smtp_reply(verdict.reply or fallback)
    if verdict.action is Action.DISCARD:
        log.info("discard: %s", verdict.summary)
        return smtp_reply(replies.S250_DISCARDED)
    return None


def connect(config: SmtpdConfig) -> smtplib.SMTP:
    """An EHLO'd session with the re-injection listener; raises ReinjectionError when there is none."""
    where = f"{config.reinject_host}:{config.reinject_port}"
    smtp = smtplib.SMTP(timeout=config.timeout_seconds, local_hostname=socket.gethostname())
    try:
        code, text = smtp.connect(config.reinject_host, config.reinject_port)
    except OSError as exc:  # smtplib's own errors are OSErrors too
        smtp.close()
        raise ReinjectionError(f"{where}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        # smtplib.connect returns a 421 greeting (Postfix busy or shutting down) instead of raising.
        if code != 220:
            raise ReinjectionError(f"{where} greeted with {code} {text.decode(errors='replace')}")
        code, text = smtp.ehlo()
        if code != 250:
            raise ReinjectionError(f"EHLO answered {code} {text.decode(errors='replace')}")
    except (OSError, smtplib.SMTPException) as exc:
        _close(smtp)
        raise ReinjectionError(f"EHLO: {exc}") from None
    except ReinjectionError:
        _close(smtp)
        raise
    return smtp


def _close(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


def _expect(step: str, code: int, text: bytes, *ok: int) -> None:
    if code not in ok:
        raise ReinjectionError(f"{step} answered {code} {text.decode(errors='replace')}")


def reinject(smtp: smtplib.SMTP, out: Outgoing, mail_options: list[str], xforward: list[str]) -> str:
    """Hand the mail to Postfix in one transaction; returns Postfix's new queue id ("" if it named none).

    Every recipient must be accepted before DATA: a mail half handed back cannot be answered 451 without
    delivering it twice, so a refused recipient ends the transaction with nothing sent.
    """
    try:
        if xforward and smtp.has_extn("xforward"):
            for attributes in xforward:
                _expect("XFORWARD", *smtp.docmd("XFORWARD", attributes), 250)
        options = [o for o in mail_options if _FORWARDED_MAIL_OPTIONS.match(o)]
        if smtp.has_extn("size"):
            options.append(f"SIZE={len(out.data)}")
        _expect(f"MAIL FROM:<{out.mail_from}>", *smtp.mail(out.mail_from, options), 250)
        for rcpt in out.rcpts:
            _expect(f"RCPT TO:<{rcpt}>", *smtp.rcpt(rcpt), 250, 251)
        code, text = smtp.data(out.data)
        _expect("end of DATA", code, text, 250)
    except ReinjectionError:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            smtp.rset()
        raise
    except (OSError, smtplib.SMTPException) as exc:
        raise ReinjectionError(str(exc) or type(exc).__name__) from None
    m = _QUEUED_AS.search(text.decode(errors="replace"))
    return m.group(1) if m else ""


@dataclass
class _Mail:
    """What one SMTP transaction from Postfix delivered."""

    mail_from: str
    rcpts: list[str]
    mail_options: list[str]
    data: bytes
    xforward: list[str] = field(default_factory=list)
    conn_id: str = ""


class FilterHandler:
    """aiosmtpd handler: everything happens at end of DATA, in a worker thread (Redis, SQL and smtplib block)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.in_flight = 0

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if isinstance(server, FilterSMTP):
            server.xforward.clear()
        # Offered so Postfix's smtp client (smtp_send_xforward_command = yes) tells us the original client.
        return [*responses[:-1], f"250-XFORWARD {XFORWARD_ATTRIBUTES}", responses[-1]]

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if isinstance(server, FilterSMTP):
            server.xforward.clear()
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        xforward: list[str] = []
        conn_id = ""
        if isinstance(server, FilterSMTP):
            xforward, server.xforward = server.xforward, []
            conn_id = server.conn_id
        mail = _Mail(
            mail_from=envelope.mail_from or "",
            rcpts=list(envelope.rcpt_tos),
            mail_options=list(envelope.mail_options),
            data=envelope.original_content or b"",
            xforward=xforward,
            conn_id=conn_id,
        )
        self.in_flight += 1
        try:
            # The runtime is read once per mail, as the milter reads it once per connection.
            return await asyncio.to_thread(handle_mail, self.runtime, mail)
        except Exception:
            # aiosmtpd would answer an escaped exception with a 5xx, and Postfix would bounce the mail.
            log.exception("unexpected error in the filter; Postfix keeps the mail queued")
            return smtp_reply(replies.S451_TEMPORARY_FAILURE)
        finally:
            self.in_flight -= 1


def handle_mail(rt: Runtime, mail: _Mail) -> str:
    """Run one mail through the pipeline and back into Postfix; returns the SMTP reply for Postfix."""
    raw = parse(mail.data)
    who = submitter(raw.headers)
    qid = who.queue_id or _xforward_ident(mail.xforward) or mail.conn_id
    token = plog.queue_id.set(qid)
    try:
        return _handle(rt, mail, RawMail(without_login_claims(raw.headers), raw.body), who, qid)
    finally:
        plog.queue_id.reset(token)


def _xforward_ident(xforward: list[str]) -> str:
    for attributes in xforward:
        m = re.search(r"(?:^|\s)IDENT=([0-9A-Za-z]+)(?:\s|$)", attributes)
        if m:
            return m.group(1)
    return ""


def _handle(rt: Runtime, mail: _Mail, raw: RawMail, who: Submitter, qid: str) -> str:
    config = rt.config
    try:
        # Reach Postfix before the pipeline runs: when it cannot take the mail back, Redis must not count a mail
        # that Postfix will hand us again (a second ticket for one mail).
        smtp = connect(config.smtpd)
    except ReinjectionError as exc:
        log.error("cannot hand mail back to Postfix (%s); Postfix keeps it queued", exc)
        return smtp_reply(replies.S451_REINJECTION_FAILED.format(reason=str(exc)))
    try:
        envelope = MailEnvelope(
            mail_from=mail.mail_from,
            rcpts=list(mail.rcpts),
            queue_id=qid,
            auth_login=who.login,
            client_addr=who.client_addr,
        )
        message = Message(envelope, raw.headers, body=lambda: raw.body)
        # The same calls as the milter's (milter/adapter.py): both adapters run the pipeline with the same parts.
        started = time.perf_counter()
        outcome = rt.handle(message, time.time())
        verdict = outcome.verdict
        metrics.observe(
            bool(who.login),
            metrics.verdict_label(verdict),
            time.perf_counter() - started,
            store_unavailable=outcome.store_unavailable,
        )
        refused = refusal(verdict)
        if refused is not None:
            return refused
        applied = True
        try:
            out = rewrite(raw, mail.mail_from, mail.rcpts, verdict.edits)
        except Exception:
            log.exception("could not apply the verdict (%s)", verdict.summary)
            if on_failure(config, authenticated=bool(who.login)) is Failure.TEMPFAIL:
                return smtp_reply(replies.S451_TEMPORARY_FAILURE)
            out = degraded(raw, mail.mail_from, mail.rcpts)
            applied = False
        try:
            new_qid = reinject(smtp, out, mail.mail_options, mail.xforward)
        except ReinjectionError as exc:
            log.error("Postfix did not take the mail back (%s); it stays queued", exc)
            return smtp_reply(replies.S451_REINJECTION_FAILED.format(reason=str(exc)))
        log.info("%s: %s; handed back to Postfix as %s", verdict.action.value, verdict.summary, new_qid or "?")
        if applied:
            # As the milter: what this mail caused (auto-replies) goes out only for a mail handled as decided.
            rt.send(outcome.outgoing)
        return smtp_reply(replies.S250_HANDED_BACK.format(queue_id=new_qid or "?"))
    finally:
        _close(smtp)


class FilterSMTP(SMTP):
    """aiosmtpd's SMTP session, plus Postfix's XFORWARD command and room for Postfix's longest lines."""

    # Postfix's smtp client breaks lines at 998 characters (smtp_line_length_limit), but a site may raise that;
    # aiosmtpd's default would answer a longer line with a 5xx, and Postfix would bounce the mail.
    line_length_limit = 1 << 20

    def __init__(self, handler: FilterHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.xforward: list[str] = []
        self.conn_id = f"conn{next(_connections)}"

    async def smtp_XFORWARD(self, arg: str) -> None:
        if not arg or "=" not in arg:
            await self.push(f"501 5.5.4 Syntax: XFORWARD attribute=value ({XFORWARD_ATTRIBUTES})")
            return
        self.xforward.append(arg)
        await self.push("250 2.0.0 Ok")


async def serve(handler: FilterHandler, stop: asyncio.Event) -> None:
    """Listen until ``stop`` is set, then let the mails in flight finish (Postfix retries what we drop).

    Where to listen is read once, at start; everything else comes from ``handler.runtime`` for each mail.
    """
    config = handler.runtime.config.smtpd
    loop = asyncio.get_running_loop()
    hostname = socket.gethostname()

    def factory() -> FilterSMTP:
        return FilterSMTP(
            handler,
            data_size_limit=config.max_message_size or None,
            # Postfix sends mail that needs SMTPUTF8 only to a server that offers it, and bounces it otherwise.
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident=f"postroom {__version__}",
            timeout=config.timeout_seconds,
            loop=loop,
        )

    server = await loop.create_server(factory, host=config.listen_host, port=config.listen_port)
    log.info(
        "listening on %s:%d, handing mail back to %s:%d",
        config.listen_host,
        config.listen_port,
        config.reinject_host,
        config.reinject_port,
    )
    async with server:
        await stop.wait()
        server.close()
        # A mail whose 250 never reaches Postfix is delivered again on retry: finish what is running.
        deadline = loop.time() + config.timeout_seconds
        while handler.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)


Reload = Callable[[Runtime], Runtime | None]


async def _reload(handler: FilterHandler, reload: Reload | None) -> None:
    if reload is None:
        log.info("SIGHUP: nothing to reload")
        return
    # Reading the files blocks; mail keeps flowing meanwhile, with the runtime it has.
    new = await asyncio.to_thread(reload, handler.runtime)
    if new is not None:
        # A mail in flight keeps the runtime it started with; the next one gets this one.
        handler.runtime = new
        log.info("SIGHUP: reloaded; mail from now on uses the new config and rules")


def run(runtime: Runtime, reload: Reload | None = None) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP calls ``reload`` and swaps in what it returns.  Blocks."""
    # aiosmtpd logs every connection at INFO; postroom's own lines (with the queue id) are the ones to read.
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    async def main() -> None:
        handler = FilterHandler(runtime)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[None]] = set()

        def on_stop(signum: signal.Signals) -> None:
            log.info("%s: stopping", signum.name)
            stop.set()

        def on_hup() -> None:
            task = loop.create_task(_reload(handler, reload))
            reloads.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(reloads.discard)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await serve(handler, stop)

    asyncio.run(main())
