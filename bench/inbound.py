"""Inbound throughput: Postfix alone, Postfix + an empty pymilter milter, Postfix + postroom.

Usage: ``.venv/bin/python bench/inbound.py [--messages N] [--sessions S] [--sizes 2048,204800] [--rounds R]
[--configs none,empty,edits,postroom]``

Configurations: ``none`` (Postfix alone), ``empty`` (bench/empty_milter.py), ``edits`` (the same empty milter
making the five header edits postroom makes for a new ticket, to tell Postfix's cost of applying them apart from
postroom's own), ``aempty`` (bench/asyncio_empty_milter.py: the milter protocol on one asyncio thread instead of
libmilter's thread per connection), ``postroom`` (the example config as shipped) and ``postroom-w0`` /
``postroom-w1`` (the same with ``[milter] workers = 0`` or ``1``: the pipeline inside the milter process or in one
worker process); the default runs none, empty and postroom.

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
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis

import postroom
from postroom.config import (
    ENV_OVERRIDES,
    Config,
    ConfigError,
    example_config_path,
    load_config,
    parse_config,
    to_toml,
    with_changes,
)
from postroom_testbed import MailUser, MilterDaemon, Stack, StackError, log_tail

SMTP_SOURCE = "/usr/sbin/smtp-source"
SENDER = "alice@customer.test"
RECIPIENT = "support@example.test"
EMPTY_MILTER = Path(__file__).resolve().parent / "empty_milter.py"
ASYNCIO_EMPTY_MILTER = Path(__file__).resolve().parent / "asyncio_empty_milter.py"
CONFIGS = ("none", "empty", "edits", "aempty", "postroom", "postroom-w0", "postroom-w1")
DEFAULT_CONFIGS = ("none", "empty", "postroom")
CONFIG_TITLES = {
    "none": "no milter",
    "empty": "empty milter",
    "edits": "empty+edits",
    "aempty": "asyncio empty",
    "postroom": "postroom",
    "postroom-w0": "postroom w=0",
    "postroom-w1": "postroom w=1",
}
# postroom with [milter] workers set, whatever the example config says: both modes in one run.
_POSTROOM_WORKERS = {"postroom-w0": 0, "postroom-w1": 1}
_EMPTY_KINDS = ("empty", "edits", "aempty")
TARGET_RATIO = 0.9
TARGET_CPU_MS = 1.0
_POLL = 0.005  # after smtp-source exited: how precisely the end of a run is seen
_POLL_SENDING = 0.05
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A run did not do what it should; the message says what and carries log tails."""


@dataclass
class Run:
    config: str
    size: int
    messages: int
    seconds: float
    busy_before: float = 0.0  # % of all CPUs busy in the second before the run (other work on the machine)
    busy_during: float = 0.0  # % of all CPUs busy during the measured batch (load generator and stack included)
    cpu_seconds: float | None = None
    peak_rss_kib: int | None = None
    machine_cpu_seconds: float = 0.0  # every process on the machine, busy time summed over the CPUs
    redis_cpu_seconds: float = 0.0  # the stack's redis-server (idle unless postroom runs)
    cpu_by_group: dict[str, float] = field(default_factory=dict)  # CPU seconds by process group (cpu_by_group)
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_ms_per_message(self) -> float | None:
        return None if self.cpu_seconds is None else self.cpu_seconds * 1000 / self.messages

    @property
    def machine_ms_per_message(self) -> float:
        return self.machine_cpu_seconds * 1000 / self.messages

    @property
    def redis_ms_per_message(self) -> float:
        return self.redis_cpu_seconds * 1000 / self.messages


# -- /proc ------------------------------------------------------------------------------------------------


def family(pid: int) -> list[int]:
    """The process and its descendants (postroom's milter and its worker processes)."""
    pids = [pid]
    for parent in pids:
        try:
            for tid in os.listdir(f"/proc/{parent}/task"):
                pids += [int(c) for c in Path(f"/proc/{parent}/task/{tid}/children").read_text().split()]
        except OSError:
            continue  # exited meanwhile
    return pids


