"""Memory of large mails: the milter's peak RSS for one and for four concurrent 30 MB mails, inbound and outbound.

Usage: ``.venv/bin/python bench/memory.py [--size BYTES] [--configs empty,opendkim,postroom]``

Inbound: customers send mails of ``--size`` bytes to support@example.test through the MX port; postroom runs the
example config with the example rules (src/postroom/examples/rules.toml), whose body conditions make it read every body.
Outbound: the agent meier sends mails of that size from support@example.test to a customer through the submission
port (AUTH); postroom opens a ticket, rewrites and DKIM-signs each; OpenDKIM signs them with the same key.  Each
case runs on a fresh stack and milter (bench/runloop.py), so the peak (VmHWM of the milter and its worker
processes) is that case's alone; "at rest" is the milter's RSS after start-up, before any mail.

The target (issues 15 and 20): a large mail costs the milter at most its own size once, plus a few MB, on both
paths; the milter at rest <= 40 MiB.
"""

from __future__ import annotations

import argparse
import os
import re
import smtplib
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from postroom.config import ENV_OVERRIDES, example_config_path
from postroom_testbed import Login, MailUser, Stack
from runloop import (
    BenchError,
    clean_up,
    fmt,
    interrupts_as_keyboard_interrupt,
    markdown_grid,
    milter_for,
    peak_rss_kib,
    print_command_and_machine,
    progress,
    size_label,
    status_kib,
    text_grid,
)

SUPPORT = "support@example.test"
CUSTOMER = "carol@customer.test"
AGENT = "meier"
SIZE = 30_000_000
CONFIGS = ("empty", "opendkim", "postroom")
TITLES = {"empty": "empty milter", "opendkim": "OpenDKIM (signs)", "postroom": "postroom"}
EXAMPLE_RULES = Path(example_config_path()).parent / "rules.toml"


def big_mail(sender: str, rcpt: str, size: int, number: int) -> bytes:
    head = (
        f"From: {sender}\r\nTo: {rcpt}\r\nSubject: A large mail {number}\r\n"
        f"Message-ID: <big{number}.{time.time_ns()}@bench.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    line = b"A line of a large mail, as a long log file or a pasted table makes it.  \r\n"
    return head.encode() + line * (size // len(line))


def send(port: int, mails: Sequence[bytes], sender: str, rcpt: str, login: Login | None) -> None:
    failures: list[str] = []

    def one(data: bytes) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=600) as smtp:
                if login is not None:
                    smtp.login(login.name, login.password)
                smtp.sendmail(sender, [rcpt], data)
        except (smtplib.SMTPException, OSError) as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=one, args=(m,)) for m in mails]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise BenchError(f"{len(failures)} of {len(mails)} large mails were refused: {failures[0]}")


def one_case(config: str, direction: str, count: int, size: int) -> tuple[int, int]:
    """(RSS at rest, peak RSS) in KiB of the milter for ``count`` concurrent mails of ``size`` bytes."""
    limit = {"message_size_limit": str(2 * size), "mailbox_size_limit": "0"}
    users = [MailUser(SUPPORT), MailUser(CUSTOMER), MailUser("meier@example.test")]
    login = Login(AGENT)
    rules = {"rules_file": str(EXAMPLE_RULES)}
    with (
        clean_up(),
        Stack(users=users, logins=[login], milter="auto", milter_default_action="tempfail", main_cf=limit) as stack,
        # Inbound, the example rules' body conditions make postroom take the whole body instead of skipping it.
        milter_for(config, stack, rules if direction == "inbound" else None) as milter,
    ):
        pid = milter.daemon.pid if milter.daemon is not None else None
        if milter.daemon is None or pid is None:
            raise BenchError("the milter did not start")
        time.sleep(1.0)
        rest = status_kib(pid, "VmRSS")
        if direction == "inbound":
            mails = [big_mail(CUSTOMER, SUPPORT, size, i) for i in range(count)]
            send(stack.postfix.smtp_port, mails, CUSTOMER, SUPPORT, None)
        else:
            mails = [big_mail(f"Support <{SUPPORT}>", CUSTOMER, size, i) for i in range(count)]
            send(stack.postfix.submission_port, mails, SUPPORT, CUSTOMER, login)
        del mails
        # Every mail was queued (250); an empty queue means each was delivered (or bounced, which the log tells).
        deadline = time.monotonic() + 300
        while not stack.postfix.queue_empty():
            if time.monotonic() > deadline:
                raise BenchError(f"{config} {direction}: not delivered in time\n{stack.postfix.log_tail()}")
            time.sleep(0.1)
        if re.search(r"status=(bounced|deferred)", stack.postfix.log_text()):
            raise BenchError(f"{config} {direction}: a mail was not delivered\n{stack.postfix.log_tail()}")
        if not milter.daemon.is_running():
            raise BenchError(f"{config}: the milter died")
        return rest, peak_rss_kib(pid)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=SIZE, help=f"bytes per mail (default {SIZE})")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"of {','.join(CONFIGS)} (default: all)")
    args = parser.parse_args(argv)
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    if os.geteuid() != 0:
        parser.error("the testbed needs root (private Postfix and Dovecot)")
    for var in ENV_OVERRIDES:
        os.environ.pop(var, None)
    print_command_and_machine("postroom memory of large mails")
    print(f"load:     one, then four concurrent mails of {args.size} B per case; fresh stack and milter per case\n")
    cases = [("inbound", 1), ("inbound", 4), ("outbound", 1), ("outbound", 4)]
    found: dict[tuple[str, str, int], tuple[int, int]] = {}
    with interrupts_as_keyboard_interrupt():
        try:
            for direction, count in cases:
                for config in configs:
                    if config == "opendkim" and direction == "inbound":
                        continue  # a signer has nothing to do with inbound mail
                    progress(f"... {direction}, {count} x {size_label(args.size)}, {TITLES[config]}")
                    found[(config, direction, count)] = rest, peak = one_case(config, direction, count, args.size)
                    print(
                        f"{direction:8} {count} x {size_label(args.size)}  {TITLES[config]:<17} at rest "
                        f"{rest / 1024:6.1f} MiB, peak {peak / 1024:7.1f} MiB",
                        flush=True,
                    )
        except KeyboardInterrupt:
            print("interrupted; every service of the benchmark has been stopped", file=sys.stderr)
            return 130
        except BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    mib = args.size / 1024 / 1024
    rows: list[tuple[str, list[str]]] = []
    for direction, count in cases:
        cells = []
        for config in configs:
            hit = found.get((config, direction, count))
            cells.append("-" if hit is None else f"{fmt(hit[1] / 1024, 0)} (+{fmt((hit[1] - hit[0]) / 1024, 0)})")
        rows.append((f"{direction}, {count} x {size_label(args.size)}: peak MiB (+ over rest)", cells))
    target = [f"<= {fmt(count * mib, 0)} + a few MB over rest" for _, count in cases]
    rows = [(name, [*cells, goal]) for (name, cells), goal in zip(rows, target, strict=True)]
    rest_cells = [fmt(min(v[0] for k, v in found.items() if k[0] == c) / 1024, 0) for c in configs]
    rows.append(("milter at rest MiB", [*rest_cells, "postroom <= 40"]))
    heads = [TITLES[c] for c in configs] + ["target"]
    print()
    print(text_grid("case", heads, rows))
    print()
    print(markdown_grid("case", heads, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
