"""What bench/inbound.py and bench/outbound.py share: the run loop (interleaved rounds of configurations), one
measured batch (quiet machine first, then CPU of the milter, Redis and the whole machine, peak RSS, latency), the
milters compared (empty pymilter milters, OpenDKIM, postroom), /proc readings, machine facts and the tables.

Each benchmark supplies only its load (how to send the warm-up and the measured batch) and its checks.
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
import socket
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import postroom
from postroom.config import Config, ConfigError, example_config_path, load_config, parse_config, to_toml, with_changes
from postroom_testbed import MilterDaemon, Stack, StackError, log_tail

EMPTY_MILTER = Path(__file__).resolve().parent / "empty_milter.py"
ASYNCIO_EMPTY_MILTER = Path(__file__).resolve().parent / "asyncio_empty_milter.py"
OPENDKIM = "/usr/sbin/opendkim"
# postroom with [milter] workers set, whatever the example config says: both modes in one run.
_POSTROOM_WORKERS = {"postroom-w0": 0, "postroom-w1": 1}
# postroom with the asyncio milter engine ([milter] engine = "asyncio"), the example config otherwise.
_POSTROOM_ASYNCIO = "postroom-aio"
# "postroom-base": the same config run by another postroom (its src/ folder in this variable, set by the scripts'
# --base-src), so a change and the code before it are measured in one run, on the same machine load.
BASE_CONFIG = "postroom-base"
BASE_SRC_VAR = "POSTROOM_BENCH_BASE_SRC"
EMPTY_KINDS = ("empty", "edits", "aempty", "floor")
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
    latencies_ms: list[float] = field(default_factory=list)  # end of DATA ("." sent) to the reply, per mail
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


def status_kib(pid: int, field: str) -> int:
    """A /proc/PID/status figure (VmRSS, VmHWM) of the process plus that of each of its worker processes."""
    total = 0
    for member in family(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in lines if line.startswith(f"{field}:")), 0)
    return total


def peak_rss_kib(pid: int) -> int:
    """VmHWM of the process plus that of each of its worker processes."""
    total = status_kib(pid, "VmHWM")
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


def opendkim_milter(stack: Stack) -> MilterDaemon:
    """OpenDKIM signing example.test with the example config's 2048-bit key, as an admin runs it today."""
    workdir = stack.root / "opendkim"
    workdir.mkdir(parents=True, exist_ok=True)
    base = load_config(example_config_path(), environ={})
    entry = base.dkim["example.test"]
    # OpenDKIM refuses a PEM file that starts with anything but "-----" (the example key has comment lines).
    pem = [line for line in Path(entry.key_file).read_text().splitlines() if not line.startswith("#")]
    key = workdir / "example.test.key"
    key.write_text("\n".join(pem) + "\n")
    key.chmod(0o600)
    conf = workdir / "opendkim.conf"
    conf.write_text(
        f"Mode s\nDomain example.test\nSelector {entry.selector}\nKeyFile {key}\n"
        f"Socket local:{stack.milter_socket_path}\nCanonicalization relaxed/relaxed\n"
        "RequireSafeKeys false\nUMask 000\nSyslog no\n"
        f"PidFile {workdir / 'opendkim.pid'}\n"
    )
    command = [OPENDKIM, "-f", "-x", str(conf)]
    return MilterDaemon(workdir, "", stack.milter_socket_path, command=command)


def make_milter(
    config: str, stack: Stack, changes: Mapping[str, object] | None = None
) -> tuple[MilterDaemon, Config | None, list[str]]:
    """The configuration's milter (not started); ``changes`` are top-level keys of postroom's config."""
    if config == "opendkim":
        return opendkim_milter(stack), None, []
    if config in EMPTY_KINDS:
        workdir = stack.root / "empty-milter"
        flags = {"edits": ["--edits"], "floor": ["--floor", stack.redis.url, str(workdir / "history.jsonl")]}.get(
            config, []
        )
        program = ASYNCIO_EMPTY_MILTER if config == "aempty" else EMPTY_MILTER
        command = [sys.executable, str(program), *flags, str(stack.milter_socket_path)]
        return MilterDaemon(workdir, "", stack.milter_socket_path, command=command), None, []
    workdir = stack.root / "postroom"
    cfg = postroom_config(stack, workdir)
    if config in _POSTROOM_WORKERS:
        cfg = with_changes(cfg, {"milter": {"workers": _POSTROOM_WORKERS[config]}})
    if config == _POSTROOM_ASYNCIO:
        cfg = with_changes(cfg, {"milter": {"engine": "asyncio"}})
    if changes:
        cfg = parse_config({**cfg.model_dump(), **changes}, "<bench>", environ={})
    text, notes = config_toml(cfg)
    if config == BASE_CONFIG:
        # Keys at their default value are left out: the other postroom may not know keys added since.
        text = "\n".join(_toml_fallback(cfg.model_dump(exclude_defaults=True))) + "\n"
    daemon = MilterDaemon(workdir, text, stack.milter_socket_path)
    if config == BASE_CONFIG:
        # env(1) execs the interpreter: the PID whose CPU and RSS are read stays the milter's.
        daemon.command = ["env", f"PYTHONPATH={os.environ[BASE_SRC_VAR]}", *daemon.command]
    return daemon, cfg, notes


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


