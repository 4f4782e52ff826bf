"""Line numbers of the keys of a TOML document, for error messages that name ``file:line: key``.

tomllib reports positions only for syntax errors, so a mistake pydantic finds in a value (``redis.url``,
``mailboxes.support.agents[1]``) would name no line.  :func:`key_lines` reads the text once more and maps every
table header and every ``key = value`` to its line; :meth:`KeyLines.line` finds the longest known prefix of a key,
so a missing key points at its table and a bad list item at its key.  The text has already passed tomllib, so the
scan may be lenient: it only has to skip the inside of strings, arrays and inline tables correctly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _key(text: str) -> tuple[list[str], str]:
    """A dotted key at the start of ``text`` and the rest after it; ([], text) when there is none."""
    keys: list[str] = []
    rest = text.lstrip()
    while True:
        if rest.startswith('"'):
            m = re.match(r'"((?:[^"\\]|\\.)*)"', rest)
            if not m:
                return [], text
            keys.append(m.group(1).encode("latin-1", "backslashreplace").decode("unicode_escape"))
        elif rest.startswith("'"):
            m = re.match(r"'([^']*)'", rest)
            if not m:
                return [], text
            keys.append(m.group(1))
        else:
            m = _BARE.match(rest)
            if not m:
                return [], text
            keys.append(m.group(0))
        rest = rest[m.end() :].lstrip()
        if not rest.startswith("."):
            return keys, rest
        rest = rest[1:].lstrip()


def _value_end(rows: list[str], start: int, value: str) -> int:
    """The index of the last row of a value that begins with ``value`` on row ``start``."""
    depth, row, text, i = 0, start, value, 0
    while True:
        while i < len(text):
            if text.startswith(('"""', "'''"), i):
                quote = text[i : i + 3]
                end = text.find(quote, i + 3)
                while end == -1 and row + 1 < len(rows):
                    row, text = row + 1, rows[row + 1]
                    end = text.find(quote)
                i = len(text) if end == -1 else end + 3
                continue
            ch = text[i]
            if ch == "#":
                break
            if ch in "\"'":
                m = re.compile(r'"(?:[^"\\]|\\.)*"' if ch == '"' else r"'[^']*'").match(text, i)
                i = m.end() if m else len(text)
                continue
            depth += ch in "[{"
            depth -= ch in "]}"
            i += 1
        if depth <= 0 or row + 1 >= len(rows):
            return row
        row, text, i = row + 1, rows[row + 1], 0


@dataclass(frozen=True)
class KeyLines:
    lines: dict[tuple[str, ...], int]

    def line(self, key: tuple[str | int, ...]) -> int:
        """The line of ``key`` or of its longest prefix that has one; 1 when none has."""
        parts = tuple(str(p) for p in key if not isinstance(p, int))
        while parts:
            if parts in self.lines:
                return self.lines[parts]
            parts = parts[:-1]
        return 1


def key_lines(text: str) -> KeyLines:
    rows = [row.removesuffix("\r") for row in text.split("\n")]  # TOML counts "\n" only
    found: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    n = 0
    while n < len(rows):
        stripped = rows[n].strip()
        if stripped.startswith("["):
            keys, _ = _key(stripped.lstrip("["))
            table = tuple(keys)
            found.setdefault(table, n + 1)
        elif stripped and not stripped.startswith("#"):
            keys, rest = _key(stripped)
            if keys and rest.startswith("="):
                for depth in range(1, len(keys) + 1):
                    found.setdefault(table + tuple(keys[:depth]), n + 1)
                n = _value_end(rows, n, rest[1:])
        n += 1
    return KeyLines(found)
