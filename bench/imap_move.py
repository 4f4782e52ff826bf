"""How long an agent's drag takes in the mail client: IMAP MOVE with and without postroom's IMAPSieve hook.

Usage: ``.venv/bin/python bench/imap_move.py [--moves N] [--rounds R]`` (as root: it runs a testbed stack with the
milter and the Dovecot configuration ``postroom dovecot-snippet --write`` makes).

Three kinds of MOVE, each ``--moves`` times per round, rounds interleaved, timed from the client (UID MOVE sent
to its OK; this is what the agent waits for):

- ``no hook``: the agent moves a mail between two folders of their own mailbox (no IMAPSieve pattern matches);
- ``hook, no meaning``: from the team INBOX into a folder postroom gives no meaning (the hook starts
  ``postroom imap-event``, which loads the config, reads the mail's header and exits);
- ``claim``: from the team INBOX into the agent's folder (the whole move: Redis claim, SQL history).

It prints medians and ranges (ms) side by side; the first is the baseline of the same run.
"""

from __future__ import annotations

import argparse
import imaplib
import statistics
import time
import uuid
from collections.abc import Callable, Sequence

from postroom.config import example_config_path, load_config
from postroom_testbed.imap import Team, deploy_team

PASSWORDS = {"meier": "meier-pw", "mueller": "mueller-pw", "schulze": "schulze-pw"}


def _mail(n: int) -> bytes:
    mid = f"<bench-{uuid.uuid4().hex}@customer.test>"
    return f"From: alice@customer.test\r\nSubject: bench {n}\r\nMessage-ID: {mid}\r\n\r\nHello.\r\n".encode()


def _timed_move(imap: imaplib.IMAP4, source: str, dest: str) -> float:
    imap.select(f'"{source}"')
    _s, data = imap.uid("SEARCH", "ALL")
    uid = data[0].split()[0].decode()
    start = time.perf_counter()
    status, detail = imap.uid("MOVE", uid, f'"{dest}"')
    elapsed = time.perf_counter() - start
    if status != "OK":
        raise RuntimeError(f"MOVE {source} -> {dest}: {detail!r}")
    return elapsed * 1000


def _fill(master: imaplib.IMAP4, folder: str, count: int) -> None:
    master.create(f'"{folder}"')
    for n in range(count):
        master.append(f'"{folder}"', "", imaplib.Time2Internaldate(time.time()), _mail(n))


def run(team: Team, moves: int, rounds: int) -> dict[str, list[float]]:
    stack = team.deployment.stack
    port = stack.dovecot.imap_port
    agent = imaplib.IMAP4("127.0.0.1", port)
    agent.login("meier", PASSWORDS["meier"])
    # The team INBOX is filled over IMAP as the shared mailbox's own user (no hook: its private namespace).
    shared = imaplib.IMAP4("127.0.0.1", port)
    shared.login("support@example.test", "secret")
    _fill(shared, "INBOX", moves * rounds * 2)
    _fill(agent, "Own", moves * rounds)
    agent.create('"Own-done"')
    kinds: dict[str, Callable[[], float]] = {
        "no hook": lambda: _timed_move(agent, "Own", "Own-done"),
        "hook, no meaning": lambda: _timed_move(agent, "Support", "Support/Archive"),
        "claim": lambda: _timed_move(agent, "Support", "Support/Meier"),
    }
    agent.create('"Support/Archive"')
    results: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):
        for kind, move in kinds.items():
            results[kind] += [move() for _ in range(moves)]
    agent.logout()
    shared.logout()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=10, help="moves of each kind per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    config = load_config(example_config_path(), environ={})
    with deploy_team(config, PASSWORDS) as team:
        results = run(team, args.moves, args.rounds)
    base = statistics.median(results["no hook"])
    print(f"{'MOVE':<18} {'median ms':>10} {'range ms':>18} {'x no hook':>10}")
    for kind, times in results.items():
        median = statistics.median(times)
        spread = f"{min(times):.1f}-{max(times):.1f}"
        print(f"{kind:<18} {median:>10.1f} {spread:>18} {median / base:>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
