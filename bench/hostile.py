"""CPU per hostile mail: is postroom's inbound pipeline linear in the length of a subject and the size of a body?

Usage: ``.venv/bin/python bench/hostile.py [--rounds R]``

Runs the inbound pipeline (``pipeline.process``: threading, rules, auto-reply planning, edits) in this process on the
in-memory store, so the figures are postroom's own CPU per mail without Postfix, Redis or the milter protocol
around it (bench/inbound.py measures those).  Every figure is the median of R rounds, printed beside a baseline
from the same run:

- subjects of 1k, 16k and 64k characters (Cyrillic, arriving RFC 2047-encoded, needing a token), against a
  40-character subject; and the encoder alone, old (``email.header.Header.encode(maxlinelen=0)``, what postroom
  used before issue 15) against new (``mime.encode_header_value``), at 1k and 16k characters (the old one at 64k
  would take minutes);
- bodies of 2 KB, 2 MB and 25 MB read by a rule (``body_contains``), and as a delivery report (parsed for the
  Message-ID it returns), against the same mail whose body no rule reads.

Linear means: ms per 1,000 characters (or per MB) stays flat as the size grows.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from email.header import Header

from postroom.autoreply import load_templates
from postroom.config import Config, example_config_path, load_config, parse_config
from postroom.mime import encode_header_value
from postroom.parts import Parts
from postroom.pipeline import Message, process
from postroom.rules import MemoryAssignmentState, Ruleset, parse_rules
from postroom.rules.loader import context_for
from postroom.store.memory import MemoryStore
from postroom.verdict import Envelope

SUPPORT = "support@example.test"
RULES = """
[[rule]]
name = "refunds"
body_contains = "refund"
tag = "billing"
"""


def config() -> Config:
    data = load_config(example_config_path(), environ={}).model_dump()
    data["autoreply"] = {**data["autoreply"], "acknowledge": True, "daily_cap": 1000}
    return parse_config(data, environ={})


def median_ms(run: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.process_time()
        run()
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def subject_of(chars: int) -> str:
    return ("Привет мир " * (chars // 11 + 1))[:chars].strip()


def mail(subject: str, body: bytes = b"Hello\r\n", content_type: str = "text/plain") -> Message:
    raw_subject = Header(subject, "utf-8").encode(maxlinelen=76) if not subject.isascii() else subject
    headers = [
        ("From", "<alice@customer.test>"),
        ("To", SUPPORT),
        ("Subject", raw_subject),
        ("Message-ID", f"<{time.monotonic_ns()}@customer.test>"),
        ("Content-Type", content_type),
    ]
    return Message(Envelope("<alice@customer.test>", [f"<{SUPPORT}>"]), headers, body=lambda: body)


def report_body(size: int) -> bytes:
    returned = b"Message-ID: <gone@customer.test>\r\n\r\n" + b"x" * 76 + b"\r\n"
    pad = (b"y" * 998 + b"\r\n") * max(0, (size - 600) // 1000)
    return (
        b"--b\r\nContent-Type: text/plain\r\n\r\nundelivered\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Final-Recipient: rfc822; alice@customer.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + returned + pad + b"--b--\r\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    cfg = config()
    templates = load_templates(cfg)
    plain = parse_rules("", "none.toml", context_for(cfg, templates))
    reading = parse_rules(RULES, "rules.toml", context_for(cfg, templates))
    state = MemoryAssignmentState()

    def run(message: Message, rules: Ruleset = plain) -> Callable[[], object]:
        return lambda: process(message, Parts(cfg, MemoryStore(), rules=rules, templates=templates, assign=state), 1.0)

    print(f"postroom inbound pipeline, CPU ms per mail (median of {rounds}), in-process, in-memory store\n")
    base = median_ms(run(mail(subject_of(40))), rounds)
    print(f"{'subject':<28}{'ms/mail':>10}{'ms per 1k chars':>18}{'x baseline':>12}")
    print(f"{'40 chars (baseline)':<28}{base:>10.2f}{'':>18}{1.0:>12.1f}")
    for chars in (1_000, 16_000, 64_000):
        ms = median_ms(run(mail(subject_of(chars))), rounds)
        print(f"{f'{chars:,} chars':<28}{ms:>10.2f}{(ms - base) / chars * 1000:>18.3f}{ms / base:>12.1f}")

    print(f"\n{'encoder alone':<28}{'old ms':>10}{'new ms':>10}{'old / new':>12}")
    for chars in (1_000, 16_000):
        text = "[Support #1] " + subject_of(chars)
        old = median_ms(functools.partial(Header(text, "utf-8").encode, maxlinelen=0), 1)
        new = median_ms(functools.partial(encode_header_value, text), rounds)
        print(f"{f'{chars:,} chars':<28}{old:>10.1f}{new:>10.2f}{old / new:>12.0f}")
    new64 = median_ms(lambda: encode_header_value("[Support #1] " + subject_of(64_000)), rounds)
    print(f"{'64,000 chars':<28}{'(not run)':>10}{new64:>10.2f}{'':>12}")

    print(f"\n{'body':<14}{'not read':>10}{'rule reads':>12}{'report':>10}{'ms/MB read':>12}{'ms/MB report':>14}")
    for size, label in ((2_000, "2 KB"), (2_000_000, "2 MB"), (25_000_000, "25 MB")):
        body = (b"please refund me " * (size // 17 + 1))[:size]
        skipped = median_ms(run(mail("Hello", body)), rounds)
        read = median_ms(run(mail("Hello", body), reading), rounds)
        report = median_ms(run(mail("Hello", report_body(size), "multipart/report; boundary=b")), rounds)
        mb = size / 1e6
        print(f"{label:<14}{skipped:>10.2f}{read:>12.2f}{report:>10.2f}{read / mb:>12.1f}{report / mb:>14.1f}")


if __name__ == "__main__":
    main()
