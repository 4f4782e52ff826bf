"""Outbound: agents' replies through Postfix's submission port with an empty milter, with OpenDKIM signing (what
admins run today) and with postroom (claim, rewrite, the team's copy, DKIM signature).

Usage: ``.venv/bin/python bench/outbound.py [--replies N] [--sessions S] [--sizes 2048,204800] [--rounds R]
[--big BYTES] [--configs empty,opendkim,postroom]``

For every reply size, in each of ``--rounds`` rounds, every configuration runs once in turn (interleaved, so a slow
spell of the shared machine hits all alike) on a fresh private stack (postroom_testbed.Stack: Postfix with an MX
and a SASL submission listener, Dovecot, Redis in one temp dir).  Customers first write N + warm-up mails to
support@example.test through the MX listener, one per ticket; with postroom each becomes a ticket, which is then
claimed for the agent "meier" with the same Redis script an agent's first reply runs (RedisStore.claim).  Then
meier answers every one of them through the submission port (AUTH PLAIN, one reply per SMTP connection,
``--sessions`` connections at a time), each reply an answer to its ticket (In-Reply-To/References of the
customer's mail, the subject token).  The empty milter accepts the replies unchanged; OpenDKIM (Debian's opendkim,
``Mode s``, relaxed/relaxed) signs them for example.test with the example config's 2048-bit key, as postroom does.
postroom also puts a copy of each reply into the owner's folder of the shared mailbox (support+Meier, the example
config's ``copy_replies``); so that Postfix and Dovecot do the same work in every configuration, the empty and the
OpenDKIM runs get that same copy from Postfix (``sender_bcc_maps`` keyed by meier's envelope sender).  Every run
checks afterwards that the team's folder holds one copy per reply.

A run counts as finished when every reply is in its customer's Maildir and Postfix's queues are empty (postroom's
copies into the team's folder included); replies/s is measured replies divided by the time from the first
connection to that moment.  Milter CPU (utime + stime, postroom's worker processes included) and peak RSS
(VmHWM) come from /proc.  ``--big`` adds one run per configuration with a single reply of that size (default
25 MB): its milter CPU seconds and peak RSS.  The tables report medians over the rounds with the range.
The run loop and the measurement are bench/runloop.py's, shared with bench/inbound.py.
"""

from __future__ import annotations

import argparse
import os
import re
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

from postroom.config import ENV_OVERRIDES, Config
from postroom.mime import message_id
from postroom.store.redis import RedisStore
from postroom_testbed import Login, MailUser, Stack
from runloop import (
    BenchError,
    Results,
    Run,
    clean_up,
    deferred_notes,
    fmt,
    markdown_grid,
    measured,
    median,
    milter_for,
    parse_configs,
    parse_sizes,
    print_command_and_machine,
    run_rounds,
    size_label,
    text_grid,
)

RECIPIENT = "support@example.test"
CONFIGS = ("empty", "opendkim", "postroom")
CONFIG_TITLES = {"empty": "empty milter", "opendkim": "OpenDKIM (signs)", "postroom": "postroom"}
BIG = 25_000_000
AGENT = "meier"  # an agent of the example config's support mailbox
AGENT_FROM = "Meier <meier@example.test>"
# Where postroom files the team's copy of meier's replies (copy_replies: the owner's folder of the shared
# mailbox).  The other configurations get the same copy from Postfix (sender_bcc_maps), so that Postfix and
# Dovecot do the same work per reply in every configuration: two recipients, two LMTP deliveries.
TEAM_COPY = "support+Meier@example.test"
TEAM_FOLDER = ".Meier"  # Dovecot's Maildir++ folder for support+Meier (lmtp_save_to_detail_mailbox)
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


def team_copies(stack: Stack) -> int:
    try:
        return len(os.listdir(stack.dovecot.mail_dir / RECIPIENT / "Maildir" / TEAM_FOLDER / "new"))
    except FileNotFoundError:
        return 0


