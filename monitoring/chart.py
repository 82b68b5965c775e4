"""A tiny pure-Python PNG canvas: an RGB pixel buffer with lines, rectangles and a 3x5 bitmap font.

``Canvas.png()`` encodes it with ``zlib`` and ``struct`` (PNG colour type 2, 8 bits, filter 0 on
every row): no plotting library. The load-test charts (``loadtest.chart``) and the funnel chart of
``dispatch report`` (``dispatch.rounds.report``) both draw on it.
"""

from __future__ import annotations

import struct
import zlib

__all__ = ["BLACK", "GRID", "PNG_SIGNATURE", "WHITE", "Canvas", "Colour"]

#: The eight bytes every PNG file starts with.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

Colour = tuple[int, int, int]

WHITE: Colour = (255, 255, 255)
BLACK: Colour = (0, 0, 0)
GRID: Colour = (225, 225, 225)

#: 3x5 glyphs, one string of 15 "#"/"." cells per character (rows top to bottom).
_FONT: dict[str, str] = {
    "0": "####.##.##.####", "1": ".#.##..#..#.###", "2": "###..#####..###", "3": "###..####..####",
    "4": "#.##.####..#..#", "5": "####..###..####", "6": "####..####.####", "7": "###..#..#..#..#",
    "8": "####.#####.####", "9": "####.####..####", "A": ".#.#.#####.##.#", "B": "##.#.###.#.###.",
    "C": "####..#..#..###", "D": "##.#.##.##.###.", "E": "####..####..###", "F": "####..####..#..",
    "G": "####..#.##.####", "H": "#.##.#####.##.#", "I": "###.#..#..#.###", "J": "..#..#..##.####",
    "K": "#.##.###.#.##.#", "L": "#..#..#..#..###", "M": "#.#####.##.##.#", "N": "##.#.##.##.##.#",
    "O": "####.##.##.####", "P": "####.#####..#..", "Q": "####.##.###..##", "R": "##.#.###.#.##.#",
    "S": "####..###..####", "T": "###.#..#..#..#.", "U": "#.##.##.##.####", "V": "#.##.##.##.#.#.",
    "W": "#.##.##.#######", "X": "#.##.#.#.#.##.#", "Y": "#.##.#.#..#..#.", "Z": "###..#.#.#..###",
    ".": ".............#.", ",": "..........#.#..", ":": "....#.....#....", "-": "......###......",
    "/": "..#..#.#.#..#..", "%": "#.#..#.#.#..#.#", "(": ".#.#..#..#...#.", ")": ".#...#..#..#.#.",
    "=": "...###...###...", "+": "....#.###.#....", " ": "...............", "_": "............###",
    ">": "#...#...#.#.#..", "<": "..#.#.#...#...#", "'": ".#..#..........", "*": "#.#.#.#.#......",
}  # fmt: skip


def _glyph(char: str) -> str:
    glyph = _FONT.get(char.upper(), _FONT[" "])
    return glyph.ljust(15, ".")


class Canvas:
    """An RGB image in memory (origin top left)."""

    def __init__(self, width: int, height: int, background: Colour = WHITE) -> None:
        if width <= 0 or height <= 0:
            raise ValueError("a canvas needs a positive width and height")
        self.width = width
        self.height = height
        self._rows = [bytearray(bytes(background) * width) for _ in range(height)]

    def pixel(self, x: int, y: int) -> Colour:
        row = self._rows[y]
        return row[3 * x], row[3 * x + 1], row[3 * x + 2]

    def set(self, x: int, y: int, colour: Colour) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            self._rows[y][3 * x : 3 * x + 3] = bytes(colour)

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: Colour) -> None:
        """Fill the rectangle with corners (x0, y0) and (x1, y1), both included."""
        x0, x1 = sorted((max(0, x0), min(self.width - 1, x1)))
        y0, y1 = sorted((max(0, y0), min(self.height - 1, y1)))
        run = bytes(colour) * (x1 - x0 + 1)
        for y in range(y0, y1 + 1):
            self._rows[y][3 * x0 : 3 * x1 + 3] = run

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: Colour, *, width: int = 1) -> None:
        """Bresenham's line; ``width`` > 1 thickens it vertically and horizontally."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        half = width // 2
        while True:
            for o in range(-half, width - half):
                self.set(x0 + o, y0, colour)
                self.set(x0, y0 + o, colour)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, colour: Colour = BLACK, scale: int = 1) -> int:
        """Draw ``text`` with its top left at (x, y); returns the x after the last character."""
        for char in text:
            glyph = _glyph(char)
            for i, cell in enumerate(glyph):
                if cell == "#":
                    gx, gy = x + (i % 3) * scale, y + (i // 3) * scale
                    self.rect(gx, gy, gx + scale - 1, gy + scale - 1, colour)
            x += 4 * scale
        return x

    @staticmethod
    def text_width(text: str, scale: int = 1) -> int:
        return max(0, 4 * scale * len(text) - scale)

    def png(self) -> bytes:
        """Encode as PNG: signature, IHDR, one IDAT (filter 0 per row), IEND."""

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        raw = b"".join(b"\x00" + bytes(row) for row in self._rows)
        return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
