"""``postroom demo --postfix``: the inbound story on a private Postfix, Dovecot and Redis, with the real milter.

Everything runs on free loopback ports in one temp dir and is stopped at the end (``--keep`` leaves it running
for Thunderbird or swaks).  The demo uses the shipped example config, so what it shows is what an admin gets.
"""

from __future__ import annotations

import os
import time
import uuid
from email.message import EmailMessage
from email.utils import make_msgid

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from postroom.config import example_config_path, load_config
from postroom.store.redis import RedisStore
from postroom_testbed import Deployment, StackError, deploy

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
    def __init__(self, d: Deployment, console: Console) -> None:
        self.d = d
        self.console = console
        self.box = d.config.mailboxes["support"]
        self.store = RedisStore.from_url(
            d.config.redis.url, key_prefix=d.config.redis.key_prefix, message_index_days=1, timeout=2
        )
        self.counts: dict[str, int] = {}

    def send(self, step: str, msg: EmailMessage, folder: str = "INBOX") -> EmailMessage:
        sender = str(msg["From"]).split("<")[1].rstrip(">")
        with self.console.status(f"{step} ..."):
            self.d.stack.send(msg, mail_from=sender, rcpts=[self.box.address])
            want = self.counts.get(folder, 0) + 1
            got = self.d.stack.wait_for(self.box.address, folder, want)
            self.counts[folder] = want
        delivered = next(m for m in got if m["Message-ID"] == msg["Message-ID"])
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
        self.store.assign(self.box.address, n, "meier", time.time())
        c.print(f"[bold green]✓[/] Meier takes ticket #{n} (what his first reply will do)")
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
            tree.add(f"{folder} ({count} messages)")
        self.console.print(tree)


def run(keep: bool = False, console: Console | None = None) -> int:
    console = console or Console()
    if os.geteuid() != 0:
        console.print(
            "[red]postroom demo --postfix runs a private Postfix, which needs root: run it with sudo[/] "
            "(postroom demo without --postfix does not)"
        )
        return 2
    config = load_config(example_config_path(), environ={})
    console.rule("postroom demo --postfix: a private Postfix + Dovecot + Redis with the postroom milter")
    try:
        with deploy(config, CUSTOMERS) as d:
            console.print(f"work folder {d.stack.root}; milter log {d.milter.log_path}")
            story = Story(d, console)
            story.run()
            story.summary()
            if keep:
                console.print(
                    f"\nRunning until Ctrl-C.  SMTP 127.0.0.1:{d.stack.postfix.smtp_port}, "
                    f"IMAP 127.0.0.1:{d.stack.dovecot.imap_port} (user support@example.test, password secret)\n"
                    f"  swaks --server 127.0.0.1:{d.stack.postfix.smtp_port} --to support@example.test "
                    "--from carol@customer.test"
                )
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
    except StackError as exc:
        console.print(f"[red]the demo stack failed:[/] {exc}")
        return 1
    console.print("[bold]demo finished; everything it started is stopped[/]")
    return 0
