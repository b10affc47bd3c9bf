"""The deterministic pixel pattern std_udp_sim sends, recomputable by tests and by `std-daq demo`.

A pixel's value is a function of (image id, module, row, column) only:
- columns 0..3 of every row are a stamp of the image id, one byte each (bits 0-7, 8-15, 16-23, 24-31),
  so a frame or packet that lands under the wrong image id is caught bit for bit;
- every other pixel comes from a per-module base: `(row * 31 + col * 7 + module * 101) & value_mask`,
  which differs from row to row, so a packet at the wrong offset is caught too.
For Jungfrau the base also sets the gain bits (15..14) from `(row + col + module) % 16` through
JUNGFRAU_GAIN_CYCLE, which covers G0, G1, G2 and the invalid value 2 (one pixel in 16).
Values are what the detector means, before packing: Gigafrost's are 12-bit, unpacked to uint16.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from core_buffer.detectors import GIGAFROST, JUNGFRAU, StreamGeometry

STAMP_COLUMNS = 4
JUNGFRAU_GAIN_CYCLE = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 3, 3, 3, 2], dtype=np.uint16)


def _value_mask(stream: StreamGeometry) -> int:
    if stream.detector_type == JUNGFRAU:
        return 0x3FFF
    if stream.detector_type == GIGAFROST:
        return 0xFFF
    return (1 << stream.bit_depth) - 1


@lru_cache(maxsize=64)
def _base(stream: StreamGeometry, module_id: int) -> np.ndarray:
    rows = np.arange(stream.frame_height, dtype=np.uint64)[:, None]
    cols = np.arange(stream.frame_width, dtype=np.uint64)[None, :]
    values = (rows * 31 + cols * 7 + module_id * 101) & _value_mask(stream)
    if stream.detector_type == JUNGFRAU:
        gain = JUNGFRAU_GAIN_CYCLE[((rows + cols + module_id) % 16).astype(np.intp)]
        values = values | (gain.astype(np.uint64) << 14)
    base = values.astype(stream.pixel_dtype)
    base.setflags(write=False)
    return base


def stamp(image_id: int) -> np.ndarray:
    """The four stamp pixels of an image id."""
    return np.array([(image_id >> (8 * k)) & 0xFF for k in range(STAMP_COLUMNS)], dtype=np.uint64)


def frame_pattern(stream: StreamGeometry, module_id: int, image_id: int,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Pixels (frame_height x frame_width, stream.pixel_dtype) of one module's frame of `image_id`."""
    base = _base(stream, module_id)
    if out is None:
        out = np.empty_like(base)
    np.copyto(out, base)
    out[:, :STAMP_COLUMNS] = stamp(image_id).astype(out.dtype)
    return out


def frame_bytes(stream: StreamGeometry, module_id: int, image_id: int) -> np.ndarray:
    """The frame as it travels in packets and sits in the FrameBuffer (Gigafrost: 12-bit packed)."""
    from core_buffer.detectors import pack_12bit

    pixels = frame_pattern(stream, module_id, image_id)
    if stream.detector_type == GIGAFROST:
        return pack_12bit(pixels)
    return pixels.reshape(-1).view(np.uint8)
