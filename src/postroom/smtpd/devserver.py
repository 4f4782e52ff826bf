"""A development SMTP server: the pipeline and local Maildir folders, no Postfix and no Dovecot.

What ``postroom demo`` runs, and what a developer can point swaks or Thunderbird at.  It stands in for the whole
mail system on one loopback port:

- Postfix's submission port: agents authenticate with AUTH PLAIN or LOGIN (their config login, password "demo"),
  and that login is the agent's identity, exactly as ``{auth_authen}`` is for the milter.  Mail without AUTH is a
  customer's, whatever its From header says.
- the pipeline: every mail goes through ``Runtime.process``, the call the milter and the after-queue filter make;
  a REJECT or TEMPFAIL verdict is the answer to DATA, so the client shows the verdict's own text.
- Dovecot's LMTP: the edited mail is filed per recipient, ``support+Meier@`` into
  ``maildir/support@example.test/Meier``, any other address into ``maildir/<address>/INBOX``.

Never a real mail server: the password is the same for every agent and AUTH is offered without TLS, which is why
it listens on loopback only.
"""

from __future__ import annotations

import asyncio
import logging
import mailbox
import time
import uuid
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from postroom import __version__, replies
from postroom import log as plog
from postroom.pipeline import Message
from postroom.policy import Failure, on_failure
from postroom.runtime import Runtime
from postroom.smtpd.message import RawMail, parse, without_login_claims
from postroom.smtpd.rewrite import degraded, rewrite
from postroom.smtpd.server import refusal, smtp_reply
from postroom.verdict import Envelope as MailEnvelope

__all__ = ["DEMO_PASSWORD", "DevHandler", "DevServer", "Maildirs"]

log = logging.getLogger("postroom.smtpd")

# The one password of every agent: this server exists to show postroom, not to keep anybody out.
DEMO_PASSWORD = "demo"
LOOPBACK = "127.0.0.1"
INBOX = "INBOX"


class Maildirs:
    """One stdlib Maildir per address and folder under ``root``: ``root/<address>/<folder>``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, owner: str, folder: str) -> Path:
        # Addresses and folder names come from the mail: only a plain name may become a directory.
        for part in (owner, folder):
            if not part or part in (".", "..") or "/" in part or "\0" in part:
                raise ValueError(f"not a folder name: {part!r}")
        return self.root / owner / folder

    def deliver(self, owner: str, folder: str, data: bytes) -> None:
        path = self.path(owner, folder)
        # Maildir creates the folder itself, not its parents; 0700 as Maildir's own.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        box = mailbox.Maildir(path, create=True)
        box.add(data)

    def raw(self, owner: str, folder: str = INBOX) -> list[bytes]:
        """The folder's mails as stored, oldest first: what a DKIM verifier reads."""
        path = self.path(owner, folder)
        files = [f for sub in ("new", "cur") if (path / sub).is_dir() for f in (path / sub).iterdir()]
        return [f.read_bytes() for f in sorted(files, key=lambda f: (f.stat().st_mtime_ns, f.name))]

    def messages(self, owner: str, folder: str = INBOX) -> list[EmailMessage]:
        """The folder's mails, parsed, oldest first."""
        found: list[EmailMessage] = []
        for data in self.raw(owner, folder):
            parsed = message_from_bytes(data, policy=policy.default)
            assert isinstance(parsed, EmailMessage)  # policy.default builds EmailMessage
            found.append(parsed)
        return found

    def tree(self) -> dict[str, dict[str, int]]:
        """{address: {folder: number of mails}}, sorted, INBOX first."""
        out: dict[str, dict[str, int]] = {}
        if not self.root.is_dir():
            return out
        for owner in sorted(p for p in self.root.iterdir() if p.is_dir()):
            folders = sorted((p for p in owner.iterdir() if p.is_dir()), key=lambda p: (p.name != INBOX, p.name))
            out[owner.name] = {f.name: len(mailbox.Maildir(f, create=False)) for f in folders}
        return out


@dataclass(frozen=True)
class Delivered:
    """Where one accepted mail was filed: (address, folder) per recipient, in envelope order."""

    queue_id: str
    folders: list[tuple[str, str]]


