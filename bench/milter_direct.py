"""Milter CPU per message without Postfix: a raw milter-protocol client drives the milter's unix socket directly.

Usage: ``.venv/bin/python bench/milter_direct.py [--messages N] [--sessions S] [--size BYTES] [--runs R]
[--milter postroom|postroom-w0|postroom-w1|empty|aempty|floor]``

For small changes to the mail path the end-to-end figures of bench/inbound.py drown in Postfix's and Dovecot's
share of the two CPUs.  This starts a testbed stack only for its Redis, runs the milter as bench/inbound.py does,
and plays Postfix itself: ``--sessions`` threads open one connection per message and send what Postfix's MX
listener sends for smtp-source's mail (macros, connect, MAIL, RCPT, four headers, the body in 65535-byte chunks,
end of message), honouring the steps the milter negotiated away or answers not (no-reply) and SKIP.  It prints
per run the milter's CPU ms/message split into user and system time, and its context switches.  The client runs
on the same CPUs; the figures compare milter versions with each other, not with bench/inbound.py's.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from inbound import RECIPIENT, SENDER
from postroom.config import ENV_OVERRIDES
from postroom_testbed import MailUser, Stack
from runloop import (
    BASE_CONFIG,
    BASE_SRC_VAR,
    family,
    make_milter,
    postroom_source,
    settled_cpu_seconds,
    user_system,
    wait_quiet,
)

# Milter protocol version 6 (libmilter's mfdef.h).
_ALL_ACTIONS = 0x1FF
_ALL_STEPS = 0x1FFFFF
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA = 0x1000, 0x2000, 0x4000, 0x8000, 0x10000
NR_HDR, NR_EOH, NR_BODY = 0x80, 0x40000, 0x80000
_FINAL = {b"a", b"c", b"r", b"t", b"d", b"y"}  # accept, continue, reject, tempfail, discard, reply code
_CHUNK = 65535  # what Postfix sends per body packet


def _z(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


class Connection:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""
        self.steps = 0

    def send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">I", len(data) + 1) + cmd + data)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            more = self.sock.recv(65536)
            if not more:
                raise EOFError("the milter closed the connection")
            self.buf += more

    def recv(self) -> bytes:
        self._fill(4)
        size = struct.unpack(">I", self.buf[:4])[0]
        self._fill(4 + size)
        packet, self.buf = self.buf[4 : 4 + size], self.buf[4 + size :]
        return packet[:1]

    def negotiate(self) -> None:
        self.send(b"O", struct.pack(">III", 6, _ALL_ACTIONS, _ALL_STEPS))
        self._fill(4)
        size = struct.unpack(">I", self.buf[:4])[0]
        self._fill(4 + size)
        packet, self.buf = self.buf[4 : 4 + size], self.buf[4 + size :]
        _version, _actions, self.steps = struct.unpack(">III", packet[1:13])

    def step(self, cmd: bytes, data: bytes, no_reply: int) -> bytes | None:
        self.send(cmd, data)
        return None if self.steps & no_reply else self.recv()

    def close(self) -> None:
        self.send(b"Q")
        self.sock.close()


def one_message(path: str, qid: str, body: bytes) -> bytes:
    """One mail on its own connection; the milter's final answer."""
    conn = Connection(path)
    try:
        conn.negotiate()
        conn.send(b"D", b"C" + _z("j", "mx.example.test", "{daemon_name}", "mx.example.test"))
        conn.step(b"C", _z("client.test") + b"4" + struct.pack(">H", 25) + _z("127.0.0.1"), NR_CONN)
        conn.step(b"H", _z("client.test"), NR_HELO)
        conn.send(b"D", b"M" + _z("{mail_addr}", SENDER))
        conn.step(b"M", _z(f"<{SENDER}>"), NR_MAIL)
        conn.send(b"D", b"R" + _z("{rcpt_addr}", RECIPIENT, "i", qid))
        conn.step(b"R", _z(f"<{RECIPIENT}>"), NR_RCPT)
        conn.step(b"T", b"", NR_DATA)
        headers = [
            ("From", f"<{SENDER}>"),
            ("To", f"<{RECIPIENT}>"),
            ("Date", time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())),
            ("Message-Id", f"<{qid}.{time.time_ns()}@client.test>"),
        ]
        for name, value in headers:
            conn.step(b"L", _z(name, value), NR_HDR)
        conn.step(b"N", b"", NR_EOH)
        for offset in range(0, len(body), _CHUNK):
            if conn.step(b"B", body[offset : offset + _CHUNK], NR_BODY) == b"s":
                break  # SKIP: Postfix sends no more of the body
        conn.send(b"D", b"E" + _z("i", qid))
        conn.send(b"E")
        while (answer := conn.recv()) not in _FINAL:
            pass  # edits
        conn.close()
        return answer
    finally:
        conn.sock.close()


