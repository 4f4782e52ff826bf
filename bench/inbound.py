"""Inbound throughput: Postfix alone, Postfix + an empty pymilter milter, Postfix + postroom.

Usage: ``.venv/bin/python bench/inbound.py [--messages N] [--sessions S] [--sizes 2048,204800] [--rounds R]
[--configs none,empty,edits,postroom]``

Configurations: ``none`` (Postfix alone), ``empty`` (bench/empty_milter.py), ``edits`` (the same empty milter making
the five header edits postroom makes for a new ticket, to tell Postfix's cost of applying them apart from postroom's
own), ``aempty`` (bench/asyncio_empty_milter.py: the milter protocol on one asyncio thread instead of libmilter's
thread per connection), ``floor`` (the same empty milter opening a ticket per mail with one Redis script, making the
five header edits and appending a history line: the least any milter that tickets mail in Redis does, so how close
to the empty milter postroom could come at all), ``postroom`` (the example config as shipped) and ``postroom-w0`` /
``postroom-w1`` (the same with ``[milter] workers = 0`` or ``1``: the pipeline inside the milter process or in one
worker process), and ``postroom-base`` (the example config run by the postroom in ``--base-src DIR``, e.g. main's
code from ``git archive main src | tar -x -C /tmp/base``: a change and the code before it in the same run); the
default runs none, empty and postroom, and adds postroom-base when ``--base-src`` is given.

For every message size, in each of ``--rounds`` rounds (default 3), every configuration runs once in turn: a fresh
private stack (postroom_testbed.Stack: Postfix, Dovecot, Redis in one temp dir) is started, Postfix's
``smtp-source`` sends a short warm-up and then the measured batch to support@example.test over SMTP, and the run
counts as finished when Postfix's queues are empty and Dovecot has stored every message (files in the mailbox's Maildir
``new/``). Throughput is measured messages divided by the time from starting smtp-source to that moment. For the
milters the milter's CPU time (utime + stime of all its threads and of postroom's worker processes,
/proc/PID/stat) is read before and after the measured batch; after the last delivery the benchmark waits until
the milter's CPU time stops growing, so postroom's background history writer is included. Peak RSS is VmHWM of
the milter process plus its workers' (fresh processes per run). Machine CPU is the busy time of all CPUs
(/proc/stat) from the start of the batch until the milter settled, per message: what the whole mail path costs,
Postfix, Dovecot, Redis and the load generator included. The tables
report medians over the rounds and the range; one run on a shared 2-CPU machine varies by 10-20% in throughput.

Milter runs use ``milter_default_action = tempfail``: a milter that is not reachable makes the load fail
loudly instead of silently measuring Postfix without it. Each run is checked: the empty milter reports how many
messages it accepted, postroom's Redis ticket counter and SQLite history must account for every message, and a
delivered message must carry X-Postroom-Ticket.

The load generator, Postfix, Dovecot, Redis and the milter all share this machine's CPUs; figures are for
comparing the configurations with each other on one machine, not absolute capacity.

The milter runs the postroom that this interpreter imports (the header prints where from). To measure one commit
while the work tree changes: ``git archive HEAD src docs | tar -x -C /tmp/snap`` and run with
``PYTHONPATH=/tmp/snap/src``. bench/profile_postroom.py shows where postroom's CPU goes (py-spy).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis

from empty_milter import FLOOR_KEYS
from postroom.config import ENV_OVERRIDES, Config
from postroom_testbed import MailUser, Stack, log_tail
from runloop import (
    BASE_CONFIG,
    BASE_SRC_VAR,
    BenchError,
    Results,
    Run,
    clean_up,
    deferred_notes,
    fmt,
    latencies,
    markdown_table,
    measured,
    median,
    milter_for,
    parse_configs,
    parse_sizes,
    percentile,
    print_command_and_machine,
    run_rounds,
    size_label,
    text_table,
)

SMTP_SOURCE = "/usr/sbin/smtp-source"
SENDER = "alice@customer.test"
RECIPIENT = "support@example.test"
CONFIGS = (
    "none",
    "empty",
    "edits",
    "aempty",
    "floor",
    "postroom-base",
    "postroom",
    "postroom-aio",
    "postroom-w0",
    "postroom-w1",
)
DEFAULT_CONFIGS = ("none", "empty", "postroom")
CONFIG_TITLES = {
    "none": "no milter",
    "empty": "empty milter",
    "edits": "empty+edits",
    "aempty": "asyncio empty",
    "floor": "floor (ticket milter)",
    "postroom-base": "postroom (base)",
    "postroom": "postroom",
    "postroom-aio": "postroom asyncio",
    "postroom-w0": "postroom w=0",
    "postroom-w1": "postroom w=1",
}
# Issue 20's targets, relative to the empty milter of the same run (the machine is shared and its speed varies).
TARGET_RATIO = 0.95
TARGET_CPU_FACTOR = 2.0
TARGET_P99_MS = 5.0
HISTORY_WAIT = 60.0  # seconds the history may take to catch up with the last delivery
_POLL = 0.005  # after smtp-source exited: how precisely the end of a run is seen
_POLL_SENDING = 0.05


# -- load ---------------------------------------------------------------------------------------------------


def smtp_source_command(port: int | str, messages: int, sessions: int, size: int | str) -> list[str]:
    return [
        SMTP_SOURCE,
        "-s", str(sessions),
        "-m", str(messages),
        "-l", str(size),
        "-f", SENDER,
        "-t", RECIPIENT,
        f"127.0.0.1:{port}",
    ]  # fmt: skip


def maildir_new(stack: Stack) -> Path:
    # Dovecot's home for a user is <mail_dir>/<address> (testbed's userdb default_fields), mail_location maildir.
    return stack.dovecot.mail_dir / RECIPIENT / "Maildir" / "new"


def delivered_count(stack: Stack) -> int:
    try:
        return len(os.listdir(maildir_new(stack)))
    except FileNotFoundError:
        return 0


def send_batch(stack: Stack, messages: int, sessions: int, size: int, *, expect_total: int, timeout: float) -> float:
    """Run smtp-source and wait until Postfix's queues are empty and Dovecot holds ``expect_total`` messages.

    Returns the seconds from starting smtp-source until then.
    """
    cmd = smtp_source_command(stack.postfix.smtp_port, messages, sessions, size)
    out_path = stack.root / "smtp-source.log"
    with out_path.open("ab") as out:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    deadline = start + timeout
    try:
        # While smtp-source sends, only its exit is watched: listing a Maildir of thousands of files every few
        # milliseconds would take CPU from the mail path being measured.
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise BenchError(f"smtp-source still running after {timeout:.0f}s\n{stack.postfix.log_tail()}")
            time.sleep(_POLL_SENDING)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(
            f"{shlex.join(cmd)} exited with status {proc.returncode}:\n{log_tail(out_path)}\n"
            f"--- postfix.log ---\n{stack.postfix.log_tail()}"
        )
    wait_delivered(stack, expect_total, deadline)
    return time.monotonic() - start


def wait_delivered(stack: Stack, expect_total: int, deadline: float) -> None:
    """Until Postfix's queues are empty and Dovecot holds ``expect_total`` messages."""
    while True:
        count = delivered_count(stack)
        if count >= expect_total and stack.postfix.queue_empty():
            break
        if time.monotonic() > deadline:
            raise BenchError(
                f"not finished in time: {count}/{expect_total} delivered, deferred {stack.postfix.deferred_count()}, "
                f"queue ids {len(stack.postfix.queue_ids())}\n--- postfix.log ---\n{stack.postfix.log_tail()}"
                f"\n--- dovecot.log ---\n{log_tail(stack.dovecot.log_path)}"
            )
        time.sleep(_POLL)
    if count != expect_total:
        raise BenchError(f"Dovecot holds {count} messages, expected {expect_total}")