class DevHandler:
    """aiosmtpd handler: the pipeline at end of DATA in a worker thread (Redis and SQL block), then the Maildirs."""

    def __init__(self, runtime: Runtime, maildirs: Maildirs) -> None:
        self.runtime = runtime
        self.maildirs = maildirs
        self.delivered: list[Delivered] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        login = session.auth_data if session.authenticated and isinstance(session.auth_data, str) else ""
        try:
            return await asyncio.to_thread(
                self.handle_mail,
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                envelope.original_content or b"",
                login,
                session.peer[0] if isinstance(session.peer, tuple) else "",
            )
        except Exception:
            # aiosmtpd would answer an escaped exception with a 5xx that says nothing; the client may retry this.
            log.exception("unexpected error in the dev server")
            return smtp_reply(replies.S451_TEMPORARY_FAILURE)

    def handle_mail(self, mail_from: str, rcpts: list[str], data: bytes, login: str, client_addr: str) -> str:
        """Run one mail through the pipeline and file it; returns the SMTP reply to DATA."""
        # There is no Postfix to name the mail: an id of our own, so the log lines of one mail can be found.
        qid = uuid.uuid4().hex[:10].upper()
        token = plog.queue_id.set(qid)
        try:
            envelope = MailEnvelope(mail_from, list(rcpts), queue_id=qid, auth_login=login, client_addr=client_addr)
            return self._handle(envelope, data)
        finally:
            plog.queue_id.reset(token)

    def _handle(self, envelope: MailEnvelope, data: bytes) -> str:
        rt = self.runtime
        mail_from, rcpts, login, qid = envelope.mail_from, envelope.rcpts, envelope.auth_login, envelope.queue_id
        parsed = parse(data)
        # Identity is the AUTH login of this session only: a Received header claiming one is removed, as by the
        # after-queue filter.
        raw = RawMail(without_login_claims(parsed.headers), parsed.body)
        outcome = rt.handle(Message(envelope, raw.headers, body=lambda: raw.body), time.time())
        verdict = outcome.verdict
        refused = refusal(verdict)
        if refused is not None:
            return refused
        applied = True
        try:
            out = rewrite(raw, mail_from, rcpts, verdict.edits)
        except Exception:
            log.exception("could not apply the verdict (%s)", verdict.summary)
            if on_failure(rt.config, authenticated=bool(login)) is Failure.TEMPFAIL:
                return smtp_reply(replies.S451_TEMPORARY_FAILURE)
            out = degraded(raw, mail_from, rcpts)
            applied = False
        # What Dovecot's LDA writes on top, so a reader of the folder sees the envelope sender.
        stored = f"Return-Path: <{out.mail_from}>\r\n".encode("utf-8", "surrogateescape") + out.data
        folders = [self.folder_for(rcpt) for rcpt in out.rcpts]
        for owner, folder in folders:
            self.maildirs.deliver(owner, folder, stored)
        self.delivered.append(Delivered(qid, folders))
        log.info("%s: %s; filed into %s", verdict.action.value, verdict.summary, folders)
        if applied:
            rt.send(outcome.outgoing)
        return smtp_reply(replies.S250_FILED.format(queue_id=qid))

    def folder_for(self, rcpt: str) -> tuple[str, str]:
        """Dovecot's ``lmtp_save_to_detail_mailbox``: a shared mailbox's +detail is its folder."""
        address = rcpt.strip().strip("<>")
        # The detail keeps its case, as Dovecot's folder names do ("Meier").
        found = self.runtime.config.mailbox_for(address)
        if found is None:
            return address.lower(), INBOX
        _key, box, detail = found
        return box.address, detail or box.inbox_folder or INBOX


class AgentLogins:
    """aiosmtpd authenticator: a configured agent's login with the demo password; the login is the identity."""

    def __init__(self, handler: DevHandler) -> None:
        self.handler = handler

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = data.login.decode("utf-8", "replace")
        # Read the config per attempt: the handler's runtime is the one mail is processed with.
        agent = self.handler.runtime.config.agent_for_login(login)
        if agent is None or data.password.decode("utf-8", "replace") != DEMO_PASSWORD:
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=agent)


def _without_login_data_warning(record: logging.LogRecord) -> bool:
    return "Session.login_data is deprecated" not in record.getMessage()


class DevServer:
    """The dev server in a thread of its own (aiosmtpd's Controller), on loopback; a context manager."""

    def __init__(self, runtime: Runtime, maildir_root: Path, port: int) -> None:
        self.maildirs = Maildirs(maildir_root)
        self.handler = DevHandler(runtime, self.maildirs)
        self.controller = Controller(
            self.handler,
            hostname=LOOPBACK,
            port=port,
            ident=f"postroom {__version__} dev server",
            authenticator=AgentLogins(self.handler),
            # Loopback only (see the module's docstring): a demo client needs no certificate to log in.
            auth_require_tls=False,
            enable_SMTPUTF8=True,
            decode_data=False,
        )

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        return int(self.controller.port)

    def start(self) -> DevServer:
        # aiosmtpd logs every connection at INFO; postroom's own lines (with the queue id) are the ones to read.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        # aiosmtpd 1.4 sets its own deprecated Session.login_data after every AUTH and logs a warning about itself.
        logging.getLogger("mail.log").addFilter(_without_login_data_warning)
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
