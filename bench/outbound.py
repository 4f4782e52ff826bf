"""Outbound throughput: agents' replies through Postfix's submission port, postroom against an empty pymilter milter.

Usage: ``.venv/bin/python bench/outbound.py [--replies N] [--sessions S] [--sizes 2048,204800]``

For every reply size and both milters (the empty one of bench/empty_milter.py and postroom) a fresh private stack
(postroom_testbed.Stack: Postfix with an MX and a SASL submission listener, Dovecot, Redis in one temp dir) is
started.  Customers first write N + warm-up mails to support@example.test through the MX listener, one per
ticket; with postroom each becomes a ticket, which is then claimed for the agent "meier" with the same Redis
script an agent's first reply runs (RedisStore.claim).  Then meier answers every one of them through the
submission port (AUTH PLAIN, one reply per SMTP connection, ``--sessions`` connections at a time), each reply an
answer to its ticket (In-Reply-To/References of the customer's mail, the subject token): postroom's path is the
claim of a ticket the agent owns, the rewrite (From, Reply-To, envelope sender, subject, the team's copy) and the
DKIM signature with the example key.  The empty milter gets the same mails and accepts them unchanged.

A run counts as finished when every reply is in its customer's Maildir and Postfix's queues are empty (postroom's
copies into the team's folder included); replies/s is measured replies divided by the time from the first
connection to that moment.  The milter's CPU time and peak RSS are read from /proc as in bench/inbound.py, whose
helpers this script imports; the load generator is Python's smtplib in threads, on the same CPUs.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import smtplib
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from email.utils import make_msgid

import redis

from inbound import (
    RECIPIENT,
    BenchError,
    Run,
    busy_percent,
    check_empty,
    cpu_jiffies,
    fmt,
    hold_interrupts,
    interrupts_as_keyboard_interrupt,
    machine_facts,
    make_milter,
    markdown_table,
    parse_sizes,
    peak_rss_kib,
    progress,
    release_interrupts,
    settled_cpu_seconds,
    size_label,
    text_table,
    wait_quiet,
)
from postroom.config import ENV_OVERRIDES, Config
from postroom.mime import message_id
from postroom.store.redis import RedisStore
from postroom_testbed import Login, MailUser, MilterDaemon, Stack, StackError, log_tail

CONFIGS = ("empty", "postroom")
CONFIG_TITLES = {"empty": "empty milter", "postroom": "postroom"}
AGENT = "meier"  # an agent of the example config's support mailbox
AGENT_FROM = "Meier <meier@example.test>"
CUSTOMER_DOMAIN = "customer.test"
_POLL = 0.005


def customer(i: int, customers: int) -> str:
    return f"customer{i % customers:02d}@{CUSTOMER_DOMAIN}"


def customer_mail(i: int, customers: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Customer {i % customers} <{customer(i, customers)}>"
    msg["To"] = RECIPIENT
    msg["Subject"] = f"Question {i}: the router does not start"
    msg["Message-ID"] = make_msgid(idstring=f"q{i}.{uuid.uuid4().hex[:8]}", domain=CUSTOMER_DOMAIN)
    msg.set_content("Hello team,\nmy router does not start since this morning. Can you help?\n")
    return msg


def reply_body(size: int) -> str:
    lines = ["Dear customer,", "", "thank you for your mail. We are looking into it.", ""]
    text = "\n".join(lines) + "\n"
    filler = "> Quoted text of the conversation so far, as mail clients put it below an answer.\n"
    return text + filler * max(0, (size - len(text)) // len(filler))


def agent_reply(question: EmailMessage, number: int, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = AGENT_FROM
    msg["To"] = str(question["From"])
    msg["Subject"] = f"Re: [Support #{number}] {question['Subject']}"
    msg["Message-ID"] = make_msgid(idstring=uuid.uuid4().hex[:12], domain="example.test")
    msg["In-Reply-To"] = str(question["Message-ID"])
    msg["References"] = str(question["Message-ID"])
    msg.set_content(body)
    return msg


# -- load ---------------------------------------------------------------------------------------------------


def send_all(port: int, mails: Sequence[EmailMessage], sessions: int, login: Login | None) -> None:
    """Send every mail on its own SMTP connection, ``sessions`` at a time; any refusal fails the run."""
    failures: list[str] = []
    lock = threading.Lock()

    def one(msg: EmailMessage) -> None:
        rcpt = re.sub(r".*<|>.*", "", str(msg["To"]))
        sender = re.sub(r".*<|>.*", "", str(msg["From"]))
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
                if login is not None:
                    smtp.login(login.name, login.password)
                smtp.send_message(msg, from_addr=sender, to_addrs=[rcpt])
        except (smtplib.SMTPException, OSError) as exc:
            with lock:
                failures.append(f"{msg['Message-ID']}: {exc!r}")

    with ThreadPoolExecutor(max_workers=sessions) as pool:
        list(pool.map(one, mails))
    if failures:
        raise BenchError(f"{len(failures)} of {len(mails)} mails were refused, e.g. {failures[0]}")


def maildir_count(stack: Stack, address: str) -> int:
    try:
        return len(os.listdir(stack.dovecot.mail_dir / address / "Maildir" / "new"))
    except FileNotFoundError:
        return 0


def wait_delivered(stack: Stack, addresses: Sequence[str], expect_total: int, timeout: float) -> None:
    """Until the addresses' INBOXes hold ``expect_total`` mails and Postfix's queues are empty."""
    deadline = time.monotonic() + timeout
    while True:
        count = sum(maildir_count(stack, a) for a in addresses)
        if count >= expect_total and stack.postfix.queue_empty():
            break
        if time.monotonic() > deadline:
            raise BenchError(
                f"not finished after {timeout:.0f}s: {count}/{expect_total} delivered, deferred "
                f"{stack.postfix.deferred_count()}\n--- postfix.log ---\n{stack.postfix.log_tail()}"
            )
        time.sleep(_POLL)
    if count != expect_total:
        raise BenchError(f"Dovecot holds {count} mails, expected {expect_total}")


# -- tickets --------------------------------------------------------------------------------------------------


def claim_tickets(stack: Stack, cfg: Config, questions: Sequence[EmailMessage]) -> list[int]:
    """The ticket of every question, claimed for the agent; raises unless each question opened one."""
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    store = RedisStore(client, cfg.redis.key_prefix, cfg.redis.message_index_days)
    try:
        keys = [store.message_key(RECIPIENT, message_id(str(q["Message-ID"]))) for q in questions]
        numbers = [int(n) if n else 0 for n in client.mget(keys)]
        if not all(numbers) or len(set(numbers)) != len(numbers):
            raise BenchError(f"{numbers.count(0)} of {len(questions)} customer mails opened no ticket of their own")
        now = time.time()
        for n in numbers:
            if not store.claim(RECIPIENT, n, AGENT, now).won:
                raise BenchError(f"could not claim Support #{n} for {AGENT}")
    finally:
        client.close()
    return numbers


def check_postroom(stack: Stack, cfg: Config, numbers: Sequence[int], addresses: Sequence[str]) -> list[str]:
    """Every reply was claimed, rewritten, signed and recorded."""
    problems: list[str] = []
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    try:
        store = RedisStore(client, cfg.redis.key_prefix, cfg.redis.message_index_days)
        owners = {client.hget(store.ticket_key(RECIPIENT, n), "owner") for n in numbers}
    finally:
        client.close()
    if owners != {AGENT}:
        problems.append(f"ticket owners after the replies: {sorted(map(str, owners))}, expected only {AGENT}")
    con = sqlite3.connect(cfg.database.url.removeprefix("sqlite:///"))
    try:
        (replies,) = con.execute("SELECT count(*) FROM events WHERE kind = 'reply'").fetchone()
    finally:
        con.close()
    if replies != len(numbers):
        problems.append(f"history has {replies} reply events, expected {len(numbers)}")
    folder = stack.dovecot.mail_dir / addresses[0] / "Maildir" / "new"
    newest = max(folder.iterdir(), key=lambda p: p.stat().st_mtime)
    raw = newest.read_bytes()[:16384].replace(b"\r\n", b"\n")
    head = re.sub(rb"\n[ \t]+", b" ", raw.split(b"\n\n", 1)[0])  # unfolded header lines
    if b'\nFrom: "Meier via Support" <support@example.test>\n' not in head:
        problems.append(f"{newest.name} does not come from the shared address")
    if not re.search(rb"\nDKIM-Signature:[^\n]*\bd=example\.test;", head):
        problems.append(f"{newest.name} has no DKIM-Signature of example.test")
    return problems


# -- one run --------------------------------------------------------------------------------------------------


def run_one(config: str, size: int, *, replies: int, sessions: int, warmup: int, customers: int) -> Run:
    total = warmup + replies
    questions = [customer_mail(i, customers) for i in range(total)]
    addresses = sorted({customer(i, customers) for i in range(total)})
    users = [MailUser(RECIPIENT), MailUser("meier@example.test"), *(MailUser(a) for a in addresses)]
    timeout = 120 + total * (0.05 + 0.2 * size / 204800)
    body = reply_body(size)
    try:
        with Stack(users=users, logins=[Login(AGENT)], milter="auto", milter_default_action="tempfail") as stack:
            milter: MilterDaemon | None = None
            try:
                milter, cfg, notes = make_milter(config, stack)
                milter.start()
                pid = milter.pid
                if pid is None:
                    raise BenchError("the milter has no process id")
                send_all(stack.postfix.smtp_port, questions, sessions, None)
                wait_delivered(stack, [RECIPIENT], total, timeout)
                # The empty milter gets the same subjects; it reads none of them.
                numbers = claim_tickets(stack, cfg, questions) if cfg is not None else list(range(1, total + 1))
                answers = [agent_reply(q, n, body) for q, n in zip(questions, numbers, strict=True)]
                login = Login(AGENT)
                send_all(stack.postfix.submission_port, answers[:warmup], sessions, login)
                wait_delivered(stack, addresses, warmup, timeout)
                busy_before = wait_quiet()
                if busy_before > 15.0:
                    notes.append(f"the machine was {busy_before:.0f}% busy with other work just before the run")
                cpu_before = settled_cpu_seconds(pid)
                mark = cpu_jiffies()
                start = time.monotonic()
                send_all(stack.postfix.submission_port, answers[warmup:], sessions, login)
                wait_delivered(stack, addresses, total, timeout)
                seconds = time.monotonic() - start
                run = Run(config, size, replies, seconds, busy_before, busy_percent(mark), notes=notes)
                if not milter.is_running():
                    raise BenchError(f"the milter died during the run:\n{log_tail(milter.log_path)}")
                run.cpu_seconds = settled_cpu_seconds(pid) - cpu_before
                run.peak_rss_kib = peak_rss_kib(pid)
                if cfg is not None:
                    run.notes += check_postroom(stack, cfg, numbers, addresses)
                deferred = len(re.findall(r"status=deferred", stack.postfix.log_text()))
                if deferred:
                    run.notes.append(f"{deferred} deliveries were deferred and retried")
            finally:
                hold_interrupts()
                if milter is not None:
                    milter.stop()
            if config == "empty" and milter is not None:
                run.notes += check_empty(milter, 2 * total)  # the customers' mails and the replies
    finally:
        release_interrupts()
    return run


# -- report -------------------------------------------------------------------------------------------------


def table_rows(results: dict[tuple[str, int], Run], sizes: Sequence[int]) -> list[tuple[str, list[str]]]:
    def row(get: Callable[[int], str]) -> list[str]:
        return [get(size) for size in sizes]

    def rss(config: str, size: int) -> str:
        kib = results[(config, size)].peak_rss_kib
        return fmt(None if kib is None else kib / 1024)

    return [
        ("replies/s, empty milter", row(lambda s: fmt(results[("empty", s)].rate))),
        ("replies/s, postroom", row(lambda s: fmt(results[("postroom", s)].rate))),
        (
            "ratio postroom / empty milter (replies/s)",
            row(lambda s: fmt(results[("postroom", s)].rate / results[("empty", s)].rate, 2)),
        ),
        ("milter CPU ms/reply, empty milter", row(lambda s: fmt(results[("empty", s)].cpu_ms_per_message, 2))),
        ("milter CPU ms/reply, postroom", row(lambda s: fmt(results[("postroom", s)].cpu_ms_per_message, 2))),
        ("milter peak RSS MiB, empty milter", row(lambda s: rss("empty", s))),
        ("milter peak RSS MiB, postroom", row(lambda s: rss("postroom", s))),
    ]


def print_header(args: argparse.Namespace, sizes: Sequence[int], warmup: int) -> None:
    print("# postroom outbound benchmark")
    env = "".join(f"{var}={shlex.quote(os.environ[var])} " for var in ("PYTHONPATH",) if os.environ.get(var))
    print(f"command:  cd {shlex.quote(os.getcwd())} && {env}{shlex.join([sys.executable, *sys.argv])}")
    print(f"started:  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    for name, value in machine_facts():
        print(f"{name + ':':<9} {value}")
    total = args.replies + warmup
    print(
        f"load:     {args.replies} measured replies per run after {warmup} warm-up replies, {args.sessions} parallel\n"
        f"          SMTP sessions to the submission port (AUTH PLAIN as {AGENT}, one reply per connection, Python\n"
        f"          smtplib), reply bodies of {', '.join(f'{s} B' for s in sizes)}. Before them {total} customer mails "
        f"from {args.customers}\n"
        f"          customers through the MX port open one ticket each, claimed for {AGENT} (RedisStore.claim)."
    )
    print(
        "          Each reply answers its own ticket (In-Reply-To/References, [Support #n]): postroom claims the\n"
        "          ticket its sender owns, rewrites From/Reply-To/envelope sender/Subject, adds the team's copy\n"
        "          (support+Meier@) and DKIM-signs with the example key; the empty milter accepts it unchanged."
    )
    print(
        "setup:    a fresh testbed stack per run (Postfix MX + SASL submission -> LMTP -> Dovecot Maildir, private\n"
        "          Redis), milter on a unix socket, milter_default_action = tempfail; postroom runs `python -m\n"
        "          postroom milter` with docs/examples/postroom.toml pointed at the stack's Redis and a SQLite\n"
        "          history (log level info). Finished = every reply in its customer's Maildir/new and Postfix's\n"
        "          queues empty; time from the first measured connection. Milter CPU = utime+stime of the milter\n"
        "          process over the measured replies (history writes included); peak RSS = VmHWM. Load generator\n"
        "          and all services share the CPUs; each measured batch starts once the CPUs were <= 15% busy for\n"
        "          a second (waiting at most 30 s)."
    )
    print(flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", type=int, default=1000, help="measured replies per run (default 1000)")
    parser.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions (default 10)")
    parser.add_argument(
        "--sizes", type=parse_sizes, default=[2048, 204800], help="reply body sizes in bytes (default 2048,204800)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up replies before each run (default replies/10, 20..200)"
    )
    parser.add_argument("--customers", type=int, default=10, help="customer mailboxes the replies go to (default 10)")
    args = parser.parse_args(argv)
    if args.replies < 1 or args.sessions < 1 or args.customers < 1:
        parser.error("--replies, --sessions and --customers must be at least 1")
    sizes: list[int] = args.sizes
    warmup: int = args.warmup if args.warmup is not None else max(20, min(200, args.replies // 10))
    if os.geteuid() != 0:
        parser.error("the testbed needs root (private Postfix and Dovecot)")
    for var in ENV_OVERRIDES:
        os.environ.pop(var, None)

    print_header(args, sizes, warmup)
    results: dict[tuple[str, int], Run] = {}
    with interrupts_as_keyboard_interrupt():
        try:
            for size in sizes:
                for config in CONFIGS:
                    progress(f"... {size_label(size)}, {CONFIG_TITLES[config]}: {warmup} warm-up + {args.replies}")
                    run = run_one(
                        config,
                        size,
                        replies=args.replies,
                        sessions=args.sessions,
                        warmup=warmup,
                        customers=args.customers,
                    )
                    results[(config, size)] = run
                    print(
                        f"{size_label(size):>7}  {CONFIG_TITLES[config]:<13} {run.messages} replies in "
                        f"{run.seconds:7.2f} s = {run.rate:8.1f} replies/s, milter CPU {fmt(run.cpu_ms_per_message, 2)}"
                        f" ms/reply, peak RSS {fmt(run.peak_rss_kib, 0)} KiB; machine {run.busy_before:.0f}% busy "
                        f"before, {run.busy_during:.0f}% during",
                        flush=True,
                    )
                    for note in run.notes:
                        print(f"         WARNING: {note}", flush=True)
        except KeyboardInterrupt:
            print("interrupted; every service of the benchmark has been stopped", file=sys.stderr)
            return 130
        except (BenchError, StackError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1

    rows = table_rows(results, sizes)
    print()
    print(text_table(rows, sizes))
    print()
    print("Markdown (for README.md):")
    print()
    print(markdown_table(rows, sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