def check_postroom(stack: Stack, cfg: Config, expect_total: int) -> list[str]:
    """Every message went through postroom: tickets in Redis, rows in the history, headers on the mail."""
    problems: list[str] = []
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    try:
        seq = client.get(f"{cfg.redis.key_prefix}:{{{RECIPIENT}}}:seq")
    finally:
        client.close()
    if seq is None or int(seq) != expect_total:
        problems.append(f"Redis ticket counter is {seq!r}, expected {expect_total} (one new ticket per message)")
    db_path = cfg.database.url.removeprefix("sqlite:///")
    # The history is written behind the mail (spooled, then a background thread writes it): wait for it to catch
    # up with the last delivery, and say so when that took a while.
    started = time.monotonic()
    while True:
        con = sqlite3.connect(db_path)
        try:
            rows, ids = con.execute("SELECT count(*), count(DISTINCT message_id) FROM messages").fetchone()
        finally:
            con.close()
        if rows >= expect_total or time.monotonic() - started > HISTORY_WAIT:
            break
        time.sleep(0.2)
    lag = time.monotonic() - started
    if lag > 1.0:
        problems.append(f"the history caught up {lag:.1f} s after the last delivery")
    if rows != expect_total:
        problems.append(f"history has {rows} message rows, expected {expect_total}")
    if ids != expect_total:
        problems.append(f"history has {ids} distinct Message-IDs for {expect_total} messages")
    newest = max(maildir_new(stack).iterdir(), key=lambda p: p.stat().st_mtime)
    head = newest.read_bytes()[:8192].split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    if b"\nX-Postroom-Ticket:" not in head:
        problems.append(f"{newest.name} has no X-Postroom-Ticket header")
    return problems