def postfix_settings(config: str, size: int) -> dict[str, str]:
    """main.cf for a run: room for the reply; without postroom, the team's copy added by Postfix itself."""
    settings = {"message_size_limit": str(max(2 * size, 10_240_000))}
    if config != "postroom":
        # Keyed by the envelope sender: the customers' mails (other senders) get no copy, as with postroom.
        settings["sender_bcc_maps"] = f"inline:{{ {AGENT}@example.test={TEAM_COPY} }}"
    return settings


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


def check_postroom(stack: Stack, cfg: Config, numbers: Sequence[int]) -> list[str]:
    """Every reply was claimed and recorded."""
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
    return problems


def check_reply(stack: Stack, address: str, *, rewritten: bool) -> list[str]:
    """The newest reply in a customer's mailbox is signed for example.test (and comes from the shared address)."""
    folder = stack.dovecot.mail_dir / address / "Maildir" / "new"
    newest = max(folder.iterdir(), key=lambda p: p.stat().st_mtime)
    with newest.open("rb") as fh:
        raw = fh.read(16384).replace(b"\r\n", b"\n")
    head = re.sub(rb"\n[ \t]+", b" ", raw.split(b"\n\n", 1)[0])  # unfolded header lines
    problems = []
    if rewritten and b'\nFrom: "Meier via Support" <support@example.test>\n' not in head:
        problems.append(f"{newest.name} does not come from the shared address")
    if not re.search(rb"\nDKIM-Signature:[^\n]*\bd=example\.test;", head):
        problems.append(f"{newest.name} has no DKIM-Signature of example.test")
    return problems


# -- one run --------------------------------------------------------------------------------------------------


def run_one(config: str, size: int, args: argparse.Namespace, *, replies: int, warmup: int, warmup_size: int) -> Run:
    """One run: a fresh stack and milter, the customers' mails, the tickets claimed, warm-up and measured replies."""
    total = warmup + replies
    customers, sessions = args.customers, args.sessions
    questions = [customer_mail(i, customers) for i in range(total)]
    addresses = sorted({customer(i, customers) for i in range(total)})
    users = [MailUser(RECIPIENT), MailUser("meier@example.test"), *(MailUser(a) for a in addresses)]
    timeout = 120 + total * (0.05 + 0.2 * warmup_size / 204800) + replies * 0.2 * size / 204800
    login = Login(AGENT)
    with (
        clean_up(),
        Stack(
            users=users,
            logins=[login],
            milter="auto",
            milter_default_action="tempfail",
            main_cf=postfix_settings(config, size),
        ) as stack,
        milter_for(config, stack) as milter,
    ):
        send_all(stack.postfix.smtp_port, questions, sessions, None)
        wait_delivered(stack, [RECIPIENT], total, timeout)
        cfg = milter.cfg
        # The other milters get the same subjects; they read none of them.
        numbers = claim_tickets(stack, cfg, questions) if cfg is not None else list(range(1, total + 1))
        answers = [
            agent_reply(q, n, reply_body(warmup_size if i < warmup else size))
            for i, (q, n) in enumerate(zip(questions, numbers, strict=True))
        ]
        send_all(stack.postfix.submission_port, answers[:warmup], sessions, login)
        wait_delivered(stack, addresses, warmup, timeout)
        del questions

        def batch() -> float:
            start = time.monotonic()
            send_all(stack.postfix.submission_port, answers[warmup:], sessions, login)
            wait_delivered(stack, addresses, total, timeout)
            return time.monotonic() - start

        run = measured(config, size, replies, stack=stack, milter=milter, send=batch, quiet=args.quiet_wait)
        if cfg is not None:
            run.notes += check_postroom(stack, cfg, numbers)
        if config != "empty":
            run.notes += check_reply(stack, addresses[0], rewritten=cfg is not None)
        if (copies := team_copies(stack)) != total:
            run.notes.append(f"{copies} team copies in support's {TEAM_FOLDER} folder, expected {total}")
        run.notes += deferred_notes(stack)
        milter.expect_accepted = 2 * total  # the customers' mails and the replies
    return run


