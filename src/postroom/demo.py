"""``postroom demo``: the whole story on one machine, without root, without Postfix and without Dovecot.

A private redis-server, SQLite in a work folder and the development SMTP server (:mod:`postroom.smtpd.devserver`),
which runs every mail through the same ``Runtime.process`` as the milter and files the result into Maildir folders.
The runtime is built as the daemons build theirs (``daemon_runtime``) from the shipped example config, so what the
demo shows is what an admin gets; only Redis, the database and the rules file are the demo's own.

``postroom demo --postfix`` plays the inbound story on a private Postfix and Dovecot instead (needs root).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import dkim as dkimpy
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from postroom import digest, remind, timeline
from postroom import log as plog
from postroom.admin.common import daemon_runtime
from postroom.config import Config, example_config_path, load_config, parse_config, to_toml
from postroom.dkim import dns_answer, public_txt
from postroom.history import make_engine
from postroom.runtime import Runtime
from postroom.smtpd.devserver import DEMO_PASSWORD, DevServer
from postroom.store.redis import RedisStore
from postroom.words import plural
from postroom_testbed import RedisServer, StackError, free_port

SUPPORT = "support@example.test"
ALICE = "alice@bigcorp.example"  # a key account: the demo's rule routes her mail to Meier
BOB = "bob@customer.test"
EXIT_MISSING = 2


def demo_rules_path() -> Path:
    """The rules the demo runs with, shipped beside the example config."""
    return example_config_path().parent / "demo-rules.toml"


def _redis_binary() -> str | None:
    # Debian puts redis-server into /usr/bin, but a user's PATH may lack /usr/sbin-style directories.
    for directory in (None, "/usr/sbin", "/usr/bin"):
        found = shutil.which("redis-server", path=directory)
        if found:
            return found
    return None


def ensure_redis(console: Console) -> bool:
    """redis-server is there, or installed now when we are root; False after telling the user what to install."""
    if _redis_binary():
        return True
    if os.geteuid() != 0:
        console.print(
            "[red]postroom demo needs the redis-server binary.[/] Install it as root:\n"
            "    apt-get install -y redis-server      (or run ./dev demo as root, which installs it)"
        )
        return False
    console.print("redis-server is missing: apt-get install -y redis-server")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "redis-server"]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        # A fresh container has no package lists yet.
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(install, env=env, check=False)
    if _redis_binary():
        return True
    console.print("[red]apt-get could not install redis-server; install it and run the demo again[/]")
    return False


def write_config(workdir: Path, redis_url: str, mail_port: int) -> Path:
    """The example config with the demo's Redis, SQLite, rules and mail port, written into the work folder."""
    example = load_config(example_config_path(), environ={})
    data = example.model_dump()
    data["redis"]["url"] = redis_url
    data["database"]["url"] = f"sqlite:///{workdir / 'history.sqlite3'}"
    data["rules_file"] = str(demo_rules_path())
    # Auto-replies go to the dev server too, so nothing of the demo leaves the machine.
    data["mailer"]["host"] = "127.0.0.1"
    data["mailer"]["port"] = mail_port
    config = parse_config(data, "<demo>", environ={})
    path = workdir / "postroom.toml"
    path.write_text("# Written by postroom demo from the example postroom.toml.\n" + to_toml(config))
    return path


def _mail(sender: str, to: str, subject: str, body: str, in_reply_to: str = "") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"{sender.split('@', maxsplit=1)[0].capitalize()} <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(idstring=uuid.uuid4().hex[:8], domain=sender.rpartition("@")[2])
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(body)
    return msg


