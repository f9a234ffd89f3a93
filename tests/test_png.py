"""accel's PNG writer: standard files that any decoder (here PIL's) reads back to exactly the pixels
written, whatever the mode, size and number of compression threads."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from accel.png import MIN_BAND_BYTES, encode_png


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 37), (29, 1), (64, 48), (700, 513)])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_pixels_come_back_exactly(mode: str, height: int, width: int, threads: int) -> None:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    rng = np.random.default_rng(height * 1000 + width)
    # Smooth gradients with noise on top: the "Up" differences wrap around modulo 256 somewhere.
    ramp = np.add.outer(np.arange(height), np.arange(width))[..., None] * 3
    pixels = ((ramp + rng.integers(0, 256, (height, width, channels))) % 256).astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode)
    data = encode_png(image, threads=threads)
    back = _decoded(data)
    assert back.format == "PNG" and back.mode == mode and back.size == (width, height)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(image))


@pytest.mark.parametrize(("axis", "row_filter"), [(0, 2), (1, 1)])
def test_large_images_are_compressed_in_bands_that_join_into_one_stream(axis: int, row_filter: int) -> None:
    """Several bands (sync-flushed raw deflate) under one zlib header and checksum: zlib itself accepts
    the stream; the filter that suits the image is used ("Up" where rows repeat, "Sub" where pixels
    repeat along the row), so the file is about as small as PIL's at the same level."""
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.integers(-2, 3, (512, 512, 3)), axis=axis) % 256
    image = Image.fromarray(smooth.astype(np.uint8), mode="RGB")
    raw_bytes = 512 * (512 * 3 + 1)
    assert raw_bytes // MIN_BAND_BYTES >= 3  # so 4 threads make several bands
    data = encode_png(image, threads=4)
    idat = data[data.index(b"IDAT") + 4 :]
    stream = idat[: int.from_bytes(data[data.index(b"IDAT") - 4 : data.index(b"IDAT")], "big")]
    rows = zlib.decompress(stream)
    assert len(rows) == raw_bytes
    assert {rows[i * (512 * 3 + 1)] for i in range(1, 512)} == {row_filter}
    np.testing.assert_array_equal(np.asarray(_decoded(data)), np.asarray(image))
    pil = io.BytesIO()
    image.save(pil, format="PNG", compress_level=1)
    assert len(data) < 1.3 * len(pil.getvalue())


def test_other_modes_are_written_by_pil() -> None:
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").convert("P")
    back = _decoded(encode_png(image))
    assert back.mode == "P"
    np.testing.assert_array_equal(np.asarray(back), np.asarray(image))
