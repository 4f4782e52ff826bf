"""The whole stack (Postfix, Dovecot, Redis) in one temp dir, and how tests send and read mail through it."""

from __future__ import annotations

import atexit
import email
import email.policy
import imaplib
import os
import re
import shutil
import smtplib
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from email.message import EmailMessage, Message
from pathlib import Path
from types import TracebackType

from postroom_testbed.dovecot import (
    _LIST_LINE,
    Dovecot,
    Login,
    MailUser,
    _imap_utf7_decode,
    _parse_list_name,
    imap_quote,
)
from postroom_testbed.postfix import _QUEUES_IN_FLIGHT, Postfix
from postroom_testbed.processes import _MAX_ROOT_LENGTH, LOOPBACK, StackError, _error, _mkdir, free_port, pid_alive
from postroom_testbed.redis_server import RedisServer


def _crlf(data: bytes) -> bytes:
    # Postfix 3.7 accepts bare LF, but newer Postfix versions may reject it (smtpd_forbid_bare_newline);
    # send what a well-behaved client sends.
    return re.sub(rb"\r?\n", b"\r\n", data)


def _as_bytes(msg: bytes | Message) -> bytes:
    if isinstance(msg, bytes):
        return _crlf(msg)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


# ---------------------------------------------------------------------------------------------
# the whole stack

_live_stacks: weakref.WeakSet[Stack] = weakref.WeakSet()