def tickets(config: str) -> bool:
    """The configuration opens a ticket per mail (the floor and every postroom), so the targets apply to it."""
    return config == "floor" or config.startswith("postroom")


def check_floor(stack: Stack, expect_total: int) -> list[str]:
    """The floor milter opened a ticket and wrote a history line for every message."""
    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    try:
        seq = client.get(FLOOR_KEYS[0])
    finally:
        client.close()
    problems = [] if seq == str(expect_total) else [f"floor's ticket counter is {seq!r}, expected {expect_total}"]
    lines = (stack.root / "empty-milter" / "history.jsonl").read_bytes().count(b"\n")
    if lines != expect_total:
        problems.append(f"floor's history has {lines} lines, expected {expect_total}")
    return problems


def run_one(config: str, size: int, args: argparse.Namespace, warmup: int) -> Run:
    """One run: a fresh stack and milter, warm-up, the measured smtp-source batch, then the latency batch."""
    messages, sessions = args.messages, args.sessions
    total = warmup + messages + args.latency_messages
    timeout = 120 + total * (0.05 + 0.2 * size / 204800)
    users = [MailUser(RECIPIENT), MailUser(SENDER)]
    milter_spec = "auto" if config != "none" else None
    with (
        clean_up(),
        Stack(users=users, milter=milter_spec, milter_default_action="tempfail") as stack,
        milter_for(config, stack) as milter,
    ):
        send_batch(stack, warmup, sessions, size, expect_total=warmup, timeout=timeout)

        def batch() -> float:
            return send_batch(stack, messages, sessions, size, expect_total=warmup + messages, timeout=timeout)

        run = measured(config, size, messages, stack=stack, milter=milter, send=batch, quiet=args.quiet_wait)
        if args.latency_messages:
            port = stack.postfix.smtp_port
            run.latencies_ms = latencies(port, args.latency_messages, sessions, size, sender=SENDER, rcpt=RECIPIENT)
            wait_delivered(stack, total, time.monotonic() + timeout)
        if milter.cfg is not None:
            run.notes += check_postroom(stack, milter.cfg, total)
        if config == "floor":
            run.notes += check_floor(stack, total)
        run.notes += deferred_notes(stack)
        milter.expect_accepted = total
    return run


# -- report -------------------------------------------------------------------------------------------------