# -- report -------------------------------------------------------------------------------------------------


def table_rows(results: Results, sizes: Sequence[int], big: int) -> list[tuple[str, list[str]]]:
    """Issue 20's table: a column per configuration, then postroom against OpenDKIM."""
    configs = [c for c in CONFIGS if (c, sizes[0]) in results]

    def med(config: str, size: int, get: Callable[[Run], float | None]) -> float | None:
        values = [v for v in (get(r) for r in results.get((config, size), [])) if v is not None]
        return median(values) if values else None

    def rate(config: str, size: int) -> str:
        rates = [r.rate for r in results[(config, size)]]
        spread = f" ({min(rates):.0f}-{max(rates):.0f})" if len(rates) > 1 else ""
        return f"{median(rates):.0f}{spread}"

    def ratio(a: float | None, b: float | None, suffix: str = "") -> str:
        return "-" if a is None or not b else f"{a / b:.2f}{suffix}"

    def rss(run: Run) -> float | None:
        return None if run.peak_rss_kib is None else run.peak_rss_kib / 1024

    def row(
        label: str, get: Callable[[Run], float | None], size: int, digits: int, *, rate_row: bool = False
    ) -> tuple[str, list[str]]:
        cells = [rate(c, size) if rate_row else fmt(med(c, size, get), digits) for c in configs]
        last = ratio(med("postroom", size, get), med("opendkim", size, get), "" if rate_row else "x")
        return (f"{size_label(size)}, {label}", [*cells, last])

    rows: list[tuple[str, list[str]]] = []
    for size in sizes:
        rows.append(row("replies/s", lambda r: r.rate, size, 0, rate_row=True))
        rows.append(row("milter CPU ms/reply", lambda r: r.cpu_ms_per_message, size, 2))
        rows.append(row("peak RSS MiB", rss, size, 0))
    if big and (configs[0], big) in results:
        cpu_s = {c: med(c, big, lambda r: r.cpu_seconds) for c in configs}
        peak = {c: med(c, big, rss) for c in configs}
        cells = [f"{fmt(cpu_s[c], 2)} / {fmt(peak[c], 0)}" for c in configs]
        cpu_ratio = ratio(cpu_s.get("postroom"), cpu_s.get("opendkim"), "x")
        last = f"{cpu_ratio} / {ratio(peak.get('postroom'), peak.get('opendkim'), 'x')}"
        rows.append((f"one {size_label(big)} reply: CPU s / peak RSS MiB", [*cells, last]))
    return rows


def print_header(args: argparse.Namespace, sizes: Sequence[int], warmup: int) -> None:
    print_command_and_machine("postroom outbound benchmark")
    total = args.replies + warmup
    print(
        f"load:     {args.rounds} rounds; per run {args.replies} measured replies after {warmup} warm-up replies, "
        f"{args.sessions} parallel\n"
        f"          SMTP sessions to the submission port (AUTH PLAIN as {AGENT}, one reply per connection, Python\n"
        f"          smtplib), reply bodies of {', '.join(f'{s} B' for s in sizes)}. Before them {total} customer mails "
        f"from {args.customers}\n"
        f"          customers through the MX port open one ticket each, claimed for {AGENT} (RedisStore.claim)."
    )
    if args.big:
        print(
            f"          Then per round and configuration one run with a single {args.big} B reply (warm-up: one 2 KB)."
        )
    print(
        "          Each reply answers its own ticket (In-Reply-To/References, [Support #n]): postroom claims the\n"
        "          ticket its sender owns, rewrites From/Reply-To/envelope sender/Subject, adds the team's copy\n"
        f"          ({TEAM_COPY}) and DKIM-signs with the example key; OpenDKIM signs with the same key; the\n"
        "          empty milter accepts the reply unchanged. Without postroom, Postfix adds the same team copy\n"
        f"          (sender_bcc_maps: {AGENT}@example.test -> {TEAM_COPY}), so every configuration delivers each\n"
        "          reply twice (customer + team folder, checked after each run)."
    )
    print(
        "setup:    a fresh testbed stack per run (Postfix MX + SASL submission -> LMTP -> Dovecot Maildir, private\n"
        "          Redis), milter on a unix socket, milter_default_action = tempfail; postroom runs `python -m\n"
        "          postroom milter` with the example postroom.toml pointed at the stack's Redis and a SQLite\n"
        "          history (log level info). Finished = every reply in its customer's Maildir/new and Postfix's\n"
        "          queues empty; time from the first measured connection. Milter CPU = utime+stime of the milter\n"
        "          process and its workers over the measured replies (history writes included); peak RSS = VmHWM.\n"
        "          Load generator and all services share the CPUs; each measured batch starts once the CPUs were\n"
        f"          <= 15% busy for a second (waiting at most {args.quiet_wait:g} s)."
    )
    print(flush=True)