class Story:
    """Two customers, a rule, Meier's reply, Mueller's refused one and the customer's answer, over real SMTP."""

    STEPS = 8

    def __init__(self, server: DevServer, runtime: Runtime, console: Console) -> None:
        self.server = server
        self.config: Config = runtime.config
        self.store = runtime.parts.store  # the daemon's own store: one connection pool in this process
        self.console = console
        self.maildirs = server.maildirs
        self.step = 0
        self.bob = EmailMessage()  # Bob's mail as filed, set by run()

    def submit(self, msg: EmailMessage, login: str = "") -> None:
        """One SMTP session: AUTH when an agent sends, as a mail client on the submission port does."""
        sender = str(msg["From"]).split("<")[1].rstrip(">")
        rcpts = [str(msg["To"]).split("<")[-1].rstrip(">")]
        with smtplib.SMTP(self.server.host, self.server.port, timeout=30) as smtp:
            if login:
                smtp.login(login, DEMO_PASSWORD)
            smtp.send_message(msg, sender, rcpts)

    @contextlib.contextmanager
    def doing(self, what: str) -> Iterator[None]:
        self.step += 1
        with self.console.status(f"[{self.step}/{self.STEPS}] {what} ..."):
            yield
        self.console.print(f"[bold green]✓[/] [{self.step}/{self.STEPS}] {what}")

    def landed(self, owner: str, folder: str) -> EmailMessage:
        got = self.maildirs.messages(owner, folder)[-1]
        self.console.print(f"    lands in [cyan]{owner}/{folder}[/] as [bold]{got['Subject']}[/]")
        return got

    def run(self) -> None:
        c = self.console
        meier = self.config.agent_folder("meier")
        with self.doing("Alice of bigcorp.example writes to support@"):
            self.submit(_mail(ALICE, SUPPORT, "Printer on fire", "Hello, our printer is on fire.\n"))
        first = self.landed(SUPPORT, meier)
        c.print(f"    the rule 'key account' routes it to Meier: X-Postroom-Owner: {first['X-Postroom-Owner']}")
        with self.doing("Bob writes to support@"):
            self.submit(_mail(BOB, SUPPORT, "Invoice wrong", "Invoice 42 is wrong.\n"))
        self.bob = self.landed(SUPPORT, "INBOX")

        with self.doing("Meier replies from his own mail client (SMTP AUTH as meier)"):
            reply = _mail(
                "meier@example.test", ALICE, f"Re: {first['Subject']}", "We are on our way.\n", str(first["Message-ID"])
            )
            self.submit(reply, login="meier")
        got = self.landed(ALICE, "INBOX")
        c.print(f"    From: {got['From']}")
        c.print(f"    {self.dkim_result(ALICE)}")

        with self.doing("Mueller answers the same ticket (SMTP AUTH as mueller)"):
            rival = _mail(
                "mueller@example.test", ALICE, f"Re: {first['Subject']}", "I can help too.\n", str(first["Message-ID"])
            )
            try:
                self.submit(rival, login="mueller")
                refused = "delivered (it should have been refused)"
            except smtplib.SMTPResponseException as exc:
                text = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
                refused = f"{exc.smtp_code} {text}"
        # On one line whatever the terminal's width: this is the text the agent's mail client shows.
        c.print(f"    his mail client shows: [yellow]{refused}[/]", soft_wrap=True)

        with self.doing("Alice answers Meier's reply"):
            self.submit(_mail(ALICE, SUPPORT, f"AW: {got['Subject']}", "Thank you!\n", str(got["Message-ID"])))
        answer = self.landed(SUPPORT, meier)
        c.print(f"    X-Postroom-Owner: {answer['X-Postroom-Owner']}")
        c.print(f"    X-Postroom-Due: {answer['X-Postroom-Due']}  (the next response, in business hours)")

        with self.doing("Meier takes Bob's ticket and asks to be reminded in 2 days (#take, #remind 2d)"):
            note = _mail("meier@example.test", SUPPORT, f"Re: {self.bob['Subject']}", "#take\n#remind 2d\n")
            note["In-Reply-To"] = str(self.bob["Message-ID"])
            self.submit(note, login="meier")
        self.landed(SUPPORT, meier)

    def later(self, runtime: Runtime) -> None:
        """Two days on: ``postroom remind`` and ``postroom digest`` as their timers would run them (``--now``)."""
        c = self.console
        assert runtime.history is not None
        runtime.history.flush()
        now = dt.datetime.now(dt.UTC) + dt.timedelta(days=2, minutes=1)
        engine = make_engine(self.config.database.url)
        send = remind.smtp_sender(self.config)
        with self.doing("Two days later Bob has not answered: postroom remind --now +2d"):
            notices = remind.plan(self.config, timeline.load(engine), now)
            store = self.store
            assert isinstance(store, RedisStore)  # the daemon's own: the claims share its client and pool
            claims = remind.RedisClaims(store.client, self.config.redis.key_prefix)
            records, _ = remind.send_all(self.config, notices, store, send, now, claims=claims)
            runtime.history.submit(records)
        for n in notices:
            c.print(f"    {n.kind} ({n.target}) for {n.mark} to {', '.join(n.rcpts)}")
        meier = self.config.agent_folder("meier")
        self.landed(SUPPORT, meier)
        runtime.history.flush()
        with self.doing("postroom digest --now +2d: every agent's tickets, the lead's figures"):
            mails = digest.digests(self.config, timeline.load(engine), now)
            for d in mails:
                send("", (d.to,), remind.wire(digest.message(d, now)))
        engine.dispose()
        lead = self.config.agents["schulze"].address
        got = self.landed(lead, "INBOX")
        plain = got.get_body(("plain",))
        kinds = [p.get_content_type() for p in got.walk()]
        c.print(f"    parts: {', '.join(kinds)}")
        if plain is not None:
            for line in plain.get_content().splitlines()[:7]:
                c.print(f"    | {line}", soft_wrap=True)

    def dkim_result(self, owner: str) -> str:
        """Verify the newest mail's signature against the example key's DNS record, as a receiver would."""
        key = self.config.dkim["example.test"]
        record = public_txt(Path(key.key_file).read_bytes())
        raw = self.maildirs.raw(owner, "INBOX")[-1]
        ok = dkimpy.verify(raw, dnsfunc=dns_answer({f"{key.selector}._domainkey.example.test.": record}))
        return "DKIM signature verifies (d=example.test)" if ok else "[red]DKIM signature does not verify[/]"

    def summary(self) -> None:
        store = self.store
        table = Table(title=f"Tickets of {SUPPORT} (Redis)")
        for col in ("#", "customer", "subject", "owner", "state", "priority", "tags"):
            table.add_column(col)
        for t in reversed(store.tickets(SUPPORT)):
            owner = t.owner or "unassigned"
            table.add_row(str(t.number), t.customer, t.subject, owner, t.state, t.priority, " ".join(t.tags))
        self.console.print(table)
        tree = Tree(f"Maildir folders in {self.maildirs.root}")
        for owner, folders in self.maildirs.tree().items():
            branch = tree.add(owner)
            for folder, count in folders.items():
                branch.add(f"{folder} ({plural(count, 'message')})")
        self.console.print(tree)


