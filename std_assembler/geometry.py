"""Where each module's frame goes in the image, per detector (docs/std_assembler.md has the pictures).

A `Placer` knows, per module, the view of the image its frame fills, and writes a frame there:
- Jungfrau: the frame (rows x 1024) at its `module_positions` rectangle, default stacked in module order.
- Eiger: the half-module frame (256 x 512) at its rectangle, which is 2 columns wider than the frame: the
  gap between the two chips (columns 256-257 of the rectangle) stays zero. `y1 < y0` flips (the bottom
  half-modules), `x1 < x0` mirrors.
- Gigafrost: stream 2q + l holds link l of quadrant q (0 NW, 1 NE, 2 SW, 3 SE), 12-bit packed. Its row r is
  row s = 2r + l of the quadrant in sending order; bottom quadrants send from their top row (the
  sensor's centre line) down, top quadrants from their bottom row (also the centre line) up.
Gap pixels are never written, so they stay zero; a missing module's area is zeroed.
"""
from __future__ import annotations

import numpy as np

from core_buffer.config import DetectorConfig, ModulePosition
from core_buffer.detectors import EIGER, GIGAFROST, JUNGFRAU
from core_buffer.errors import ConfigError

EIGER_CHIP = 256
EIGER_CHIP_GAP = 2


def _span(a: int, b: int) -> slice:
    """Inclusive a..b, reversed when b < a."""
    if b >= a:
        return slice(a, b + 1)
    return slice(a, b - 1 if b > 0 else None, -1)


def region(image: np.ndarray, pos: ModulePosition) -> np.ndarray:
    return image[_span(pos.y0, pos.y1), _span(pos.x0, pos.x1)]


def default_positions(config: DetectorConfig) -> tuple[ModulePosition, ...]:
    stream = config.stream
    if config.detector_type == JUNGFRAU:
        h, w = stream.frame_height, stream.frame_width
        return tuple(ModulePosition(0, m * h, w - 1, (m + 1) * h - 1) for m in range(config.n_modules))
    raise ConfigError("module_positions", None, "a rectangle per Eiger half-module (there is no default)",
                      config.source)


class Placer:
    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.stream = config.stream
        self.kind = config.detector_type
        self.shape = config.image_shape
        if self.kind == GIGAFROST:
            self.positions = ()
            return
        self.positions = config.module_positions or default_positions(config)
        width = self.stream.frame_width
        if self.kind == EIGER:
            width += EIGER_CHIP_GAP * (self.stream.frame_width // EIGER_CHIP - 1)
        for m, pos in enumerate(self.positions):
            if (pos.height, pos.width) != (self.stream.frame_height, width):
                raise ConfigError(f"module_positions.{m}", [pos.x0, pos.y0, pos.x1, pos.y1],
                                  f"a rectangle of {width} columns x {self.stream.frame_height} rows "
                                  f"(one {self.kind} frame{' with its chip gaps' if self.kind == EIGER else ''})",
                                  config.source)

    def frame_pixels(self, frame: np.ndarray) -> np.ndarray:
        """A module's raw frame bytes as pixels (rows x cols); Gigafrost stays packed (see place)."""
        return frame.view(self.stream.pixel_dtype).reshape(self.stream.frame_height, self.stream.frame_width)

    def target(self, image: np.ndarray, module: int) -> np.ndarray:
        """The view of `image` module `module` fills (Jungfrau/Eiger: its rectangle, gaps included)."""
        if self.kind == GIGAFROST:
            return self._gigafrost_rows(image, module)
        return region(image, self.positions[module])

    def place(self, image: np.ndarray, module: int, frame: np.ndarray) -> None:
        """Write module `module`'s frame (its FrameBuffer bytes) into `image` (any numeric dtype)."""
        if self.kind == GIGAFROST:
            _unpack_12bit_into(frame, self._gigafrost_rows(image, module))
            return
        pixels = self.frame_pixels(frame)
        dest = region(image, self.positions[module])
        if self.kind == EIGER:
            for chip in range(self.stream.frame_width // EIGER_CHIP):
                start = chip * (EIGER_CHIP + EIGER_CHIP_GAP)
                dest[:, start:start + EIGER_CHIP] = pixels[:, chip * EIGER_CHIP:(chip + 1) * EIGER_CHIP]
        else:
            dest[...] = pixels

    def zero(self, image: np.ndarray, module: int) -> None:
        self.target(image, module)[...] = 0

    def _gigafrost_rows(self, image: np.ndarray, module: int) -> np.ndarray:
        quadrant, link = divmod(module, 2)
        half_h, half_w = self.shape[0] // 2, self.shape[1] // 2
        cols = slice(0, half_w) if quadrant in (0, 2) else slice(half_w, 2 * half_w)
        if quadrant >= 2:  # bottom: from the centre line down
            rows = slice(half_h + link, None, 2)
        else:  # top: from the centre line up
            rows = slice(half_h - 1 - link, None, -2)
        return image[rows, cols][:self.stream.frame_height]


def _unpack_12bit_into(packed: np.ndarray, dest: np.ndarray) -> None:
    """Unpack little-endian 12-bit pixels (3 bytes per 2) into the 2-D view `dest` (any row stride)."""
    rows, cols = dest.shape
    triples = packed[:rows * cols * 3 // 2].reshape(rows, cols // 2, 3).astype(np.uint16)
    pairs = dest.reshape(rows, cols // 2, 2)
    if not np.shares_memory(pairs, dest):  # numpy had to copy: unpack into a temporary instead
        pairs = np.empty((rows, cols // 2, 2), dest.dtype)
    pairs[..., 0] = triples[..., 0] | ((triples[..., 1] & 0xF) << 8)
    pairs[..., 1] = (triples[..., 1] >> 4) | (triples[..., 2] << 4)
    if not np.shares_memory(pairs, dest):
        dest[...] = pairs.reshape(rows, cols)
