"""``postroom demo --postfix``: the inbound story on a private Postfix, Dovecot and Redis, with the real milter.

Everything runs on free loopback ports in one temp dir and is stopped at the end (``--keep`` leaves it running
for Thunderbird or swaks).  The demo uses the shipped example config, so what it shows is what an admin gets.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import os
import secrets
import time
import uuid
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from postroom.config import example_config_path, load_config
from postroom.demo import stop_on_sigterm, wait_for_ctrl_c
from postroom.imap_event import namespace_prefix
from postroom.store.redis import RedisStore
from postroom.words import plural
from postroom_testbed import StackError
from postroom_testbed.imap import Team, deploy_team

CUSTOMERS = ("alice@customer.test", "bob@customer.test", "mallory@customer.test")


def _mail(sender: str, subject: str, body: str, in_reply_to: str = "") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"{sender.split('@', maxsplit=1)[0].capitalize()} <{sender}>"
    msg["To"] = "support@example.test"
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(idstring=uuid.uuid4().hex[:8], domain="customer.test")
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(body)
    return msg


class Story:
    def __init__(self, team: Team, console: Console) -> None:
        d = team.deployment
        self.team = team
        self.d = d
        self.console = console
        self.box = d.config.mailboxes["support"]
        self.store = RedisStore.from_url(
            d.config.redis.url, key_prefix=d.config.redis.key_prefix, message_index_days=1, timeout=2
        )

    def send(self, step: str, msg: EmailMessage, folder: str = "INBOX") -> EmailMessage:
        sender = str(msg["From"]).split("<")[1].rstrip(">")
        with self.console.status(f"{step} ..."):
            self.d.stack.send(msg, mail_from=sender, rcpts=[self.box.address])
            deadline = time.monotonic() + 20
            while not (got := self.d.stack.find_raw(self.box.address, str(msg["Message-ID"]), folder)):
                if time.monotonic() > deadline:
                    raise StackError(f"{msg['Message-ID']} did not reach {self.box.address}/{folder} in 20 s")
                time.sleep(0.1)
        delivered = email.message_from_bytes(got[0].replace(b"\r\n", b"\n"), policy=email.policy.default)
        self.console.print(f"[bold green]✓[/] {step}")
        self.console.print(f"    lands in [cyan]{self.box.address}/{folder}[/] as [bold]{delivered['Subject']}[/]")
        self.console.print(f"    X-Postroom-Owner: {delivered['X-Postroom-Owner']}")
        return delivered

    def run(self) -> None:
        c = self.console
        first = _mail("alice@customer.test", "Printer on fire", "Hello, our printer is on fire.\n")
        got = self.send("Alice writes to support@", first)
        n = int(str(got["X-Postroom-Ticket"]).split()[0])
        self.send("Bob writes to support@", _mail("bob@customer.test", "Invoice wrong", "Invoice 42 is wrong.\n"))
        self.drag("meier", str(first["Message-ID"]), self.d.config.agent_folder("meier"))
        owner = self.store.ticket(self.box.address, n)
        c.print(
            f"[bold green]✓[/] Meier, logged in to IMAP as meier, drags it into {namespace_prefix(self.box)}/"
            f"{self.d.config.agent_folder('meier')}: ticket #{n} is now {owner.owner if owner else '?'}'s"
        )
        self.send(
            "Alice answers; her mail client dropped the ticket token",
            _mail("alice@customer.test", "AW: Printer on fire", "It is still burning.\n", str(first["Message-ID"])),
            folder=self.d.config.agent_folder("meier"),
        )
        self.send(
            f"Mallory, a stranger, pastes [Support #{n}] to get at Alice's ticket",
            _mail("mallory@customer.test", f"[Support #{n}] send me the invoice", "Thanks.\n"),
        )
        self.send(
            "Alice forwards the old thread: a new ticket, linked to the old one",
            _mail("alice@customer.test", f"WG: [Support #{n}] Printer on fire", "For our facility manager.\n"),
        )

    def drag(self, login: str, message_id: str, folder: str) -> None:
        """What Thunderbird does when the agent drags a mail from the team's INBOX into a folder."""
        prefix = namespace_prefix(self.box)
        imap = imaplib.IMAP4("127.0.0.1", self.d.stack.dovecot.imap_port, timeout=30)
        try:
            imap.login(login, self.team.passwords[login])
            imap.select(f'"{prefix}"')
            _status, found = imap.uid("SEARCH", "HEADER", "Message-ID", f'"{message_id}"')
            imap.uid("MOVE", found[0].decode(), f'"{prefix}/{folder}"')
        finally:
            imap.logout()
        # postroom imap-event runs inside the MOVE; Redis has the owner once the command has returned.

    def summary(self) -> None:
        table = Table(title=f"Tickets of {self.box.address}")
        for col in ("#", "customer", "subject", "owner", "state", "linked"):
            table.add_column(col)
        for t in reversed(self.store.tickets(self.box.address)):
            table.add_row(str(t.number), t.customer, t.subject, t.owner or "unassigned", t.state, str(t.linked or ""))
        self.console.print(table)
        tree = Tree(f"IMAP folders of {self.box.address}")
        for folder in self.d.stack.folders(self.box.address):
            count = len(self.d.stack.fetch(self.box.address, folder))
            tree.add(f"{folder} ({plural(count, 'message')})")
        self.console.print(tree)


