"""Helpers for the reliability tests: a time limit for in-process checks (no plugin needed) and
the bad-input corpus, generated at test time (no binary file is committed)."""
from __future__ import annotations

import signal
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

# readable, in an unusual mode: loaders must convert them to RGB
ODD_MODES = {"grayscale.png": "L", "rgba.png": "RGBA", "cmyk.jpg": "CMYK"}
# not usable as an image: loaders must skip and count them (or raise a clear error).
# big_8000px claims 64 Mpixels: under Pillow's own bomb limit, over the kit's guards.
UNREADABLE = ("truncated_jpeg.jpg", "truncated_png.png", "zero_bytes.png", "text_named.png",
              "bomb_20000px.png", "big_8000px.png")


@contextmanager
def time_limit(seconds: int):
    """Raises TimeoutError in the main thread after `seconds` (a hung DataLoader, a silent child)."""
    def expire(signum, frame):
        raise TimeoutError(f"gave up after {seconds} s: something hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def noise_image(mode: str = "RGB", size: int = 48, seed: int = 0) -> Image.Image:
    """Random pixels (they do not compress, so a truncated file misses real pixel data)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(rgb).convert(mode)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height RGB pixels, with one tiny data chunk: a
    decompression bomb for a loader without a pixel guard, written in microseconds."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def write_image_corpus(folder, name=lambda case: case, good: int = 2) -> dict[str, Path]:
    """Writes every image case, plus `good` plain RGB images (good_0.png, ...), into `folder`;
    `name(case)` gives a case's file name. Returns {case: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}

    def put(case: str) -> Path:
        out[case] = folder / name(case)
        return out[case]

    for i in range(good):
        noise_image(seed=i).save(put(f"good_{i}.png"))
    for case, mode in ODD_MODES.items():
        noise_image(mode, seed=7).save(put(case))
    for case, fmt in (("truncated_jpeg.jpg", "JPEG"), ("truncated_png.png", "PNG")):
        path = put(case)
        noise_image().save(path, fmt)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    put("zero_bytes.png").write_bytes(b"")
    put("text_named.png").write_text("this is a text file, not an image\n")
    put("bomb_20000px.png").write_bytes(png_header_only(20000, 20000))
    put("big_8000px.png").write_bytes(png_header_only(8000, 8000))
    return out
