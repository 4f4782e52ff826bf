"""An empty milter without libmilter: the milter protocol spoken by asyncio on one thread, as a second baseline.

bench/empty_milter.py is pymilter on libmilter, which starts a thread for every SMTP connection; every callback
then takes Python's global lock.  This milter negotiates the same steps and no-reply marks as that one (the
steps it does not implement are switched off, connect, recipients, headers and body answer nothing), accepts
every mail at end of message and decides nothing, but runs all connections on one asyncio thread.  The
difference between the two is what libmilter's threading costs a Python milter, before any work is done.

Usage: ``python bench/asyncio_empty_milter.py [--edits] /path/to/milter.sock``; runs until SIGTERM/SIGINT and
then prints how many messages it accepted (the same line as bench/empty_milter.py, which bench/inbound.py
checks).  ``--edits`` adds the five headers postroom adds to a new ticket, as bench/empty_milter.py does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys

from empty_milter import new_ticket_headers

# Milter protocol version 6 (libmilter's mfdef.h).
VERSION = 6
ACTIONS = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # add/change headers, add/delete recipients, body, sender
NO_HELO, NO_DATA, NO_EOH, NO_UNKNOWN = 0x2, 0x200, 0x40, 0x100
NR_CONN, NR_RCPT, NR_HDR, NR_BODY = 0x1000, 0x8000, 0x80, 0x80000
SKIP = 0x400
# What pymilter negotiates for bench/empty_milter.py: hello, data, eoh and unknown are not implemented there.
STEPS = NO_HELO | NO_DATA | NO_EOH | NO_UNKNOWN | NR_CONN | NR_RCPT | NR_HDR | NR_BODY | SKIP
NO_REPLY = {b"C": NR_CONN, b"R": NR_RCPT, b"L": NR_HDR, b"B": NR_BODY}


class Counter:
    accepted = 0


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + cmd + data


def header_edits(number: int) -> bytes:
    return b"".join(
        packet(b"h", name.encode() + b"\0" + value.encode() + b"\0") for name, value in new_ticket_headers(number)
    )


async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: Counter, edits: bool) -> None:
    steps = STEPS
    try:
        while True:
            size = struct.unpack(">I", await reader.readexactly(4))[0]
            data = await reader.readexactly(size)
            cmd = data[:1]
            if cmd == b"O":
                _version, _actions, offered = struct.unpack(">III", data[1:13])
                steps = STEPS & offered
                writer.write(packet(b"O", struct.pack(">III", VERSION, ACTIONS, steps)))
            elif cmd in (b"D", b"A"):
                continue  # macros and abort are not answered
            elif cmd == b"E":
                counter.accepted += 1
                if edits:
                    writer.write(header_edits(counter.accepted))
                writer.write(packet(b"a"))
            elif cmd in (b"Q", b"K"):
                return  # K: Postfix reuses the connection for another one; this milter keeps no state anyway
            elif not steps & NO_REPLY.get(cmd, 0):
                writer.write(packet(b"c"))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    finally:
        writer.close()


async def serve(path: str, edits: bool) -> int:
    counter = Counter()
    with_lock = os.umask(0)  # Postfix's smtpd runs as another user than the benchmark
    try:
        server = await asyncio.start_unix_server(lambda r, w: session(r, w, counter, edits), path)
    finally:
        os.umask(with_lock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"asyncio empty milter listening on unix:{path}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()
    return counter.accepted


def main(argv: list[str]) -> int:
    edits = bool(argv) and argv[0] == "--edits"
    argv = argv[1:] if edits else argv
    if len(argv) != 1:
        print("usage: asyncio_empty_milter.py [--edits] SOCKET_PATH", file=sys.stderr)
        return 2
    path = argv[0].removeprefix("unix:").removeprefix("local:")
    accepted = asyncio.run(serve(path, edits))
    print(f"empty milter stopped; accepted {accepted} messages", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