def user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process and its descendants, reaped children included."""
    user = system = 0.0
    for member in family(pid):
        try:
            raw = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        # Fields 14-17 of proc(5) (utime, stime, cutime, cstime); fields[0] here is field 3 (state).
        user += (int(fields[11]) + int(fields[13])) / _CLK_TCK
        system += (int(fields[12]) + int(fields[14])) / _CLK_TCK
    return user, system


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads and its worker processes, in seconds."""
    return sum(user_system(pid))


def peak_rss_kib(pid: int) -> int:
    """VmHWM of the process plus that of each of its worker processes."""
    total = 0
    for member in family(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in lines if line.startswith("VmHWM:")), 0)
    if not total:
        raise BenchError(f"no VmHWM in /proc/{pid}/status")
    return total


def settled_cpu_seconds(pid: int, quiet: float = 0.3, timeout: float = 15.0) -> float:
    """The process's CPU time once it has stopped growing for ``quiet`` seconds (background work done)."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = cpu_seconds(pid)
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
    return last


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total


def busy_percent(since: tuple[int, int]) -> float:
    busy, total = cpu_jiffies()
    return 100.0 * (busy - since[0]) / max(1, total - since[1])


def wait_quiet(limit: float = 30.0, busy_max: float = 15.0) -> float:
    """Wait until the machine's CPUs are mostly idle for a second (other work finished); the last busy %."""
    deadline = time.monotonic() + limit
    while True:
        mark = cpu_jiffies()
        time.sleep(1.0)
        busy = busy_percent(mark)
        if busy <= busy_max or time.monotonic() > deadline:
            return busy


ProcessTimes = dict[int, tuple[str, float, float]]  # pid -> (group, own CPU s, CPU s of its reaped children)
# Whose exited children a parent's children time is: Postfix's master reaps its daemons, this program smtp-source.
_REAPED = {"postfix other": "postfix (exited processes)", "benchmark (this program)": "smtp-source (exited)"}


