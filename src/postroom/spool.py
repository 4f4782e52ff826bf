"""The history spool: an append-only log on local disk between the mail threads and SQL.

A mail thread appends its records with one ``write()`` (no fsync, no lock held across I/O but the append itself),
so a slow, stopped or frozen database never slows the mail, and a record handed to the spool survives the
process being killed: the kernel holds the bytes once ``write()`` returned.  The history thread fsyncs before each
batch it sends (so a power cut loses at most the records of the last fraction of a second), sends the batch, and
only then advances past it.  A record sent twice (the process died between the commit and the step forward) is
stored once: every record carries a unique key, and for a batch that may have been sent before (a stopped process's
segment, or the retry of a failed attempt) :func:`postroom.history.write` skips keys it already has.

Each process appends to segments of its own and holds an exclusive ``flock`` on them; a segment no live process
holds (its writer died) is adopted by the next process that looks, and replayed in the order it was written.
Memory stays bounded however long SQL is away: records wait on disk, not in a queue.  The spool is bounded too:
past ``max_bytes`` a record is refused (and counted, and logged once per minute) rather than filling the disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("postroom.history")

SUFFIX = ".spool"
# A segment is closed for appends past this size, and deleted once everything in it reached SQL.
SEGMENT_BYTES = 4 * 1024 * 1024
_FULL_LOG_EVERY = 60.0


class _Segment:
    """One file of the spool, locked by this process: appended to while active, read from ``offset`` on."""

    def __init__(self, path: Path, fd: int, *, adopted: bool = False) -> None:
        self.path = path
        self.fd = fd
        # Left by a process that stopped: it may have stored some of these records without stepping past them.
        self.adopted = adopted
        self.offset = 0  # bytes already sent to SQL (whole lines)
        self.size = os.fstat(fd).st_size

    def close(self) -> None:
        os.close(self.fd)  # also releases the flock


def _lock(path: Path, *, create: bool) -> int | None:
    """An fd of ``path`` with an exclusive flock, or None when another process holds it (or it vanished)."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not path.exists():
        # Its owner deleted it (fully sent) between our open and our lock.
        os.close(fd)
        return None
    return fd


@dataclass(frozen=True)
class Batch:
    """Records read from one segment, and where that segment's reading stands once they are stored."""

    items: list[dict[str, Any]]
    segment: _Segment
    end: int

    @property
    def adopted(self) -> bool:
        """From a stopped process's segment: some of its records may be stored already."""
        return self.segment.adopted