def run_line(run: Run, round_no: int) -> str:
    return (
        f"{size_label(run.size):>7}  {CONFIG_TITLES[run.config]:<16} #{round_no} {run.messages} replies in "
        f"{run.seconds:7.2f} s = {run.rate:8.1f} replies/s, milter CPU {fmt(run.cpu_ms_per_message, 2)} ms/reply, "
        f"peak RSS {fmt(run.peak_rss_kib, 0)} KiB; machine {run.busy_before:.0f}% busy before, "
        f"{run.busy_during:.0f}% during"
    )


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[int], int]:
    """The options, the reply sizes and the warm-up count; exits with a usage error on bad ones."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replies", type=int, default=1000, help="measured replies per run (default 1000)")
    parser.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions (default 10)")
    parser.add_argument(
        "--sizes", type=parse_sizes, default=[2048, 204800], help="reply body sizes in bytes (default 2048,204800)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up replies before each run (default replies/10, 20..200)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument("--big", type=int, default=BIG, help=f"one reply of this size per round (default {BIG}; 0: no)")
    parser.add_argument("--customers", type=int, default=10, help="customer mailboxes the replies go to (default 10)")
    parser.add_argument(
        "--configs",
        type=lambda text: parse_configs(text, CONFIGS),
        default=list(CONFIGS),
        help=f"of {','.join(CONFIGS)} (default: all)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=30.0, help="seconds to wait for a quiet machine before a batch (30)"
    )
    args = parser.parse_args(argv)
    if min(args.replies, args.sessions, args.customers, args.rounds) < 1 or args.big < 0:
        parser.error("--replies, --sessions, --customers and --rounds must be at least 1")
    sizes: list[int] = args.sizes
    warmup: int = args.warmup if args.warmup is not None else max(20, min(200, args.replies // 10))
    if os.geteuid() != 0:
        parser.error("the testbed needs root (private Postfix and Dovecot)")
    for var in ENV_OVERRIDES:
        os.environ.pop(var, None)
    return args, sizes, warmup


def main(argv: Sequence[str] | None = None) -> int:
    args, sizes, warmup = parse_args(argv)
    print_header(args, sizes, warmup)

    def one(config: str, size: int) -> Run:
        if size == args.big:
            return run_one(config, size, args, replies=1, warmup=1, warmup_size=2048)
        return run_one(config, size, args, replies=args.replies, warmup=warmup, warmup_size=size)

    results = run_rounds(
        [*sizes, *([args.big] if args.big else [])],
        args.rounds,
        args.configs,
        titles=CONFIG_TITLES,
        run_one=one,
        describe=run_line,
    )
    if isinstance(results, int):
        return results
    heads = [CONFIG_TITLES[c] for c in CONFIGS if (c, sizes[0]) in results] + ["postroom / OpenDKIM"]
    rows = table_rows(results, sizes, args.big)
    print()
    print(text_grid("reply body", heads, rows))
    print()
    print("Markdown (for docs/performance.md):")
    print()
    print(markdown_grid("reply body", heads, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
