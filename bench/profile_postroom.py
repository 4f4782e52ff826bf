"""Where postroom's milter CPU goes: py-spy samples the real ``postroom milter`` during a bench/inbound.py style load.

Usage: ``.venv/bin/python bench/profile_postroom.py [--messages N] [--sessions S] [--size BYTES] [--top K]``
(needs ``pip install py-spy`` into the venv). Starts a fresh testbed stack with postroom in front of Dovecot, sends a
warm-up, then records the milter process and its worker processes with py-spy while smtp-source sends the measured
batch, and prints the functions with the most samples: "self" (the function itself was running) and "total" (it was
on the stack).  Only threads holding the GIL are sampled (``--gil``), so the figures are Python CPU time;
``--native`` adds C frames.  The raw collapsed stacks stay in the file named by ``--raw`` for a flame graph
(e.g. speedscope, inferno).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from inbound import RECIPIENT, SENDER, send_batch
from postroom.config import with_changes
from postroom_testbed import MailUser, MilterDaemon, Stack
from runloop import config_toml, postroom_config, settled_cpu_seconds

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def frame_name(frame: str, root: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    path = path.removeprefix(root)
    return f"{path}:{match.group('func')}"


def aggregate(raw: Path, root: str) -> tuple[Counter[str], Counter[str], int]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f, root) for f in stack.split(";")]
        # The first frame is the thread ("thread (0x...)" or process) name in py-spy's raw output.
        frames = [f for f in frames if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    return own, total, samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="also sample C frames (slower)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--engine", choices=("libmilter", "asyncio"), default="libmilter", help="[milter] engine")
    parser.add_argument("--raw", type=Path, default=Path("/tmp/postroom-profile.txt"))
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        parser.error("py-spy is not installed: .venv/bin/pip install py-spy")

    users = [MailUser(RECIPIENT), MailUser(SENDER)]
    with Stack(users=users, milter="auto", milter_default_action="tempfail") as stack:
        workdir = stack.root / "postroom"
        text, notes = config_toml(with_changes(postroom_config(stack, workdir), {"milter": {"engine": args.engine}}))
        for note in notes:
            print(f"note: {note}")
        milter = MilterDaemon(workdir, text, stack.milter_socket_path)
        milter.start()
        spy: subprocess.Popen[bytes] | None = None
        try:
            pid = milter.pid
            assert pid is not None
            send_batch(stack, args.warmup, args.sessions, args.size, expect_total=args.warmup, timeout=600)
            before = settled_cpu_seconds(pid)
            cmd = [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(args.rate),
                "--gil",
                "--threads",
                "--subprocesses",
            ]
            cmd += ["--format", "raw", "--output", str(args.raw)]
            if args.native:
                cmd.append("--native")
            spy = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # py-spy attaches
            seconds = send_batch(
                stack, args.messages, args.sessions, args.size, expect_total=args.warmup + args.messages, timeout=900
            )
            used = settled_cpu_seconds(pid) - before
            spy.send_signal(signal.SIGINT)
            _, err = spy.communicate(timeout=60)
            spy = None
            print(
                f"{args.messages} messages of {args.size} B in {seconds:.2f} s = {args.messages / seconds:.1f} msgs/s "
                f"under py-spy; milter CPU {used * 1000 / args.messages:.2f} ms/message (all threads)"
            )
            if err.strip():
                print(err.decode(errors="replace").strip().splitlines()[-1])
        finally:
            if spy is not None and spy.poll() is None:
                spy.kill()
                spy.wait()
            milter.stop()

    own, total, samples = aggregate(args.raw, str(Path.cwd()) + "/")
    if not samples:
        print(f"no samples in {args.raw}")
        return 1
    print(f"\n{samples} samples with the GIL held (raw stacks: {args.raw})")
    print(f"\nself: function running, % of samples ({args.top} highest)")
    for name, count in own.most_common(args.top):
        print(f"  {100 * count / samples:5.1f}%  {name}")
    print(f"\ntotal: function on the stack, % of samples ({args.top} highest)")
    for name, count in total.most_common(args.top):
        print(f"  {100 * count / samples:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
