"""A minimal PNG encoder (greyscale, 8 or 16 bits) with zlib and struct: no imaging library needed for the
one picture GET /daq/live serves.

Why not Pillow: one more binary dependency for a format this small; the encoder is the signature, three
chunks and filter byte 0 per row (PNG spec, ISO/IEC 15948). zlib level 1: the live image is re-encoded a few
times a second, and the bytes travel a local network; level 6 made them ~15 % smaller for ~4x the CPU.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
GREYSCALE = 0  # PNG colour type
ZLIB_LEVEL = 1


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_grey(image: np.ndarray) -> bytes:
    """A greyscale PNG of a 2-D uint8 or uint16 array (16-bit samples are big-endian, as PNG wants)."""
    if image.ndim != 2 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"a PNG needs a non-empty 2-D image, got shape {image.shape}")
    if image.dtype == np.uint8:
        depth, samples = 8, image
    elif image.dtype == np.uint16:
        depth, samples = 16, image.astype(">u2", copy=False)
    else:
        raise ValueError(f"a greyscale PNG holds uint8 or uint16 samples, got {image.dtype}")
    height, width = image.shape
    row_bytes = width * samples.itemsize
    # One copy, on purpose: the rows with their filter byte (0, none) in front, as zlib must see them.
    rows = np.zeros((height, 1 + row_bytes), np.uint8)
    rows[:, 1:] = np.ascontiguousarray(samples).view(np.uint8).reshape(height, row_bytes)
    header = struct.pack(">IIBBBBB", width, height, depth, GREYSCALE, 0, 0, 0)
    return (SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), ZLIB_LEVEL))
            + _chunk(b"IEND", b""))


def to_png_samples(image: np.ndarray, scale: str) -> np.ndarray:
    """The samples of the PNG of a detector image: "raw" keeps the values (uint8 and uint16 as they are;
    other types clipped to 0..65535 and rounded), "auto" stretches the image's own range to 8 bits."""
    if scale == "raw":
        if image.dtype in (np.uint8, np.uint16):
            return image
        return np.clip(np.nan_to_num(image, nan=0.0), 0, 65535).round().astype(np.uint16)
    if scale == "auto":
        values = np.nan_to_num(image.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            return np.zeros(image.shape, np.uint8)
        return ((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    raise ValueError(f"scale {scale!r}: expected 'raw' or 'auto'")
