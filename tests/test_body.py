"""The body an adapter collects: in memory while small, spooled to a temporary file past the threshold, and read
back whole, as a head or in chunks, the same bytes whichever way it was split on arrival."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.body import Body, chunks_of, head_of

pieces = st.lists(st.binary(max_size=300), max_size=20)


@settings(max_examples=200, deadline=None)
@given(pieces, st.integers(min_value=0, max_value=2000), st.integers(min_value=0, max_value=3000))
def test_a_body_reads_back_the_bytes_it_was_given(parts: list[bytes], threshold: int, limit: int) -> None:
    data = b"".join(parts)
    body = Body(threshold=threshold)
    for part in parts:
        body.append(part)
    try:
        assert body.spooled == (len(data) > threshold)
        assert body.size == len(data)
        assert b"".join(body.chunks(size=7)) == data
        assert body.head(limit) == data[:limit] == head_of(body, limit)
        assert body() == data
        assert b"".join(chunks_of(body)) == data  # and again: reading does not consume it
        assert b"".join(chunks_of(body, limit, size=5)) == data[:limit] == b"".join(chunks_of(data, limit, size=3))
    finally:
        body.close()


def test_a_spooled_body_leaves_no_file_behind(tmp_path: os.PathLike[str]) -> None:
    body = Body(threshold=10, directory=os.fspath(tmp_path))
    body.append(b"x" * 100)
    assert body.spooled and os.listdir(tmp_path) == []  # unlinked at once
    assert os.fstat(body.fileno()).st_size == 100
    body.close()


def test_plain_bytes_and_callables_read_the_same_way() -> None:
    assert head_of(b"abcdef", 3) == b"abc"
    assert head_of(lambda: b"abcdef", 10) == b"abcdef"
    assert list(chunks_of(lambda: b"abcde", size=2)) == [b"ab", b"cd", b"e"]