def process_group(pid: int, comm: str) -> str:
    """Which part of the mail path a process is: Postfix and Dovecot daemons by name, Python by what it runs."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return "kernel threads" if comm.startswith(("kworker", "ksoftirq", "jbd2", "rcu", "kswapd")) else "other"
    if "/postfix/" in exe:
        return f"postfix {comm}" if comm in ("smtpd", "cleanup", "qmgr", "lmtp") else "postfix other"
    if "/dovecot/" in exe or comm.startswith("dovecot"):
        return "dovecot"
    if os.path.basename(exe).startswith("python"):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return "other"
        text = b" ".join(argv).decode(errors="replace")
        if "postroom milter" in text or "empty_milter.py" in text:  # asyncio_empty_milter.py too
            return "milter"
        if "bench/" in text:
            return "benchmark (this program)"
        return "other"
    name = os.path.basename(exe)
    if name in ("redis-server", "smtp-source"):
        return name
    return "other"


def process_times() -> ProcessTimes:
    times: ProcessTimes = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        own = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        children = (int(fields[13]) + int(fields[14])) / _CLK_TCK
        times[pid] = (process_group(pid, comm), own, children)
    return times


def cpu_by_group(before: ProcessTimes, after: ProcessTimes) -> dict[str, float]:
    """CPU seconds spent between the two snapshots, by process group.

    A process that exited in between is counted once its parent reaped it (the parent's children time, under
    the parent's group: Postfix's master reaps smtpd, cleanup and lmtp); one that started in between counts whole.
    """
    spent: dict[str, float] = {}
    for pid, (group, own, children) in after.items():
        old = before.get(pid)
        base_own, base_children = (old[1], old[2]) if old is not None and old[0] == group else (0.0, 0.0)
        spent[group] = spent.get(group, 0.0) + own - base_own
        reaped = children - base_children
        if reaped > 0:
            key = _REAPED.get(group, f"{group} (exited children)")
            spent[key] = spent.get(key, 0.0) + reaped
    return spent


# -- machine facts ----------------------------------------------------------------------------------------


def _command_output(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except OSError as exc:
        return f"({exc.strerror})"
    return (done.stdout or done.stderr).strip()


def postroom_source() -> str:
    """Version, location and (in a git checkout) commit of the postroom package the milter will run."""
    where = Path(postroom.__file__).resolve().parent
    text = f"{postroom.__version__} from {where}"
    commit = _command_output(["git", "-C", str(where), "rev-parse", "--short", "HEAD"])
    if re.fullmatch(r"[0-9a-f]{7,40}", commit):
        dirty = _command_output(["git", "-C", str(where), "status", "--porcelain", "--", "."])
        text += f", git {commit}" + (" with uncommitted changes under src/postroom" if dirty else "")
    return text


def machine_facts() -> list[tuple[str, str]]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    redis_version = _command_output(["redis-server", "--version"])
    match = re.search(r"v=(\S+)", redis_version)
    if match:
        redis_version = match.group(1)
    return [
        ("CPU", f"{cpu_model}, {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), {mem_total}"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"),
        ("Postfix", _command_output(["postconf", "-d", "-h", "mail_version"])),
        ("Dovecot", _command_output(["dovecot", "--version"])),
        ("Redis", redis_version),
        ("pymilter", importlib.metadata.version("pymilter")),
        ("postroom", postroom_source()),
    ]


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
    try:
        deadline = start + timeout
        while True:
            exited = proc.poll() is not None
            if exited and proc.returncode != 0:
                raise BenchError(
                    f"{shlex.join(cmd)} exited with status {proc.returncode}:\n{log_tail(out_path)}\n"
                    f"--- postfix.log ---\n{stack.postfix.log_tail()}"
                )
            # While smtp-source sends, only its exit is watched: listing a Maildir of thousands of files every few
            # milliseconds would take CPU from the mail path being measured.
            count = delivered_count(stack) if exited else -1
            if exited and count >= expect_total and stack.postfix.queue_empty():
                elapsed = time.monotonic() - start
                break
            if time.monotonic() > deadline:
                count = delivered_count(stack)
                raise BenchError(
                    f"not finished after {timeout:.0f}s: smtp-source {'exited' if exited else 'running'}, "
                    f"{count}/{expect_total} delivered, deferred {stack.postfix.deferred_count()}, "
                    f"queue ids {len(stack.postfix.queue_ids())}\n--- postfix.log ---\n{stack.postfix.log_tail()}"
                    f"\n--- dovecot.log ---\n{log_tail(stack.dovecot.log_path)}"
                )
            time.sleep(_POLL if exited else _POLL_SENDING)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if count != expect_total:
        raise BenchError(f"Dovecot holds {count} messages, expected {expect_total}")
    return elapsed


# -- milters ------------------------------------------------------------------------------------------------


def postroom_config(stack: Stack, workdir: Path) -> Config:
    """The shipped example config pointed at the stack's Redis and a SQLite file, socket umask 0."""
    base = load_config(example_config_path(), environ={})
    changes: dict[str, dict[str, object]] = {
        "milter": {"socket": stack.milter_spec, "socket_umask": 0},
        "redis": {"url": stack.redis.url},
        "database": {"url": f"sqlite:///{workdir / 'history.sqlite3'}"},
    }
    if "mailer" in Config.model_fields:
        # Auto-replies (e.g. outside business hours) go to the stack's Postfix, as they would to the local one.
        changes["mailer"] = {"port": stack.postfix.smtp_port}
    return with_changes(base, changes)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_fallback(data: Mapping[str, object], name: str = "") -> list[str]:
    """A TOML writer that quotes table keys such as "example.test" (used only if config.to_toml cannot)."""
    lines = [f"[{name}]"] if name else []
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    for key, value in data.items():
        if key not in tables:
            lines.append(f"{_toml_key(key)} = {json.dumps(value)}")
    for key, value in tables.items():
        lines += _toml_fallback(value, f"{name}.{_toml_key(key)}" if name else _toml_key(key))
    return lines


def config_toml(cfg: Config) -> tuple[str, list[str]]:
    """postroom's own TOML writer, checked by reading the result back; (text, notes)."""
    text = to_toml(cfg)
    try:
        if parse_config(tomllib.loads(text), "<to_toml>", environ={}) == cfg:
            return text, []
        problem = "does not load back to the same config"
    except (tomllib.TOMLDecodeError, ConfigError) as exc:
        problem = str(exc).replace("\n", "; ")
    fallback = "\n".join(_toml_fallback(cfg.model_dump())) + "\n"
    if parse_config(tomllib.loads(fallback), "<fallback>", environ={}) != cfg:
        raise BenchError(f"config.to_toml output is unusable ({problem}) and so is the fallback writer's")
    return fallback, [f"postroom.config.to_toml output is unusable ({problem}); wrote the config with bench's writer"]


