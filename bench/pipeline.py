"""postroom's own CPU per mail, without Postfix and without the milter protocol: ``Runtime.handle`` in a loop.

Usage: ``.venv/bin/python bench/pipeline.py [--mails N] [--rounds R] [--tokens] [--base-src DIR]``

bench/inbound.py and bench/milter_direct.py measure the milter whole, where a change of a few percent in the
pipeline drowns in the noise of a shared 2-CPU machine. This runs the pipeline the way both adapters do (the runtime
the ``postroom`` command builds from the example config: a private redis-server, a SQLite history with its spool and
background writer thread) on one thread, for customer mail without a milter around it: half of the mails open a
ticket, the other half answer the mail before them (In-Reply-To), so they are followed up by the Message-ID index
(with ``--tokens`` their subjects also carry the ticket's token, "Re: [Support #N] ...", as replies to postroom's
mail do). Each run is a fresh process; it sends a warm-up, then ``--mails`` mails, waits for the history writer to
store them, and reports the process's CPU time (every thread: the history writer's SQL too) per mail and the wall
time per mail. With ``--base-src`` (e.g. ``git archive main src | tar -x -C /tmp/base``, then ``/tmp/base/src``) the
postroom there runs too, alternating with this one round by round: medians, ranges and the ratio of the medians come
from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the child imports the postroom its PYTHONPATH names, at run time
    from postroom.history import HistoryWriter

WARMUP = 300
SUPPORT = "support@example.test"


def child(mails: int, tokens: bool) -> dict[str, float]:
    """One run in this process: the numbers for the parent, as JSON on stdout."""
    from postroom.admin.common import daemon_runtime  # noqa: PLC0415 - the postroom PYTHONPATH names
    from postroom.config import example_config_path, load_config, to_toml, with_changes  # noqa: PLC0415
    from postroom.mime import Message  # noqa: PLC0415
    from postroom.verdict import Envelope  # noqa: PLC0415
    from postroom_testbed.redis_server import RedisServer  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="postroom-pipeline-") as tmp:
        root = Path(tmp)
        redis = RedisServer(root)
        redis.start()
        try:
            environ = {"POSTROOM_REDIS_URL": redis.url, "POSTROOM_DATABASE_URL": f"sqlite:///{root / 'h.sqlite3'}"}
            config = load_config(example_config_path(), environ=environ)
            path = root / "postroom.toml"
            path.write_text(to_toml(with_changes(config, {"database": {"spool_dir": str(root / "spool")}})))
            with daemon_runtime(path, "bench", environ=environ) as runtime:

                def mail(i: int) -> Message:
                    envelope = Envelope(mail_from="<alice@customer.test>", rcpts=[f"<{SUPPORT}>"], queue_id=f"Q{i:08X}")
                    headers = [
                        ("Received", " from client.test (client.test [192.0.2.1]) by mx.example.test"),
                        ("Message-ID", f" <{i}.bench@customer.test>"),
                        ("From", " Alice <alice@customer.test>"),
                        ("To", f" {SUPPORT}"),
                        ("Date", " Mon, 30 Nov 2026 03:00:00 +0000"),
                        ("Subject", f" {subject(i, tokens)}"),
                    ]
                    if i % 2:
                        headers.append(("In-Reply-To", f" <{i - 1}.bench@customer.test>"))
                    return Message(envelope, headers)

                history = runtime.history
                if history is None:
                    raise RuntimeError("the runtime has no history writer")
                for i in range(WARMUP):
                    runtime.handle(mail(i), time.time())
                caught_up(history)
                cpu, wall = time.process_time(), time.perf_counter()
                for i in range(WARMUP, WARMUP + mails):
                    runtime.handle(mail(i), time.time())
                caught_up(history)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            redis.stop()
    return {"cpu_ms": cpu * 1000 / mails, "wall_us": wall * 1e6 / mails}


def caught_up(history: HistoryWriter) -> None:
    if not history.flush(60):
        raise RuntimeError("the history writer did not catch up within 60 s")


def subject(i: int, tokens: bool) -> str:
    """Mail ``i``: an even one opens ticket i/2 + 1 (numbering starts with the warm-up), the odd one after it
    answers it."""
    if not i % 2:
        return f"Question {i}"
    return f"Re: [Support #{(i - 1) // 2 + 1}] Question {i - 1}" if tokens else f"Re: Question {i - 1}"


def run(src: Path | None, mails: int, tokens: bool) -> dict[str, float]:
    env = dict(os.environ)
    for var in ("POSTROOM_REDIS_URL", "POSTROOM_DATABASE_URL", "POSTROOM_MILTER_SOCKET"):
        env.pop(var, None)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    done = subprocess.run(
        [sys.executable, __file__, "--child", "--mails", str(mails), *(["--tokens"] if tokens else [])],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"a run failed ({src or 'this postroom'}):\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mails", type=int, default=3000, help="measured mails per run (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each postroom, alternating (default 5)")
    parser.add_argument("--base-src", type=Path, help="src/ folder of another postroom to run beside this one")
    parser.add_argument("--tokens", action="store_true", help="follow-ups carry the ticket's token in the subject")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.mails, args.tokens)))
        return 0
    import postroom  # noqa: PLC0415 - only to name where this postroom comes from

    configs: dict[str, Path | None] = {"postroom": None}
    if args.base_src is not None:
        configs = {"base": args.base_src.resolve(), **configs}
    print(f"# postroom pipeline benchmark: {' '.join(sys.argv)}")
    print(
        f"postroom: {Path(postroom.__file__).parent}" + (f"; base: {args.base_src.resolve()}" if args.base_src else "")
    )
    print(
        f"{args.mails} mails per run after {WARMUP} warm-up mails, half new tickets, half follow-ups"
        f"{' with tokens' if args.tokens else ''}; "
        f"{args.rounds} rounds"
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, src in configs.items():
            got = run(src, args.mails, args.tokens)
            results[name].append(got)
            print(
                f"round {r + 1} {name:8} CPU {got['cpu_ms']:.3f} ms/mail, wall {got['wall_us']:.0f} us/mail", flush=True
            )
    print()
    for name, runs in results.items():
        cpu = [x["cpu_ms"] for x in runs]
        wall = [x["wall_us"] for x in runs]
        print(
            f"{name:8} CPU ms/mail median {statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f}), "
            f"wall us/mail median {statistics.median(wall):.0f} ({min(wall):.0f}-{max(wall):.0f})"
        )
    if "base" in results:
        ratio = statistics.median(x["cpu_ms"] for x in results["postroom"]) / statistics.median(
            x["cpu_ms"] for x in results["base"]
        )
        print(f"postroom / base, CPU per mail (medians): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
