"""A small bar-and-line chart as a PNG, written with zlib and struct only.

Mail clients differ in what they show: Outlook shows no SVG and no data: URLs, Thunderbird and Outlook both show
a PNG attached as an inline part (``cid:``).  Drawing a few bars and a line needs no imaging library: the image
is a palette of five colours, one byte per pixel, and the PNG container is a dozen lines (RFC 2083).
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence

WHITE, GRID, BAR, LINE, AXIS = 0, 1, 2, 3, 4
PALETTE = bytes((255, 255, 255, 225, 225, 225, 79, 129, 189, 230, 126, 34, 90, 90, 90))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(pixels: list[bytearray], palette: bytes = PALETTE) -> bytes:
    """An 8-bit palette PNG of rows of palette indices."""
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)  # filter type 0 on every row
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
        + _chunk(b"PLTE", palette)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def _line(pixels: list[bytearray], a: tuple[int, int], b: tuple[int, int], colour: int) -> None:
    (x0, y0), (x1, y1) = a, b
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(steps + 1):
        x = x0 + (x1 - x0) * i // steps
        y = y0 + (y1 - y0) * i // steps
        for dy in (0, 1):
            if 0 <= y + dy < len(pixels):
                pixels[y + dy][x] = colour


def bars_and_line(bars: Sequence[float], line: Sequence[float | None], width: int = 420, height: int = 160) -> bytes:
    """Bars (backlog) and a line with dots (first response time), each scaled to its own maximum."""
    pixels = [bytearray(width) for _ in range(height)]
    top, bottom, left = 10, height - 12, 10
    for y in range(top, bottom, max(1, (bottom - top) // 4)):
        pixels[y][left : width - 10] = bytes([GRID]) * (width - 10 - left)
    pixels[bottom][left : width - 10] = bytes([AXIS]) * (width - 10 - left)
    n = max(1, len(bars))
    slot = (width - 20) // n
    high = max([*bars, 1.0])
    points: list[tuple[int, int]] = []
    line_high = max([v for v in line if v is not None] + [1.0])
    for i, value in enumerate(bars):
        x0 = left + i * slot + slot // 4
        x1 = left + (i + 1) * slot - slot // 4
        y = bottom - int((bottom - top) * value / high)
        for row in range(y, bottom):
            pixels[row][x0:x1] = bytes([BAR]) * (x1 - x0)
        v = line[i] if i < len(line) else None
        if v is not None:
            points.append((left + i * slot + slot // 2, bottom - int((bottom - top) * v / line_high)))
    for a, b in itertools.pairwise(points):
        _line(pixels, a, b, LINE)
    for x, y in points:
        for yy in range(max(0, y - 3), min(height, y + 4)):
            pixels[yy][max(0, x - 3) : x + 4] = bytes([LINE]) * (min(width, x + 4) - max(0, x - 3))
    return png(pixels)