def make_milter(config: str, stack: Stack) -> tuple[MilterDaemon, Config | None, list[str]]:
    if config in _EMPTY_KINDS:
        workdir = stack.root / "empty-milter"
        flags = ["--edits"] if config == "edits" else []
        program = ASYNCIO_EMPTY_MILTER if config == "aempty" else EMPTY_MILTER
        command = [sys.executable, str(program), *flags, str(stack.milter_socket_path)]
        return MilterDaemon(workdir, "", stack.milter_socket_path, command=command), None, []
    workdir = stack.root / "postroom"
    cfg = postroom_config(stack, workdir)
    if config in _POSTROOM_WORKERS:
        cfg = with_changes(cfg, {"milter": {"workers": _POSTROOM_WORKERS[config]}})
    text, notes = config_toml(cfg)
    return MilterDaemon(workdir, text, stack.milter_socket_path), cfg, notes


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
    con = sqlite3.connect(db_path)
    try:
        rows, ids = con.execute("SELECT count(*), count(DISTINCT message_id) FROM messages").fetchone()
    finally:
        con.close()
    if rows != expect_total:
        problems.append(f"history has {rows} message rows, expected {expect_total}")
    if ids != expect_total:
        problems.append(f"history has {ids} distinct Message-IDs for {expect_total} messages")
    newest = max(maildir_new(stack).iterdir(), key=lambda p: p.stat().st_mtime)
    head = newest.read_bytes()[:8192].split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    if b"\nX-Postroom-Ticket:" not in head:
        problems.append(f"{newest.name} has no X-Postroom-Ticket header")
    return problems


def check_empty(milter: MilterDaemon, expect_total: int) -> list[str]:
    match = re.search(r"accepted (\d+) messages", milter.log_text())
    if match is None:
        return ["the empty milter did not report its count (see its log)"]
    if int(match.group(1)) != expect_total:
        return [f"the empty milter accepted {match.group(1)} messages, expected {expect_total}"]
    return []


# -- one run ------------------------------------------------------------------------------------------------


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_one(config: str, size: int, messages: int, sessions: int, warmup: int) -> Run:
    users = [MailUser(RECIPIENT), MailUser(SENDER)]
    milter_spec = "auto" if config != "none" else None
    timeout = 120 + messages * (0.05 + 0.2 * size / 204800)
    try:
        with Stack(users=users, milter=milter_spec, milter_default_action="tempfail") as stack:
            milter: MilterDaemon | None = None
            cfg: Config | None = None
            notes: list[str] = []
            try:
                if config != "none":
                    milter, cfg, notes = make_milter(config, stack)
                    milter.start()
                pid = milter.pid if milter is not None else None
                send_batch(stack, warmup, sessions, size, expect_total=warmup, timeout=timeout)
                busy_before = wait_quiet()
                if busy_before > 15.0:
                    notes.append(f"the machine was {busy_before:.0f}% busy with other work just before the run")
                cpu_before = settled_cpu_seconds(pid) if pid is not None else 0.0
                redis_pid = stack.redis.pid
                assert redis_pid is not None
                redis_before = cpu_seconds(redis_pid)
                processes_before = process_times()
                mark = cpu_jiffies()
                seconds = send_batch(stack, messages, sessions, size, expect_total=warmup + messages, timeout=timeout)
                run = Run(config, size, messages, seconds, busy_before, busy_percent(mark), notes=notes)
                if milter is not None and pid is not None:
                    if not milter.is_running():
                        raise BenchError(f"the milter died during the run:\n{log_tail(milter.log_path)}")
                    run.cpu_seconds = settled_cpu_seconds(pid) - cpu_before
                    run.peak_rss_kib = peak_rss_kib(pid)
                # Read after the milter settled, so postroom's late history writes count as well.
                run.machine_cpu_seconds = (cpu_jiffies()[0] - mark[0]) / _CLK_TCK
                run.cpu_by_group = cpu_by_group(processes_before, process_times())
                run.redis_cpu_seconds = cpu_seconds(redis_pid) - redis_before
                if cfg is not None:
                    run.notes += check_postroom(stack, cfg, warmup + messages)
                deferred = len(re.findall(r"status=deferred", stack.postfix.log_text()))
                if deferred:
                    run.notes.append(f"{deferred} deliveries were deferred and retried")
            finally:
                # Stopping the milter and then the stack (the with block) must not be cut short by Ctrl-C.
                hold_interrupts()
                if milter is not None:
                    milter.stop()
            if config in _EMPTY_KINDS and milter is not None:
                run.notes += check_empty(milter, warmup + messages)
    finally:
        release_interrupts()
    return run


