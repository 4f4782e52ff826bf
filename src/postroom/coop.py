"""Blocking code that lets the asyncio milter engine's loop run while it waits for Redis.

The pipeline is synchronous: the libmilter engine and the after-queue filter run it on a thread per mail, where a
Redis round trip blocks only that thread.  The asyncio engine (postroom.milter.aio) runs it on its loop's own
thread, to spare the hand-overs of Python's lock between threads; there a blocking round trip would stop every
connection for as long as Redis takes to answer, which on a busy host is most of the time a mail spends in
postroom.  ``run`` calls the pipeline in a greenlet on the loop's thread; where the store waits for a reply
(``wait_readable``), the greenlet hands control back to the loop until the socket is readable, and the loop
serves the other connections meanwhile.  It is the pattern SQLAlchemy's asyncio support uses to run its
synchronous core over asyncio drivers, with greenlet, the library made for it.  Outside ``run`` (libmilter's
threads, the after-queue filter, the admin commands) ``wait_readable`` returns at once and the read blocks, as
before.

Between two waits a greenlet runs alone on the loop's thread, as a thread would between two blocking calls, so
code that is correct under threads is correct here; the one rule is that no lock may be held across a wait (a
second greenlet would block the thread taking it).  The store waits only between sending a script (or the reads
of a follow-up's look-up) and reading the replies, holding a connection of its own and no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import greenlet

T = TypeVar("T")

# The threads whose loop runs calls through ``run`` (the asyncio engine's one thread).
_loop_threads: set[int] = set()


class _Task(greenlet.greenlet):
    """A greenlet started by ``run``: its waits go to the loop."""


@dataclass(frozen=True)
class _Wait:
    sock: socket.socket
    timeout: float | None


def in_call() -> bool:
    """True inside a call of ``run`` (its waits go to the loop); cheap, and greenlet is asked only on a loop's
    thread."""
    return threading.get_ident() in _loop_threads and isinstance(greenlet.getcurrent(), _Task)


def wait_readable(sock: socket.socket, timeout: float | None) -> bool:
    """Until ``sock`` has data to read: True, or False when ``timeout`` seconds passed first.

    In a greenlet of ``run`` the loop serves other work meanwhile; anywhere else this returns True at once and the
    caller's read blocks (with its socket's own timeout), as it always did.
    """
    if threading.get_ident() not in _loop_threads:
        # Not the engine's loop: greenlet is not even asked, so libmilter's threads (a new one per connection,
        # started from C) never get greenlet's per-thread state to set up and tear down.
        return True
    current = greenlet.getcurrent()
    if not isinstance(current, _Task):
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # decrypted data already waits in the TLS layer; the descriptor may never become readable
    parent = current.parent
    assert parent is not None  # a _Task always has the loop's greenlet above it
    ready = parent.switch(_Wait(sock, timeout))
    return bool(ready)


async def _readable(sock: socket.socket, timeout: float | None) -> bool:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


async def run(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """``fn(*args)`` on this thread, the loop serving other work while it waits in ``wait_readable``; its result
    and the longest stretch it kept the loop to itself, in seconds."""
    _loop_threads.add(threading.get_ident())
    task = _Task(fn)
    started = time.monotonic()
    value = task.switch(*args)
    longest = time.monotonic() - started
    while isinstance(value, _Wait):
        try:
            ready = await _readable(value.sock, value.timeout)
        except asyncio.CancelledError:
            # The engine is stopping: the call must still end cleanly (a store connection whose reply was not
            # read must be dropped, not reused), so every wait it still makes fails at once; whatever it raises
            # then is the cancel's consequence, and the cancel goes on.
            with contextlib.suppress(Exception):
                while isinstance(value, _Wait):
                    value = task.switch(False)
            raise
        started = time.monotonic()
        value = task.switch(ready)
        longest = max(longest, time.monotonic() - started)
    return value, longest