def wait_for_ctrl_c() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def stop_on_sigterm() -> None:
    """SIGTERM (systemctl, kill, a closing terminal's SIGHUP) ends the demo like Ctrl-C: through the finally that
    stops its redis-server, instead of leaving it running without the demo."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def run(keep: bool = False, workdir: Path | None = None, console: Console | None = None) -> int:
    console = console or Console()
    if not ensure_redis(console):
        return EXIT_MISSING
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="postroom-demo-")) if workdir is None else workdir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    console.rule("postroom demo: a private Redis, SQLite and the postroom dev SMTP server")
    # The dev server's lines carry the id it gives each mail (as Postfix's queue id in the daemons' logs).
    plog.setup("warning")
    stop_on_sigterm()
    redis = RedisServer(root)
    try:
        redis.start()
        port = free_port()
        config_path = write_config(root, redis.url, port)
        with (
            daemon_runtime(config_path, "demo", environ={}) as runtime,
            DevServer(runtime, root / "maildir", port) as server,
        ):
            console.print(f"work folder {root}; Redis {redis.url}; SMTP {server.host}:{server.port}")
            story = Story(server, runtime, console)
            story.run()
            story.later(runtime)
            story.summary()
            if keep:
                console.print(
                    f"\nRunning until Ctrl-C.  SMTP {server.host}:{server.port} (agents: AUTH with login meier, "
                    f"mueller or schulze, password {DEMO_PASSWORD}); mail is filed under {root / 'maildir'}\n"
                    f"  swaks --server {server.host}:{server.port} --to {SUPPORT} --from carol@customer.test\n"
                    f"  swaks --server {server.host}:{server.port} --auth-user meier --auth-password {DEMO_PASSWORD}"
                    f" --from meier@example.test --to {BOB} --header 'Subject: Re: [Support #2] Invoice wrong'",
                    # Commands to copy: never broken at the terminal's width.
                    soft_wrap=True,
                )
                plog.setup("info")  # each mail you send: what postroom did with it, under its id
                wait_for_ctrl_c()
    except StackError as exc:
        console.print(f"[red]the demo could not start:[/] {exc}")
        return 1
    except (OSError, smtplib.SMTPException) as exc:
        console.print(f"[red]the demo's SMTP server failed:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[bold]demo stopped; everything it started is stopped[/]")
        return 130
    finally:
        redis.stop()
        if own_dir and not keep:
            shutil.rmtree(root, ignore_errors=True)
    where = f"; its files stay in {root}" if keep or not own_dir else ""
    console.print(f"[bold]demo finished; everything it started is stopped{where}[/]")
    return 0
