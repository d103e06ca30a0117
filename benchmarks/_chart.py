"""The benchmark chart: horizontal bars per case, written as a PNG with numpy, zlib
and struct only (a 5x7 bitmap font for the labels), so the suite needs no
plotting library."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Bar", "Panel", "render", "write_png"]

# A 5x7 font: each glyph is 7 rows of 5 bits, the leftmost pixel in bit 4.
# Lowercase letters are drawn as capitals; anything else missing as "?".
_FONT: dict[str, tuple[int, ...]] = {
    "A": (0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E),
    "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F),
    "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F),
    "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11),
    "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11),
    "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D),
    "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E),
    "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A),
    "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04),
    "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    " ": (0, 0, 0, 0, 0, 0, 0),
    ".": (0, 0, 0, 0, 0, 0x0C, 0x0C),
    ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    "[": (0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E),
    "]": (0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E),
    "-": (0, 0, 0, 0x1F, 0, 0, 0),
    "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0),
    "=": (0, 0, 0x1F, 0, 0x1F, 0, 0),
    "_": (0, 0, 0, 0, 0, 0, 0x1F),
    "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0),
    ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0),
    "<": (0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02),
    ">": (0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08),
    "'": (0x04, 0x04, 0x08, 0, 0, 0, 0),
    "*": (0, 0x04, 0x15, 0x0E, 0x15, 0x04, 0),
    "!": (0x04, 0x04, 0x04, 0x04, 0x04, 0, 0x04),
    "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04),
}
_GLYPH_W, _GLYPH_H = 5, 7

WHITE = (255, 255, 255)
INK = (34, 34, 34)
GRID = (225, 225, 225)
OURS = (31, 119, 180)
PEER = (160, 160, 160)
WHISKER = (20, 20, 20)


def _glyph(ch: str) -> np.ndarray:
    rows = _FONT.get(ch.upper(), _FONT["?"])
    bits = np.array(rows, dtype=np.uint8)[:, None] >> np.arange(
        4, -1, -1, dtype=np.uint8
    )
    return (bits & 1).astype(bool)


def text_width(text: str, scale: int) -> int:
    return len(text) * (_GLYPH_W + 1) * scale


def draw_text(
    img: np.ndarray, x: int, y: int, text: str, scale: int = 2, color=INK
) -> None:
    """Draws `text` with its top-left corner at `(x, y)`, clipped to the image."""
    h, w = img.shape[:2]
    for ch in text:
        g = np.kron(_glyph(ch), np.ones((scale, scale), dtype=bool))
        gh, gw = g.shape
        y0, x0 = max(0, y), max(0, x)
        y1, x1 = min(h, y + gh), min(w, x + gw)
        if y1 > y0 and x1 > x0:
            region = img[y0:y1, x0:x1]
            region[g[y0 - y : y1 - y, x0 - x : x1 - x]] = color
        x += (_GLYPH_W + 1) * scale


def _rect(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, color) -> None:
    h, w = img.shape[:2]
    x0, x1 = max(0, min(x0, x1)), min(w, max(x0, x1))
    y0, y1 = max(0, min(y0, y1)), min(h, max(y0, y1))
    if x1 > x0 and y1 > y0:
        img[y0:y1, x0:x1] = color


def write_png(path: str, rgb: np.ndarray) -> None:
    """Writes an `(H, W, 3)` uint8 image as an 8-bit RGB PNG (no filtering)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, c = rgb.shape
    if c != 3:
        raise ValueError(f"expected an (H, W, 3) image, received shape {rgb.shape}")
    raw = np.concatenate(
        [np.zeros((h, 1), dtype=np.uint8), rgb.reshape(h, w * 3)], axis=1
    ).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    with open(path, "wb") as f:
        f.write(png)


@dataclass
class Bar:
    label: str
    value: float
    lo: float
    hi: float
    ours: bool
    text: str  # the value as printed at the bar's end


@dataclass
class Panel:
    title: str
    bars: Sequence[Bar]


_WIDTH = 1100
_LABEL_W = 420
_VALUE_W = 170
_ROW_H = 24
_TITLE_H = 34
_MARGIN = 16
_SCALE = 2


def render(panels: Sequence[Panel], title: str) -> np.ndarray:
    """Draws the panels one under the other; each bar scaled to its panel's max."""
    panels = [p for p in panels if p.bars]
    height = (
        _MARGIN * 2
        + _TITLE_H
        + sum(_TITLE_H + _ROW_H * len(p.bars) + _MARGIN for p in panels)
    )
    img = np.empty((height, _WIDTH, 3), dtype=np.uint8)
    img[:] = WHITE
    draw_text(img, _MARGIN, _MARGIN, title, scale=_SCALE + 1)
    y = _MARGIN + _TITLE_H + 8
    area = _WIDTH - _LABEL_W - _VALUE_W - 2 * _MARGIN
    x_bar = _MARGIN + _LABEL_W
    for p in panels:
        draw_text(img, _MARGIN, y + 8, p.title, scale=_SCALE)
        y += _TITLE_H
        top = max(max(b.hi, b.value) for b in p.bars) or 1.0
        _rect(img, x_bar, y, x_bar + 1, y + _ROW_H * len(p.bars), GRID)
        for b in p.bars:
            draw_text(img, _MARGIN, y + 5, b.label[: _LABEL_W // 12], scale=_SCALE)
            length = int(round(area * max(0.0, b.value) / top))
            _rect(
                img,
                x_bar,
                y + 3,
                x_bar + max(1, length),
                y + _ROW_H - 3,
                OURS if b.ours else PEER,
            )
            lo = x_bar + int(round(area * max(0.0, b.lo) / top))
            hi = x_bar + int(round(area * max(0.0, b.hi) / top))
            mid = y + _ROW_H // 2
            _rect(img, lo, mid - 1, hi + 1, mid + 1, WHISKER)
            _rect(img, lo, mid - 5, lo + 1, mid + 5, WHISKER)
            _rect(img, hi, mid - 5, hi + 1, mid + 5, WHISKER)
            draw_text(
                img, x_bar + max(length, hi - x_bar) + 8, y + 5, b.text, scale=_SCALE
            )
            y += _ROW_H
        y += _MARGIN
    return img