def table_rows(results: Results, sizes: Sequence[int]) -> list[tuple[str, list[str]]]:
    """Medians over the rounds (each round ran every configuration once, in turn)."""

    def per_size(get: Callable[[int], str]) -> list[str]:
        return [get(size) for size in sizes]

    def rate(config: str, size: int) -> float:
        return median([r.rate for r in results[(config, size)]])

    def spread(config: str, size: int) -> str:
        rates = [r.rate for r in results[(config, size)]]
        return f"{min(rates):.0f}-{max(rates):.0f}"

    def ratio(a: str, b: str, size: int) -> str:
        return fmt(rate(a, size) / rate(b, size), 2)

    def ratios(a: str, b: str, size: int) -> str:
        # Round by round: both runs of a round saw the same machine state.
        pairs = zip(results[(a, size)], results[(b, size)], strict=True)
        values = [x.rate / y.rate for x, y in pairs]
        return f"{min(values):.2f}-{max(values):.2f}"

    def cpu(config: str, size: int) -> str:
        values = [r.cpu_ms_per_message for r in results[(config, size)]]
        return fmt(median([v for v in values if v is not None]), 2)

    def machine(config: str, size: int) -> str:
        return fmt(median([r.machine_ms_per_message for r in results[(config, size)]]), 2)

    def redis_cpu(config: str, size: int) -> str:
        return fmt(median([r.redis_ms_per_message for r in results[(config, size)]]), 3)

    def rss(config: str, size: int) -> str:
        kib = max(r.peak_rss_kib or 0 for r in results[(config, size)])
        return fmt(kib / 1024 if kib else None)

    configs = [c for c in CONFIGS if (c, sizes[0]) in results]
    milters = [c for c in configs if c != "none"]
    postrooms = [c for c in configs if c.startswith("postroom")]
    ticketing = [c for c in configs if tickets(c)]

    def each(get: Callable[[str, int], str], config: str) -> list[str]:
        return [get(config, size) for size in sizes]

    def rate_text(config: str, size: int) -> str:
        return fmt(rate(config, size))

    rows: list[tuple[str, list[str]]] = []
    rows += [(f"msgs/s, {CONFIG_TITLES[c]}", each(rate_text, c)) for c in configs]
    rows += [(f"msgs/s range over rounds, {CONFIG_TITLES[c]}", each(spread, c)) for c in configs]
    if "empty" in configs:
        for c in ticketing:
            title = CONFIG_TITLES[c]
            rows.append((f"ratio {title} / empty milter (msgs/s)", [ratio(c, "empty", s) for s in sizes]))
            rows.append((f"ratio {title} / empty, per round (range)", [ratios(c, "empty", s) for s in sizes]))
    if "floor" in configs:
        for c in postrooms:
            title = CONFIG_TITLES[c]
            rows.append((f"ratio {title} / floor (msgs/s)", [ratio(c, "floor", s) for s in sizes]))
    if "edits" in configs and "empty" in configs:
        rows.append(("ratio empty+edits / empty milter (msgs/s)", per_size(lambda s: ratio("edits", "empty", s))))
    if "empty" in configs and "none" in configs:
        rows.append(("ratio empty milter / no milter (msgs/s)", per_size(lambda s: ratio("empty", "none", s))))
    rows += [(f"milter CPU ms/message, {CONFIG_TITLES[c]}", each(cpu, c)) for c in milters]
    rows += [(f"Redis CPU ms/message, {CONFIG_TITLES[c]}", each(redis_cpu, c)) for c in ticketing]
    rows += [(f"machine CPU ms/message, {CONFIG_TITLES[c]}", each(machine, c)) for c in configs]
    rows += [(f"milter peak RSS MiB, {CONFIG_TITLES[c]}", each(rss, c)) for c in milters]

    def latency(pct: int) -> Callable[[str, int], str]:
        return lambda config, size: fmt(percentile(pooled(results, config, size), pct), 2)

    if any(r.latencies_ms for runs in results.values() for r in runs):
        rows += [(f'latency p50 ms ("." to 250), {CONFIG_TITLES[c]}', each(latency(50), c)) for c in configs]
        rows += [(f'latency p99 ms ("." to 250), {CONFIG_TITLES[c]}', each(latency(99), c)) for c in configs]
    return rows


def group_table(results: Results, size: int) -> str:
    """Where the machine's CPU went, by process group and configuration: medians over the rounds, ms/message."""
    configs = [c for c in CONFIGS if (c, size) in results]
    groups = sorted({g for c in configs for r in results[(c, size)] for g in r.cpu_by_group})

    def ms(config: str, group: str) -> float:
        runs = results[(config, size)]
        return median([r.cpu_by_group.get(group, 0.0) * 1000 / r.messages for r in runs])

    shown = [g for g in groups if max(ms(c, g) for c in configs) >= 0.01]
    head = f"CPU ms/message by process, {size_label(size)}"
    first = max(len(head), *(len(g) for g in shown), len("machine (/proc/stat)"))
    widths = [max(len(CONFIG_TITLES[c]), 6) for c in configs]

    def line(name: str, cells: Sequence[str]) -> str:
        return "  ".join([name.ljust(first), *(cell.rjust(w) for cell, w in zip(cells, widths, strict=True))])

    lines = [line(head, [CONFIG_TITLES[c] for c in configs])]
    for g in sorted(shown, key=lambda g: -ms(configs[-1], g)):
        lines.append(line(g, [f"{ms(c, g):.2f}" for c in configs]))
    lines.append(line("sum of these", [f"{sum(ms(c, g) for g in groups):.2f}" for c in configs]))
    machine = [median([r.machine_ms_per_message for r in results[(c, size)]]) for c in configs]
    lines.append(line("machine (/proc/stat)", [f"{v:.2f}" for v in machine]))
    return "\n".join(lines)


