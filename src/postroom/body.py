"""A mail's body as an adapter collects it: in memory while small, in an anonymous temporary file past a threshold.

Why: an agent may attach 25 MB to a reply, and a stranger may send 30 MB.  Joined into one bytes object, copied into
a MIME parse and again for the signature, such a mail used to cost the milter many times its size (issue 15).
Spooled, it costs at most its size once in the page cache of a file, and each reader takes what it needs: the
commands at the top of an agent's reply (:meth:`Body.head`), the streaming DKIM hash (:meth:`Body.chunks`), or,
where a whole copy is unavoidable (a body that is replaced), :meth:`Body.__call__`.

A Body is callable like the ``BodyAccess`` functions the pipeline takes (``message.body()`` is the whole body),
so everything that reads a body whole keeps working.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

# Bodies up to this stay in memory: a 1 MiB list of chunks costs nothing worth a file.
SPOOL_BYTES = 1024 * 1024
CHUNK = 64 * 1024


class Body:
    """Chunks appended as they arrive; read back whole, as a head, or in chunks, as often as needed."""

    def __init__(self, threshold: int = SPOOL_BYTES, directory: str | None = None) -> None:
        self._threshold = threshold
        self._directory = directory
        self._chunks: list[bytes] = []
        self._file: BinaryIO | None = None
        self.size = 0

    @classmethod
    def of(cls, data: bytes) -> Body:
        body = cls(threshold=max(SPOOL_BYTES, len(data)))
        body.append(data)
        return body

    @classmethod
    def from_file(cls, file: BinaryIO, size: int) -> Body:
        """A body another process spooled (the milter's worker transport hands the file over)."""
        body = cls()
        body._file = file
        body.size = size
        return body

    @property
    def spooled(self) -> bool:
        return self._file is not None

    def fileno(self) -> int:
        if self._file is None:
            raise ValueError("the body is in memory, not in a file")
        self._file.flush()
        return self._file.fileno()

    def append(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._file is not None:
            self._file.write(chunk)
            return
        self._chunks.append(chunk)
        if self.size > self._threshold:
            # Unlinked at once: nothing is left behind whatever happens to the process.
            self._file = tempfile.TemporaryFile(prefix="postroom-body-", dir=self._directory)  # noqa: SIM115
            for held in self._chunks:
                self._file.write(held)
            self._chunks = []

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        if self._file is None:
            yield from self._chunks
            return
        self._file.flush()
        offset = 0
        while offset < self.size:
            # pread: readers never share or move a file position.
            data = os.pread(self._file.fileno(), min(size, self.size - offset), offset)
            if not data:
                return
            offset += len(data)
            yield data

    def head(self, limit: int) -> bytes:
        """The first ``limit`` bytes (all of a shorter body)."""
        out: list[bytes] = []
        left = limit
        for chunk in self.chunks(min(limit, CHUNK) or 1):
            if left <= 0:
                break
            out.append(chunk[:left])
            left -= len(out[-1])
        return b"".join(out)

    def __call__(self) -> bytes:
        """The whole body as one bytes object: one copy of it in memory, for readers that need it whole."""
        if self._file is None:
            if len(self._chunks) > 1:
                self._chunks = [b"".join(self._chunks)]
            return self._chunks[0] if self._chunks else b""
        return b"".join(self.chunks(1 << 20))

    def close(self) -> None:
        """Close the spool file (a body in memory goes with its last reference)."""
        if self._file is not None:
            self._file.close()


def head_of(body: bytes | Callable[[], bytes], limit: int) -> bytes:
    """The first ``limit`` bytes of a body given as bytes, a Body or any other way to get it whole."""
    if isinstance(body, Body):
        return body.head(limit)
    data = body() if callable(body) else body
    return data[:limit]


def chunks_of(body: bytes | Callable[[], bytes], limit: int | None = None, size: int = CHUNK) -> Iterator[bytes]:
    """A body (its first ``limit`` bytes) in chunks of at most ``size`` bytes, never copied whole where it is a
    Body: what a feed parser or a hash takes without holding the body twice."""
    left = -1 if limit is None else limit
    if isinstance(body, Body):
        pieces: Iterable[bytes] = body.chunks(size)
    else:
        data = body() if callable(body) else body
        pieces = (data[i : i + size] for i in range(0, len(data), size))
    for piece in pieces:
        if left == 0:
            return
        part = piece if left < 0 else piece[:left]
        left -= len(part) if left > 0 else 0
        yield part