def _access(team: Team, console: Console) -> None:
    """How to point Thunderbird (or swaks) at the stack: ports and every agent's own password."""
    d = team.deployment
    table = Table(title="Log in as an agent (IMAP and submission: plain text on loopback, no TLS)")
    for col in ("agent", "password", "IMAP", "submission (AUTH)", "sees"):
        table.add_column(col)
    for login in d.config.agents:
        boxes = [namespace_prefix(b) for b in d.config.mailboxes.values() if login in b.agents]
        table.add_row(
            login,
            team.passwords[login],
            f"127.0.0.1:{d.stack.dovecot.imap_port}",
            f"127.0.0.1:{d.stack.postfix.submission_port}",
            ", ".join(boxes) or "(no shared mailbox)",
        )
    console.print(table)


def _hints(team: Team) -> str:
    """What to try by hand while the demo keeps running; one command a line, never wrapped (to be copied)."""
    d = team.deployment
    smtp, sub = d.stack.postfix.smtp_port, d.stack.postfix.submission_port
    return (
        f"\nRunning until Ctrl-C.  In Thunderbird: an IMAP account on 127.0.0.1:{d.stack.dovecot.imap_port} and"
        f" SMTP 127.0.0.1:{sub}, user meier with the password above, no encryption:"
        " the folder Support is the team's INBOX, Support/Meier his.\n"
        f"  swaks --server 127.0.0.1:{smtp} --to support@example.test --from carol@customer.test\n"
        f"  swaks --server 127.0.0.1:{sub} --auth-user meier --auth-password {team.passwords['meier']} "
        "--from meier@example.test --to bob@customer.test --header 'Subject: Re: [Support #2] Invoice wrong'"
    )


def run(keep: bool = False, console: Console | None = None, workdir: Path | None = None) -> int:
    """The story on a private Postfix + Dovecot + Redis; with ``workdir`` (or ``keep``) its folder, with the
    milter's log, stays after the demo for a look."""
    console = console or Console()
    if os.geteuid() != 0:
        console.print(
            "[red]postroom demo --postfix runs a private Postfix, which needs root: run it with sudo[/] "
            "(postroom demo without --postfix does not)"
        )
        return 2
    config = load_config(example_config_path(), environ={})
    passwords = {login: f"{login}-{secrets.token_hex(3)}" for login in config.agents}
    console.rule("postroom demo --postfix: a private Postfix + Dovecot + Redis with the postroom milter")
    stays = keep or workdir is not None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    stop_on_sigterm()
    try:
        with deploy_team(config, passwords, CUSTOMERS, parent_dir=workdir, keep_dir=stays) as team:
            d = team.deployment
            log_path = d.milter.log_path
            kept = "kept after the demo" if stays else "removed at the end; --workdir DIR keeps it"
            console.print(f"work folder {d.stack.root} ({kept}); milter log {log_path}")
            _access(team, console)
            story = Story(team, console)
            story.run()
            story.summary()
            if keep:
                console.print(_hints(team), soft_wrap=True)
                wait_for_ctrl_c()
    except StackError as exc:
        console.print(f"[red]the demo stack failed:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[bold]demo stopped; everything it started is stopped[/]")
        return 130
    where = f"; the milter's log stays in {log_path}" if stays else ""
    console.print(f"[bold]demo finished; everything it started is stopped{where}[/]")
    return 0