class Stack:
    """Redis, Dovecot and Postfix in one temp dir; a context manager.

    ``milter="auto"`` configures ``smtpd_milters = unix:<root>/milter.sock``
    (:attr:`milter_socket_path`) for a milter the test starts itself; any other string is used
    as the ``smtpd_milters`` value as it is. Until a milter listens there, Postfix applies
    ``milter_default_action``.

    ``filter="after-queue"`` sets up Postfix's after-queue content filter instead (the amavis pattern, as
    ``postroom postfix-snippet --mode after-queue`` prints it): the MX and submission listeners queue each mail
    and hand it to a filter the test starts on :attr:`filter_port`, which hands it back to the listener on
    :attr:`reinject_port`. Until a filter listens, Postfix keeps the mail in its deferred queue.
    """

    def __init__(
        self,
        *,
        domains: Sequence[str] = ("example.test", "customer.test"),
        users: Sequence[MailUser],
        logins: Sequence[Login] = (),
        milter: str | None = None,
        keep_dir: bool = False,
        milter_default_action: str = "accept",
        main_cf: Mapping[str, str] | None = None,
        parent_dir: Path | None = None,
        filter: str | None = None,  # shadows the builtin: the word Postfix's documentation uses
        filter_port: int | None = None,
        reinject_port: int | None = None,
        dovecot_extra: Callable[[Dovecot], str] | None = None,
    ) -> None:
        if filter not in (None, "after-queue"):
            raise ValueError(f'filter must be None or "after-queue", not {filter!r}')
        if filter is not None and milter is not None:
            raise ValueError("a stack runs a milter or an after-queue filter, not both")
        self.filter = filter
        self._filter_port = filter_port
        self._reinject_port = reinject_port
        self.domains = list(domains)
        self.users = list(users)
        self.logins = list(logins)
        self.milter = milter
        self.keep_dir = keep_dir or os.environ.get("POSTROOM_TESTBED_KEEP", "") not in ("", "0")
        self.milter_default_action = milter_default_action
        self.main_cf = dict(main_cf or {})
        self.parent_dir = parent_dir
        self.dovecot_extra = dovecot_extra
        self._root: Path | None = None
        self._redis: RedisServer | None = None
        self._dovecot: Dovecot | None = None
        self._postfix: Postfix | None = None

    # -- parts ----------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        if self._root is None:
            raise StackError("Stack.root is not available: the stack is not started")
        return self._root

    @property
    def redis(self) -> RedisServer:
        if self._redis is None:
            raise StackError("Stack.redis is not available: the stack is not started")
        return self._redis

    @property
    def dovecot(self) -> Dovecot:
        if self._dovecot is None:
            raise StackError("Stack.dovecot is not available: the stack is not started")
        return self._dovecot

    @property
    def postfix(self) -> Postfix:
        if self._postfix is None:
            raise StackError("Stack.postfix is not available: the stack is not started")
        return self._postfix

    @property
    def milter_socket_path(self) -> Path:
        return self.root / "milter.sock"

    @property
    def filter_port(self) -> int:
        """Where Postfix delivers to the after-queue filter (the filter listens here)."""
        if self.filter is None:
            raise StackError("Stack.filter_port: this stack has no after-queue filter")
        if self._filter_port is None:
            self._filter_port = free_port()
        return self._filter_port

    @property
    def reinject_port(self) -> int:
        """Postfix's listener that takes mail back from the after-queue filter."""
        port = self.postfix.reinject_port
        if port is None:
            raise StackError("Stack.reinject_port: this stack has no after-queue filter")
        return port

    @property
    def milter_spec(self) -> str:
        """The milter in Postfix notation, e.g. for pymilter's ``Milter.runmilter``."""
        return f"unix:{self.milter_socket_path}"

    def process_ids(self) -> list[int]:
        """All live processes of the stack: Redis, Dovecot's and Postfix's process groups."""
        pids: list[int] = []
        if self._redis is not None and self._redis.pid is not None and pid_alive(self._redis.pid):
            pids.append(self._redis.pid)
        if self._dovecot is not None:
            pids += self._dovecot.pids()
        if self._postfix is not None:
            pids += self._postfix.pids()
        return sorted(pids)

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> Stack:
        if self._root is not None:
            raise StackError(f"this Stack was started before (in {self._root}); make a new one")
        try:
            root = Path(tempfile.mkdtemp(prefix="postroom-stack-", dir=self.parent_dir))
            self._root = root
            _mkdir(root)
            if len(str(root)) > _MAX_ROOT_LENGTH:
                raise StackError(f"temp dir {root} is too long for unix socket paths; pass a shorter parent_dir")
            _live_stacks.add(self)
            self._redis = RedisServer(root)
            self._dovecot = Dovecot(root, self.users, self.logins, self.dovecot_extra)
            self._redis.start()
            # Dovecot first: a port clash makes it pick new ports, which Postfix must know.
            self._dovecot.start()
            milter = self.milter_spec if self.milter == "auto" else self.milter
            self._postfix = Postfix(
                root,
                lmtp_port=self._dovecot.lmtp_port,
                auth_port=self._dovecot.auth_port,
                domains=self.domains,
                mailboxes=[u.address for u in self.users],
                milter=milter,
                milter_default_action=self.milter_default_action,
                main_cf=self.main_cf,
                filter_port=self.filter_port if self.filter is not None else None,
                reinject_port=self._reinject_port,
            )
            self._postfix.start()
        except BaseException as exc:
            try:
                self.stop()
            except StackError as stop_error:
                # The start-up error is the one to see; keep the clean-up failure as a note.
                exc.add_note(str(stop_error))
            raise
        return self

    def stop(self) -> None:
        """Stop every service and remove the temp dir; each step runs even if another fails."""
        errors: list[str] = []
        for part in (self._postfix, self._dovecot, self._redis):
            if part is None:
                continue
            try:
                part.stop()
            except Exception as exc:  # noqa: BLE001 - the remaining services must still be stopped
                errors.append(f"stopping {type(part).__name__}: {exc!r}")
        _live_stacks.discard(self)
        root = self._root
        if root is not None and root.exists():
            if self.keep_dir:
                print(f"postroom_testbed: kept {root}", file=sys.stderr)
            else:
                try:
                    shutil.rmtree(root)
                except OSError as exc:
                    errors.append(f"removing {root}: {exc!r}")
        if errors:
            raise StackError("stack did not stop cleanly:\n" + "\n".join(errors))

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- mail ---------------------------------------------------------------------------------------

    def send(
        self,
        msg: bytes | Message,
        *,
        mail_from: str,
        rcpts: Sequence[str],
        port: int | None = None,
        login: Login | None = None,
    ) -> dict[str, tuple[int, bytes]]:
        """Send one message over SMTP; with ``login`` to the submission port after AUTH.

        Returns the recipients Postfix refused (empty when all were accepted), as smtplib does.
        Raises smtplib's errors unchanged, so tests can assert on a rejection:
        SMTPRecipientsRefused when every recipient is refused, SMTPDataError when the end of
        data is refused (e.g. by the milter), SMTPSenderRefused for MAIL FROM.
        """
        if port is None:
            port = self.postfix.submission_port if login is not None else self.postfix.smtp_port
        data = _as_bytes(msg)
        with smtplib.SMTP(LOOPBACK, port, local_hostname="client.test", timeout=60) as smtp:
            smtp.ehlo()
            if login is not None:
                smtp.login(login.name, login.password)
            return smtp.sendmail(mail_from, list(rcpts), data)

    def _password(self, address: str, password: str | None) -> str:
        if password is not None:
            return password
        for user in self.users:
            if user.address.lower() == address.lower():
                return user.password
        return "secret"

    def _imap(self, address: str, password: str | None) -> imaplib.IMAP4:
        imap = imaplib.IMAP4(LOOPBACK, self.dovecot.imap_port, timeout=30)
        try:
            imap.login(address, self._password(address, password))
        except BaseException:
            imap.shutdown()
            raise
        return imap

    def fetch_raw(self, address: str, folder: str = "INBOX", password: str | None = None) -> list[bytes]:
        """All messages of a folder in arrival order, byte for byte as stored (CRLF line ends).

        For checks that need the exact bytes, such as a DKIM signature. Read-only: the messages
        stay unseen. Raises StackError if the folder does not exist.
        """
        imap = self._imap(address, password)
        try:
            status, detail = imap.select(imap_quote(folder), readonly=True)
            if status != "OK":
                raise StackError(
                    f"cannot select folder {folder!r} of {address}: {detail!r}; folders: {self._folders(imap)}"
                )
            _status, data = imap.search(None, "ALL")
            numbers = data[0].split() if data and data[0] else []
            messages: list[bytes] = []
            for number in numbers:
                _status, parts = imap.fetch(number.decode(), "(BODY.PEEK[])")
                messages += [part[1] for part in parts if isinstance(part, tuple)]
            return messages
        finally:
            imap.logout()

    def find_raw(self, address: str, text: str, folder: str = "INBOX", password: str | None = None) -> list[bytes]:
        """The messages of a folder whose headers or body contain ``text`` (IMAP SEARCH TEXT), as stored.

        One search instead of fetching the whole folder, for folders that grow over a test session (a bounce
        that quotes a Message-ID, one reply among hundreds). Read-only; [] for a missing folder.
        """
        if '"' in text or "\\" in text or not text.isascii():
            raise ValueError(f"cannot search for {text!r}: quotes, backslashes and non-ASCII are not supported")
        imap = self._imap(address, password)
        try:
            status, _detail = imap.select(imap_quote(folder), readonly=True)
            if status != "OK":
                return []
            _status, data = imap.search(None, "TEXT", f'"{text}"')
            messages: list[bytes] = []
            for number in data[0].split() if data and data[0] else []:
                _status, parts = imap.fetch(number.decode(), "(BODY.PEEK[])")
                messages += [part[1] for part in parts if isinstance(part, tuple)]
            return messages
        finally:
            imap.logout()

    def fetch(self, address: str, folder: str = "INBOX", password: str | None = None) -> list[EmailMessage]:
        """All messages of a folder in arrival order, parsed with email.policy.default.

        Line ends are turned into "\\n" first, so ``get_content()`` compares with ordinary
        Python strings. Read-only; raises StackError if the folder does not exist.
        """
        return [
            email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.default)
            for raw in self.fetch_raw(address, folder, password)
        ]

    def _folders(self, imap: imaplib.IMAP4) -> list[str]:
        _status, data = imap.list('""', '"*"')
        names = []
        for item in data:
            if isinstance(item, tuple):
                # A name sent as an IMAP literal: the name itself is the second element.
                names.append(_imap_utf7_decode(item[1].decode("ascii", errors="replace")))
            elif isinstance(item, bytes):
                match = _LIST_LINE.match(item)
                if match:
                    names.append(_parse_list_name(match.group("name")))
        return sorted(names)

    def folders(self, address: str, password: str | None = None) -> list[str]:
        imap = self._imap(address, password)
        try:
            return self._folders(imap)
        finally:
            imap.logout()

    def wait_for(
        self, address: str, folder: str, count: int, timeout: float = 20.0, password: str | None = None
    ) -> list[EmailMessage]:
        """Poll until the folder holds at least ``count`` messages and return them all."""
        deadline = time.monotonic() + timeout
        messages: list[EmailMessage] = []
        while True:
            try:
                messages = self.fetch(address, folder, password)
            except StackError:
                messages = []  # the folder is created by the first delivery into it
            if len(messages) >= count:
                return messages
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        try:
            folders: object = self.folders(address, password)
        except (OSError, imaplib.IMAP4.error) as exc:
            folders = f"(cannot list: {exc!r})"
        queued = {queue: self.postfix.queue_ids(queue) for queue in (*_QUEUES_IN_FLIGHT, "hold")}
        raise _error(
            f"{address} folder {folder!r}: {len(messages)} message(s) after {timeout:.0f}s, "
            f"wanted {count}; folders: {folders}; Postfix queues: {queued}",
            self.postfix.log_path,
            self.dovecot.log_path,
        )


def _stop_forgotten_stacks() -> None:
    # A stack used without "with" (e.g. the demo killed by Ctrl-C) must not outlive Python.
    for stack in list(_live_stacks):
        try:
            stack.stop()
        except Exception as exc:  # noqa: BLE001 - best effort at interpreter exit
            print(f"postroom_testbed: {exc}", file=sys.stderr)


atexit.register(_stop_forgotten_stacks)