def pooled(results: Results, config: str, size: int) -> list[float]:
    return [ms for r in results[(config, size)] for ms in r.latencies_ms]


def target_line(results: Results, sizes: Sequence[int], config: str = "postroom") -> str:
    """Issue 20's inbound targets, each against the empty milter of the same run."""
    met = True
    parts = []
    for size in sizes:
        ratio = median([r.rate for r in results[(config, size)]]) / median([r.rate for r in results[("empty", size)]])
        cpu = median([r.cpu_ms_per_message or 0.0 for r in results[(config, size)]])
        empty_cpu = median([r.cpu_ms_per_message or 0.0 for r in results[("empty", size)]])
        ok = ratio >= TARGET_RATIO and cpu <= TARGET_CPU_FACTOR * empty_cpu
        text = f"{size_label(size)}: ratio {ratio:.2f}, CPU {cpu / max(empty_cpu, 1e-9):.1f}x"
        p99, empty_p99 = percentile(pooled(results, config, size), 99), percentile(pooled(results, "empty", size), 99)
        if p99 is not None and empty_p99 is not None:
            ok = ok and p99 - empty_p99 <= TARGET_P99_MS
            text += f", p99 {p99 - empty_p99:+.1f} ms"
        met = met and ok
        parts.append(f"{text} {'ok' if ok else 'missed'}")
    verdict = "MET" if met else "NOT MET"
    title = CONFIG_TITLES[config]
    return (
        f"target (medians: {title}/empty msgs/s >= {TARGET_RATIO}, milter CPU <= {TARGET_CPU_FACTOR:g}x the empty "
        f"milter's, p99 latency within {TARGET_P99_MS:g} ms of it): {verdict} ({'; '.join(parts)})"
    )


def print_header(args: argparse.Namespace, sizes: Sequence[int], warmup: int) -> None:
    print_command_and_machine("postroom inbound benchmark")
    if args.base_src is not None:
        print(f"base:     postroom (base) runs the postroom in {args.base_src.resolve()}")
    print(
        f"load:     {args.messages} measured messages per run after {warmup} warm-up messages, "
        f"{args.sessions} parallel SMTP sessions (one message per connection), "
        f"sizes {', '.join(f'{s} B' for s in sizes)} of body"
    )
    template = smtp_source_command("PORT", args.messages, args.sessions, "SIZE")
    print(f"          {shlex.join(template)}  (warm-up: -m {warmup}; PORT: the stack's SMTP port)")
    print(
        "          smtp-source writes From, To, Date and a distinct Message-Id <pid.fd.counter@host> per message, but\n"
        "          no Subject and no References/In-Reply-To: postroom opens a new ticket for every message (the\n"
        "          common case of new customer mail); follow-ups (one more Redis read) are not measured here."
    )
    print(
        f"latency:  after the measured batch, {args.latency_messages} more mails of the same kind from this program\n"
        f'          ({args.sessions} sessions, one mail per connection): ms from sending the final "." to the 250\n'
        "          reply, pooled over the rounds; p50 and p99 per configuration."
    )
    print(
        "setup:    a fresh testbed stack per run (Postfix -> LMTP -> Dovecot Maildir, private Redis), milter on a\n"
        "          unix socket, milter_default_action = tempfail; postroom runs `python -m postroom milter` with\n"
        "          the example postroom.toml pointed at the stack's Redis and a SQLite history (log level info).\n"
        "          Finished = Postfix queues empty and all messages in Maildir/new; time from starting smtp-source.\n"
        "          Milter CPU = utime+stime of the milter process and its worker processes over the measured batch\n"
        "          (including postroom's background history writes); peak RSS = VmHWM, summed over those\n"
        "          processes. Load generator and all services share the CPUs;\n"
        "          each measured batch starts once the CPUs were <= 15% busy for a second "
        f"(waiting at most {args.quiet_wait:g} s)."
    )
    print(flush=True)