def size_label(size: int) -> str:
    if size % 1_000_000 == 0:
        return f"{size // 1_000_000} MB"
    if size % 1024 == 0:
        return f"{size // 1024} KB"
    return f"{size} B"


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


Results = dict[tuple[str, int], list[Run]]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def text_grid(first: str, heads: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> str:
    width = max(len(first), *(len(name) for name, _ in rows))
    widths = [max(len(h), *(len(values[i]) for _, values in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join([first.ljust(width), *(h.rjust(w) for h, w in zip(heads, widths, strict=True))])]
    for name, values in rows:
        lines.append("  ".join([name.ljust(width), *(v.rjust(w) for v, w in zip(values, widths, strict=True))]))
    return "\n".join(lines)


def markdown_grid(first: str, heads: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]) -> str:
    lines = [f"| {first} | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in rows]
    return "\n".join(lines)


def text_table(rows: list[tuple[str, list[str]]], sizes: Sequence[int]) -> str:
    return text_grid("", [f"{size_label(s)} ({s} B)" for s in sizes], rows)


def markdown_table(rows: list[tuple[str, list[str]]], sizes: Sequence[int]) -> str:
    return markdown_grid("", [size_label(s) for s in sizes], rows)


def parse_configs(text: str, known: Sequence[str]) -> list[str]:
    """A comma-separated choice of configurations, in the order of ``known``."""
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [c for c in chosen if c not in known]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown configurations {unknown}; choose from {','.join(known)}")
    return [c for c in known if c in chosen]


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma separated list of byte counts: {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive byte counts")
    return sizes


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


# -- one run and the rounds ---------------------------------------------------------------------------------


@dataclass
class Milter:
    """One run's milter (none for Postfix alone) and what its checks found."""

    config: str
    daemon: MilterDaemon | None
    cfg: Config | None  # postroom's config; None for the other milters
    notes: list[str]
    expect_accepted: int = 0  # how many mails an empty milter must say it accepted (0: not checked)


@contextlib.contextmanager
def milter_for(config: str, stack: Stack, changes: Mapping[str, object] | None = None) -> Iterator[Milter]:
    """The configuration's milter, started; stopped even on Ctrl-C, an empty milter's count checked after that."""
    daemon, cfg, notes = (None, None, []) if config == "none" else make_milter(config, stack, changes)
    milter = Milter(config, daemon, cfg, notes)
    try:
        if daemon is not None:
            daemon.start()
        yield milter
    finally:
        # Stopping the milter and then the stack must not be cut short by Ctrl-C (see clean_up).
        hold_interrupts()
        if daemon is not None:
            daemon.stop()
    if config in EMPTY_KINDS and daemon is not None and milter.expect_accepted:
        milter.notes += check_empty(daemon, milter.expect_accepted)


@contextlib.contextmanager
def clean_up() -> Iterator[None]:
    """Around a run's stack and milter: a signal that came while they stopped is raised once both are down."""
    try:
        yield
    finally:
        release_interrupts()


def measured(
    config: str, size: int, count: int, *, stack: Stack, milter: Milter, send: Callable[[], float], quiet: float = 30.0
) -> Run:
    """One measured batch of ``count`` mails, ``send`` returning its seconds: it starts once the machine is quiet,
    and the milter's CPU (settled, background work included), its peak RSS, Redis's and the machine's CPU and
    the CPU of each process group are read around it."""
    daemon = milter.daemon
    pid = daemon.pid if daemon is not None else None
    # On a machine that other people's work keeps busy, waiting longer (--quiet-wait) only makes the run longer.
    busy_before = wait_quiet(quiet)
    if busy_before > 15.0:
        milter.notes.append(f"the machine was {busy_before:.0f}% busy with other work just before the run")
    cpu_before = settled_cpu_seconds(pid) if pid is not None else 0.0
    redis_pid = stack.redis.pid
    if redis_pid is None:
        raise BenchError("the stack's Redis has no process id")
    redis_before = cpu_seconds(redis_pid)
    processes_before = process_times()
    mark = cpu_jiffies()
    seconds = send()
    run = Run(config, size, count, seconds, busy_before, busy_percent(mark), notes=milter.notes)
    if daemon is not None and pid is not None:
        if not daemon.is_running():
            raise BenchError(f"the milter died during the run:\n{log_tail(daemon.log_path)}")
        run.cpu_seconds = settled_cpu_seconds(pid) - cpu_before
        run.peak_rss_kib = peak_rss_kib(pid)
    # Read after the milter settled, so postroom's late history writes count as well.
    run.machine_cpu_seconds = (cpu_jiffies()[0] - mark[0]) / _CLK_TCK
    run.cpu_by_group = cpu_by_group(processes_before, process_times())
    run.redis_cpu_seconds = cpu_seconds(redis_pid) - redis_before
    return run


def deferred_notes(stack: Stack) -> list[str]:
    deferred = len(re.findall(r"status=deferred", stack.postfix.log_text()))
    return [f"{deferred} deliveries were deferred and retried"] if deferred else []


def run_rounds(
    sizes: Sequence[int],
    rounds: int,
    configs: Sequence[str],
    *,
    titles: Mapping[str, str],
    run_one: Callable[[str, int], Run],
    describe: Callable[[Run, int], str],
) -> Results | int:
    """Every configuration once per round, rounds interleaved per size, so a slow spell of the machine hits all
    of them alike.  The results, or the exit status after an interrupt or a failed run (all services stopped)."""
    results: Results = {}
    with interrupts_as_keyboard_interrupt():
        try:
            for size in sizes:
                for round_no in range(1, rounds + 1):
                    for config in configs:
                        progress(f"... {size_label(size)}, {titles[config]}, round {round_no}/{rounds}")
                        run = run_one(config, size)
                        results.setdefault((config, size), []).append(run)
                        print(describe(run, round_no), flush=True)
                        for note in run.notes:
                            print(f"         WARNING: {note}", flush=True)
        except KeyboardInterrupt:
            print("interrupted; every service of the benchmark has been stopped", file=sys.stderr)
            return 130
        except (BenchError, StackError) as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    return results


def print_command_and_machine(title: str) -> None:
    print(f"# {title}")
    env = "".join(f"{var}={shlex.quote(os.environ[var])} " for var in ("PYTHONPATH",) if os.environ.get(var))
    print(f"command:  cd {shlex.quote(os.getcwd())} && {env}{shlex.join([sys.executable, *sys.argv])}")
    print(f"started:  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    for name, value in machine_facts():
        print(f"{name + ':':<9} {value}")


# -- latency ------------------------------------------------------------------------------------------------


class _Smtp:
    """A bare SMTP client that times one thing: from the end of DATA (the final ".") to the server's reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        # Without it the final "." waits for the ACK of the body (Nagle against delayed ACK: ~40 ms each).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.expect(b"220")

    def expect(self, code: bytes) -> None:
        while True:
            line = self.file.readline()
            if not line:
                raise BenchError("the SMTP server closed the connection")
            if line[3:4] != b"-":
                break
        if not line.startswith(code):
            raise BenchError(f"SMTP: expected {code.decode()}, got {line.decode(errors='replace').strip()}")

    def command(self, line: str, code: bytes) -> None:
        self.sock.sendall(line.encode() + b"\r\n")
        self.expect(code)

    def send(self, sender: str, rcpt: str, data: bytes) -> float:
        self.command(f"MAIL FROM:<{sender}>", b"250")
        self.command(f"RCPT TO:<{rcpt}>", b"250")
        self.command("DATA", b"354")
        self.sock.sendall(data)
        start = time.perf_counter()
        self.sock.sendall(b".\r\n")
        self.expect(b"250")
        return (time.perf_counter() - start) * 1000

    def close(self) -> None:
        with contextlib.suppress(OSError, BenchError):
            self.command("QUIT", b"221")
        self.file.close()
        self.sock.close()


def latency_mail(number: int, size: int, sender: str, rcpt: str) -> bytes:
    """What smtp-source sends (From, To, Date, a distinct Message-Id, ``size`` bytes of body), dot-safe."""
    head = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nDate: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-Id: <latency.{os.getpid()}.{number}.{time.time_ns()}@bench.test>\r\n\r\n"
    )
    line = b"La de da de da 1.\r\n"
    return head.encode() + line * max(1, size // len(line))


def latencies(port: int, mails: int, sessions: int, size: int, *, sender: str, rcpt: str) -> list[float]:
    """ms from the final "." to the 250 reply, per mail: one connection per mail, ``sessions`` at once."""
    numbers = iter(range(mails))
    lock = threading.Lock()
    found: list[float] = []
    failures: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                number = next(numbers, None)
            if number is None:
                return
            try:
                client = _Smtp(port)
                try:
                    ms = client.send(sender, rcpt, latency_mail(number, size, sender, rcpt))
                finally:
                    client.close()
            except (OSError, BenchError) as exc:
                with lock:
                    failures.append(str(exc))
                return
            with lock:
                found.append(ms)

    threads = [threading.Thread(target=worker) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise BenchError(f"{len(failures)} latency mails failed, e.g. {failures[0]}")
    return found


def percentile(values: Sequence[float], pct: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1] if pct < 100 else max(values)