class Spool:
    """Append-only, size-bounded spool of JSON records in ``directory``; see the module docstring.

    ``append`` may be called from any thread; ``read``, ``commit``, ``sync`` and ``adopt`` from one (the history
    thread).
    """

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []  # oldest first; the last one is the active one
        self._dirty = False
        self.refused = 0  # records refused because the spool was full (a metric for the admin)
        self._full_logged = 0.0
        self._closed = False
        self.adopt()
        self._segments.append(self._new_segment())

    # -- mail threads --

    def append(self, items: list[dict[str, Any]]) -> bool:
        """Add records at the end (one ``write()``); False, with a log line, when the spool is full."""
        data = "".join(json.dumps(i, separators=(",", ":")) + "\n" for i in items).encode()
        with self._lock:
            if self._closed:
                return False
            if self.bytes_waiting() + len(data) > self.max_bytes:
                self._refuse(len(items))
                return False
            active = self._segments[-1]
            if active.size >= self.segment_bytes:
                active = self._new_segment()
                self._segments.append(active)
            os.write(active.fd, data)  # O_APPEND: one write, whole lines, even if a reader looks at the file now
            active.size += len(data)
            self._dirty = True
            return True

    def _refuse(self, count: int) -> None:
        self.refused += count
        now = time.monotonic()
        if now - self._full_logged >= _FULL_LOG_EVERY:
            self._full_logged = now
            log.error(
                "history spool full: %d bytes waiting in %s (limit [database] spool_max_mb); "
                "%d records not recorded so far - is the database reachable?",
                self.bytes_waiting(),
                self.directory,
                self.refused,
            )

    def bytes_waiting(self) -> int:
        """Bytes on disk in this process's segments not yet stored in SQL."""
        return sum(s.size - s.offset for s in self._segments)

    # -- the history thread --

    def sync(self) -> None:
        """fsync what was appended since the last call (once per batch, not once per mail)."""
        with self._lock:
            dirty, self._dirty = self._dirty, False
            fds = [s.fd for s in self._segments] if dirty else []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.fsync(fd)

    def read(self, limit: int) -> Batch | None:
        """Up to ``limit`` records of the oldest segment with unsent lines, in the order they were written."""
        with self._lock:
            segments = list(self._segments)
        for seg in segments:
            if seg.offset >= seg.size:
                continue
            data = os.pread(seg.fd, min(seg.size - seg.offset, 1 << 20), seg.offset)
            items, used = _parse(data, limit, seg.path)
            if used == 0 and seg is not segments[-1] and len(data) == seg.size - seg.offset:
                # A last line cut short by a crash: its writer is gone and will never finish it.
                log.error("history spool %s: dropping an incomplete last line of %d bytes", seg.path, len(data))
                used = len(data)
            if used:
                return Batch(items, seg, seg.offset + used)
        return None

    def commit(self, batch: Batch) -> None:
        """The batch is stored: step past it, and delete segments that are done and closed for appends."""
        with self._lock:
            batch.segment.offset = batch.end
            active = self._segments[-1]
            if active.offset >= active.size >= self.segment_bytes:
                # A full active segment that is all sent: start a fresh one so the old one can go.
                self._segments.append(self._new_segment())
            # Only the active segment is still appended to; any other one, all sent, is done.
            done = [s for s in self._segments[:-1] if s.offset >= s.size]
            for s in done:
                self._segments.remove(s)
        for s in done:
            with contextlib.suppress(FileNotFoundError):
                s.path.unlink()
            s.close()

    def adopt(self) -> int:
        """Take over segments of processes that died; returns how many.  They are read before our own."""
        adopted: list[_Segment] = []
        with self._lock:
            mine = {s.path for s in self._segments}
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path in mine:
                continue
            fd = _lock(path, create=False)
            if fd is not None:
                adopted.append(_Segment(path, fd, adopted=True))
        if adopted:
            waiting = sum(s.size for s in adopted)
            log.info(
                "history spool: replaying %d segment(s), %d bytes, left by a stopped process", len(adopted), waiting
            )
            with self._lock:
                # Their records are older than anything this process appended: read them first, oldest first.
                self._segments[:0] = adopted
        return len(adopted)

    def close(self) -> None:
        """fsync and release every segment; what was not sent stays on disk for the next start."""
        self.sync()
        with self._lock:
            self._closed = True
            segments, self._segments = self._segments, []
        for s in segments:
            if s.size == 0 or s.offset >= s.size:
                with contextlib.suppress(FileNotFoundError):
                    s.path.unlink()
            s.close()

    def _new_segment(self) -> _Segment:
        while True:
            # Names sort by creation time across processes: replay keeps the order records were written in.
            path = self.directory / f"{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
            try:
                fd = _lock(path, create=True)
            except FileExistsError:
                continue
            if fd is not None:
                return _Segment(path, fd)


def _parse(data: bytes, limit: int, where: Path) -> tuple[list[dict[str, Any]], int]:
    """Whole lines of ``data`` as records, at most ``limit``; and how many bytes they took."""
    items: list[dict[str, Any]] = []
    used = 0
    for line in _lines(data):
        if len(items) >= limit:
            break
        used += len(line)
        try:
            item = json.loads(line)
        except ValueError:
            log.error("history spool %s: skipping an unreadable line of %d bytes", where, len(line))
            continue
        if isinstance(item, dict):
            items.append(item)
    return items, used


def _lines(data: bytes) -> Iterator[bytes]:
    start = 0
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            return
        yield data[start : end + 1]
        start = end + 1


def pending_files(directory: Path) -> list[Path]:
    """The spool's segment files (for ``config check`` and the admin: what waits to reach SQL)."""
    return sorted(directory.glob(f"*{SUFFIX}")) if directory.is_dir() else []