# -- report -------------------------------------------------------------------------------------------------


def size_label(size: int) -> str:
    if size % 1024 == 0:
        return f"{size // 1024} KB"
    return f"{size} B"


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


Results = dict[tuple[str, int], list[Run]]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


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

    def each(get: Callable[[str, int], str], config: str) -> list[str]:
        return [get(config, size) for size in sizes]

    def rate_text(config: str, size: int) -> str:
        return fmt(rate(config, size))

    rows: list[tuple[str, list[str]]] = []
    rows += [(f"msgs/s, {CONFIG_TITLES[c]}", each(rate_text, c)) for c in configs]
    rows += [(f"msgs/s range over rounds, {CONFIG_TITLES[c]}", each(spread, c)) for c in configs]
    if "empty" in configs:
        for c in postrooms:
            title = CONFIG_TITLES[c]
            rows.append((f"ratio {title} / empty milter (msgs/s)", [ratio(c, "empty", s) for s in sizes]))
            rows.append((f"ratio {title} / empty, per round (range)", [ratios(c, "empty", s) for s in sizes]))
    if "edits" in configs and "empty" in configs:
        rows.append(("ratio empty+edits / empty milter (msgs/s)", per_size(lambda s: ratio("edits", "empty", s))))
    if "empty" in configs and "none" in configs:
        rows.append(("ratio empty milter / no milter (msgs/s)", per_size(lambda s: ratio("empty", "none", s))))
    rows += [(f"milter CPU ms/message, {CONFIG_TITLES[c]}", each(cpu, c)) for c in milters]
    rows += [(f"Redis CPU ms/message, {CONFIG_TITLES[c]}", each(redis_cpu, c)) for c in postrooms]
    rows += [(f"machine CPU ms/message, {CONFIG_TITLES[c]}", each(machine, c)) for c in configs]
    rows += [(f"milter peak RSS MiB, {CONFIG_TITLES[c]}", each(rss, c)) for c in milters]
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