def run_line(run: Run, round_no: int) -> str:
    line = (
        f"{size_label(run.size):>7}  {CONFIG_TITLES[run.config]:<13} #{round_no} {run.messages} messages in "
        f"{run.seconds:7.2f} s = {run.rate:8.1f} msgs/s, machine CPU {run.machine_ms_per_message:.2f} ms/message"
    )
    cpu = run.cpu_ms_per_message
    if cpu is not None:
        line += f", milter CPU {cpu:.2f} ms/message, peak RSS {fmt(run.peak_rss_kib, 0)} KiB"
    if run.config.startswith("postroom"):
        line += f", Redis CPU {run.redis_ms_per_message:.3f} ms/message"
    if run.latencies_ms:
        p50, p99 = percentile(run.latencies_ms, 50), percentile(run.latencies_ms, 99)
        line += f", latency p50 {fmt(p50, 2)} / p99 {fmt(p99, 2)} ms"
    return line + f"; machine {run.busy_before:.0f}% busy before, {run.busy_during:.0f}% during"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="measured messages per run (default 2000)")
    parser.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions (default 10)")
    parser.add_argument(
        "--sizes", type=parse_sizes, default=[2048, 204800], help="body sizes in bytes (default 2048,204800)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up messages before each run (default messages/10, 20..200)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of every configuration, interleaved; medians are reported (3)"
    )
    parser.add_argument(
        "--latency-messages",
        type=int,
        default=300,
        help="mails timed from the final '.' to the 250 reply after each measured batch (default 300; 0: none)",
    )
    parser.add_argument(
        "--configs",
        type=lambda text: parse_configs(text, CONFIGS),
        default=list(DEFAULT_CONFIGS),
        help=f"configurations to run, of {','.join(CONFIGS)} (default {','.join(DEFAULT_CONFIGS)}; "
        "edits = the empty milter making the header edits postroom makes for a new ticket)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=30.0, help="seconds to wait for a quiet machine before a batch (30)"
    )
    parser.add_argument(
        "--base-src",
        type=Path,
        help="src/ folder of another postroom (e.g. `git archive main src | tar -x -C /tmp/base`, then "
        "/tmp/base/src) that configuration postroom-base runs, added to the configurations when given",
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.sessions < 1 or args.rounds < 1 or args.latency_messages < 0:
        parser.error("--messages, --sessions and --rounds must be at least 1, --latency-messages at least 0")
    sizes: list[int] = args.sizes
    warmup: int = args.warmup if args.warmup is not None else max(20, min(200, args.messages // 10))
    if os.geteuid() != 0:
        parser.error("the testbed needs root (private Postfix and Dovecot)")
    # The milter must read exactly the config written for it.
    for var in ENV_OVERRIDES:
        os.environ.pop(var, None)
    if args.base_src is not None:
        os.environ[BASE_SRC_VAR] = str(args.base_src.resolve())
        if BASE_CONFIG not in args.configs:
            args.configs = [c for c in CONFIGS if c in (*args.configs, BASE_CONFIG)]
    elif BASE_CONFIG in args.configs:
        parser.error(f"{BASE_CONFIG} needs --base-src")

    print_header(args, sizes, warmup)
    results = run_rounds(
        sizes,
        args.rounds,
        args.configs,
        titles=CONFIG_TITLES,
        run_one=lambda config, size: run_one(config, size, args, warmup),
        describe=run_line,
    )
    if isinstance(results, int):
        return results

    rows = table_rows(results, sizes)
    print()
    print(text_table(rows, sizes))
    for size in sizes:
        print()
        print(group_table(results, size))
    print()
    print("Markdown (for README.md):")
    print()
    print(markdown_table(rows, sizes))
    print()
    for config in CONFIGS:
        if tickets(config) and (config, sizes[0]) in results and ("empty", sizes[0]) in results:
            print(target_line(results, sizes, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