def drive(path: str, messages: int, sessions: int, size: int, tag: str) -> list[bytes]:
    body = (b"x" * 78 + b"\r\n") * max(1, size // 80)
    answers: list[bytes] = []
    lock = threading.Lock()

    def session(index: int) -> None:
        for i in range(index, messages, sessions):
            answer = one_message(path, f"{tag}{i:06d}", body)
            with lock:
                answers.append(answer)

    threads = [threading.Thread(target=session, args=(k,)) for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def context_switches(pid: int) -> int:
    total = 0
    for member in family(pid):
        for tid in os.listdir(f"/proc/{member}/task"):
            for line in Path(f"/proc/{member}/task/{tid}/status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=2048, help="body bytes (default 2048)")
    parser.add_argument("--runs", type=int, default=3)
    milters = ("postroom", "postroom-aio", "postroom-w0", "postroom-w1", "postroom-base", "empty", "aempty", "floor")
    parser.add_argument("--milter", choices=milters, default="postroom", help="as bench/inbound.py's --configs")
    parser.add_argument("--base-src", type=Path, help="src/ folder of the postroom that --milter postroom-base runs")
    args = parser.parse_args(argv)
    for var in ENV_OVERRIDES:
        os.environ.pop(var, None)
    if args.milter == BASE_CONFIG:
        if args.base_src is None:
            parser.error(f"{BASE_CONFIG} needs --base-src")
        os.environ[BASE_SRC_VAR] = str(args.base_src.resolve())
    empty = "bench/asyncio_empty_milter.py" if args.milter == "aempty" else "bench/empty_milter.py"
    source = str(args.base_src) if args.milter == BASE_CONFIG else postroom_source()
    print(f"milter: {args.milter}, {source if args.milter.startswith('postroom') else empty}", flush=True)
    with Stack(users=[MailUser(RECIPIENT), MailUser(SENDER)], milter="auto") as stack:
        milter, _cfg, _notes = make_milter(args.milter, stack)
        milter.start()
        try:
            pid = milter.pid
            assert pid is not None
            path = str(stack.milter_socket_path)
            drive(path, 200, args.sessions, args.size, "W")  # warm-up
            for run in range(args.runs):
                busy = wait_quiet()
                before, (user0, sys0), switches0 = settled_cpu_seconds(pid), user_system(pid), context_switches(pid)
                start = time.monotonic()
                answers = drive(path, args.messages, args.sessions, args.size, f"R{run}X")
                seconds = time.monotonic() - start
                used = settled_cpu_seconds(pid) - before
                user1, sys1 = user_system(pid)
                n = len(answers)
                print(
                    f"{n} messages of {args.size} B: {n / seconds:.0f} msgs/s, "
                    f"milter CPU {1000 * used / n:.3f} ms/message (user {1000 * (user1 - user0) / n:.3f}, "
                    f"system {1000 * (sys1 - sys0) / n:.3f}), "
                    f"{(context_switches(pid) - switches0) / n:.1f} context switches/message, answers "
                    f"{sorted({a.decode() for a in answers})}; machine {busy:.0f}% busy before",
                    flush=True,
                )
        finally:
            milter.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