def text_table(rows: list[tuple[str, list[str]]], sizes: Sequence[int]) -> str:
    heads = [f"{size_label(s)} ({s} B)" for s in sizes]
    first = max(len(name) for name, _ in rows)
    widths = [max(len(h), *(len(values[i]) for _, values in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join([" " * first, *(h.rjust(w) for h, w in zip(heads, widths, strict=True))])]
    for name, values in rows:
        lines.append("  ".join([name.ljust(first), *(v.rjust(w) for v, w in zip(values, widths, strict=True))]))
    return "\n".join(lines)


def markdown_table(rows: list[tuple[str, list[str]]], sizes: Sequence[int]) -> str:
    lines = [
        "| | " + " | ".join(size_label(s) for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in rows]
    return "\n".join(lines)


def target_line(results: Results, sizes: Sequence[int], config: str = "postroom") -> str:
    met = True
    parts = []
    for size in sizes:
        ratio = median([r.rate for r in results[(config, size)]]) / median([r.rate for r in results[("empty", size)]])
        cpu = median([r.cpu_ms_per_message or 0.0 for r in results[(config, size)]])
        ok = ratio >= TARGET_RATIO and cpu <= TARGET_CPU_MS
        met = met and ok
        parts.append(f"{size_label(size)}: ratio {ratio:.2f}, CPU {cpu:.2f} ms/message {'ok' if ok else 'missed'}")
    verdict = "MET" if met else "NOT MET"
    title = CONFIG_TITLES[config]
    return (
        f"target (medians: {title}/empty msgs/s >= {TARGET_RATIO} and {title} CPU <= {TARGET_CPU_MS:g} "
        f"ms/message, every size): {verdict} ({'; '.join(parts)})"
    )


def print_header(args: argparse.Namespace, sizes: Sequence[int], warmup: int) -> None:
    print("# postroom inbound benchmark")
    env = "".join(f"{var}={shlex.quote(os.environ[var])} " for var in ("PYTHONPATH",) if os.environ.get(var))
    print(f"command:  cd {shlex.quote(os.getcwd())} && {env}{shlex.join([sys.executable, *sys.argv])}")
    print(f"started:  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    for name, value in machine_facts():
        print(f"{name + ':':<9} {value}")
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
        "setup:    a fresh testbed stack per run (Postfix -> LMTP -> Dovecot Maildir, private Redis), milter on a\n"
        "          unix socket, milter_default_action = tempfail; postroom runs `python -m postroom milter` with\n"
        "          docs/examples/postroom.toml pointed at the stack's Redis and a SQLite history (log level info).\n"
        "          Finished = Postfix queues empty and all messages in Maildir/new; time from starting smtp-source.\n"
        "          Milter CPU = utime+stime of the milter process and its worker processes over the measured batch\n"
        "          (including postroom's background history writes); peak RSS = VmHWM, summed over those\n"
        "          processes. Load generator and all services share the CPUs;\n"
        "          each measured batch starts once the CPUs were <= 15% busy for a second (waiting at most 30 s)."
    )
    print(flush=True)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma separated list of byte counts: {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive byte counts")
    return sizes


def parse_configs(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown configurations {unknown}; choose from {','.join(CONFIGS)}")
    return [c for c in CONFIGS if c in chosen]


class _Interrupts:
    """Signals as one KeyboardInterrupt, never in the middle of stopping a milter or a stack."""

    def __init__(self) -> None:
        self.held = False
        self.pending = False


_interrupts = _Interrupts()
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Only the first signal counts; a second one must not cut the clean-up short.
    for s in _SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if _interrupts.held:
        _interrupts.pending = True
        return
    raise KeyboardInterrupt


def hold_interrupts() -> None:
    """From here until release_interrupts() a signal only marks itself pending (clean-up code)."""
    _interrupts.held = True


def release_interrupts() -> None:
    """End the clean-up; raise the KeyboardInterrupt of a signal that came during it."""
    _interrupts.held = False
    if _interrupts.pending:
        _interrupts.pending = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise KeyboardInterrupt, so the with/finally blocks stop every service.

    SIGINT is set explicitly because a shell starts background jobs with it ignored.
    """
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum in _SIGNALS:
        signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


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
        "--configs",
        type=parse_configs,
        default=list(DEFAULT_CONFIGS),
        help=f"configurations to run, of {','.join(CONFIGS)} (default {','.join(DEFAULT_CONFIGS)}; "
        "edits = the empty milter making the header edits postroom makes for a new ticket)",
    )
    args = parser.parse_args(argv)
    if args.messages < 1 or args.sessions < 1 or args.rounds < 1:
        parser.error("--messages, --sessions and --rounds must be at least 1")
    sizes: list[int] = args.sizes
    warmup: int = args.warmup if args.warmup is not None else max(20, min(200, args.messages // 10))
    if os.geteuid() != 0:
        parser.error("the testbed needs root (private Postfix and Dovecot)")
    # The milter must read exactly the config written for it.
    for var in ENV_OVERRIDES:
        os.environ.pop(var, None)

    print_header(args, sizes, warmup)
    results: Results = {}
    with interrupts_as_keyboard_interrupt():
        try:
            for size in sizes:
                # Rounds interleave the configurations, so a slow spell of the machine hits all of them alike.
                for round_no in range(1, args.rounds + 1):
                    for config in args.configs:
                        progress(
                            f"... {size_label(size)}, {CONFIG_TITLES[config]}, round {round_no}/{args.rounds}: "
                            f"{warmup} warm-up + {args.messages}"
                        )
                        run = run_one(config, size, args.messages, args.sessions, warmup)
                        results.setdefault((config, size), []).append(run)
                        print(run_line(run, round_no), flush=True)
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
    for size in sizes:
        print()
        print(group_table(results, size))
    print()
    print("Markdown (for README.md):")
    print()
    print(markdown_table(rows, sizes))
    print()
    for config in CONFIGS:
        if config.startswith("postroom") and (config, sizes[0]) in results and ("empty", sizes[0]) in results:
            print(target_line(results, sizes, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
