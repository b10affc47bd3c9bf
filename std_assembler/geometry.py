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
from std_assembler import kernels

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
    """Jungfrau: the frames stacked in module order from the top, no gaps (SwissFEL). Eiger: only one
    module (4 half-module streams, 514 x 1030) has a default, the layout of the example config
    core_buffer/configs/eiger_500k.json: streams 0 and 1 the top half (left, right), 2 and 3 the bottom
    half (left, right) read out upside down, 2-pixel gaps between all chips. Larger Eigers need
    `module_positions`: how their ports map to modules depends on the installation."""
    stream = config.stream
    h, w = stream.frame_height, stream.frame_width
    if config.detector_type == JUNGFRAU:
        if config.n_modules * h > config.image_pixel_height:
            raise ConfigError("image_pixel_height", config.image_pixel_height,
                              f"at least {config.n_modules * h} rows to stack {config.n_modules} modules of {h} "
                              "rows (or module_positions)", config.source)
        if w > config.image_pixel_width:
            raise ConfigError("image_pixel_width", config.image_pixel_width,
                              f"at least {w} columns for the stacked modules (or module_positions)", config.source)
        return tuple(ModulePosition(0, m * h, w - 1, (m + 1) * h - 1) for m in range(config.n_modules))
    half_w = w + EIGER_CHIP_GAP * (w // EIGER_CHIP - 1)  # a stream's width with its chip gap
    one_module = (2 * h + EIGER_CHIP_GAP, 2 * half_w + EIGER_CHIP_GAP)
    if config.n_modules == 4 and config.image_shape == one_module:
        x1 = half_w + EIGER_CHIP_GAP  # first column of the right half
        bottom_top = 2 * h + EIGER_CHIP_GAP - 1  # the bottom half's frame row 0 goes to the image's last row
        return (ModulePosition(0, 0, half_w - 1, h - 1), ModulePosition(x1, 0, x1 + half_w - 1, h - 1),
                ModulePosition(0, bottom_top, half_w - 1, h + EIGER_CHIP_GAP),
                ModulePosition(x1, bottom_top, x1 + half_w - 1, h + EIGER_CHIP_GAP))
    raise ConfigError("module_positions", None,
                      f"a rectangle per Eiger half-module stream (the default exists only for one module: 4 "
                      f"streams in a {one_module[0]} x {one_module[1]} image)", config.source)


class Placer:
    def __init__(self, config: DetectorConfig, threads: int = 1) -> None:
        self.config = config
        self.stream = config.stream
        self.kind = config.detector_type
        self.shape = config.image_shape
        if self.kind == GIGAFROST:
            self.positions = ()
            places = np.array([self._gigafrost_place(m) for m in range(config.n_modules)], np.int64)
            self._y0, self._dy, self._x0 = (np.ascontiguousarray(places[:, k]) for k in range(3))
            self._unpack_all = None
            if kernels.AVAILABLE:
                self._unpack_all = kernels.unpack_streams_parallel if threads > 1 else kernels.unpack_streams_serial
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

    @property
    def stacked(self) -> bool:
        """True when the image is exactly the module frames stacked in module order (the raw stack)."""
        h = self.stream.frame_height
        return self.kind == JUNGFRAU and self.shape == (self.config.n_modules * h, self.stream.frame_width) and \
            all(p == ModulePosition(0, m * h, self.stream.frame_width - 1, (m + 1) * h - 1)
                for m, p in enumerate(self.positions))

    def frame_pixels(self, frame: np.ndarray) -> np.ndarray:
        """A module's frame bytes (its FrameBuffer data) as `place` takes them: pixels (rows x cols), except
        Gigafrost's, which stay packed 12-bit bytes."""
        if self.kind == GIGAFROST:
            return frame
        return frame.view(self.stream.pixel_dtype).reshape(self.stream.frame_height, self.stream.frame_width)

    def target(self, image: np.ndarray, module: int) -> np.ndarray:
        """The view of `image` module `module` fills (Jungfrau/Eiger: its rectangle, gaps included)."""
        if self.kind == GIGAFROST:
            return self._gigafrost_rows(image, module)
        return region(image, self.positions[module])

    def coverage(self) -> np.ndarray:
        """bool image: True where some module's frame lands, False on gap pixels."""
        covered = np.zeros(self.shape, bool)
        for m in range(self.config.n_modules):
            self.target(covered, m)[...] = True
        if self.kind == EIGER:  # the chip gaps inside a stream's rectangle
            for m in range(self.config.n_modules):
                for chip in range(1, self.stream.frame_width // EIGER_CHIP):
                    start = chip * (EIGER_CHIP + EIGER_CHIP_GAP) - EIGER_CHIP_GAP
                    self.target(covered, m)[:, start:start + EIGER_CHIP_GAP] = False
        return covered

    def place(self, image: np.ndarray, module: int, frame: np.ndarray) -> None:
        """Write module `module`'s frame (as `frame_pixels` gives it) into `image` (any numeric dtype)."""
        if self.kind == GIGAFROST:
            if kernels.AVAILABLE and image.flags.c_contiguous and image.dtype in (np.uint16, np.float32):
                y0, dy, x0 = self._gigafrost_place(module)
                kernels.unpack_12bit(frame, image, self.stream.frame_height, self.stream.frame_width, y0, dy, x0)
            else:
                _unpack_12bit_into(frame, self._gigafrost_rows(image, module))
            return
        pixels = frame
        dest = region(image, self.positions[module])
        if self.kind == EIGER:
            for chip in range(self.stream.frame_width // EIGER_CHIP):
                start = chip * (EIGER_CHIP + EIGER_CHIP_GAP)
                dest[:, start:start + EIGER_CHIP] = pixels[:, chip * EIGER_CHIP:(chip + 1) * EIGER_CHIP]
        else:
            dest[...] = pixels

    @property
    def places_whole_slots(self) -> bool:
        """Whether `place_slot` can place all modules of a slot in one call (Gigafrost, compiled)."""
        return self.kind == GIGAFROST and self._unpack_all is not None

    def place_slot(self, image: np.ndarray, slot: np.ndarray) -> None:
        """Place every module of a FrameBuffer slot (all frames back to back, uint8) into the C-ordered
        `image` (uint16 or float32) with one compiled call (Gigafrost; `places_whole_slots`)."""
        self._unpack_all(slot, self.stream.frame_bytes, image, self.stream.frame_height, self.stream.frame_width,
                         self._y0, self._dy, self._x0)

    def zero(self, image: np.ndarray, module: int) -> None:
        self.target(image, module)[...] = 0

    def _gigafrost_place(self, module: int) -> tuple[int, int, int]:
        """(image row of the stream's row 0, row step, first column) of a Gigafrost stream."""
        quadrant, link = divmod(module, 2)
        half_h, half_w = self.shape[0] // 2, self.shape[1] // 2
        x0 = 0 if quadrant in (0, 2) else half_w
        if quadrant >= 2:  # bottom: from the centre line down
            return half_h + link, 2, x0
        return half_h - 1 - link, -2, x0  # top: from the centre line up

    def _gigafrost_rows(self, image: np.ndarray, module: int) -> np.ndarray:
        y0, dy, x0 = self._gigafrost_place(module)
        return image[y0::dy, x0:x0 + self.shape[1] // 2][:self.stream.frame_height]


def _unpack_12bit_into(packed: np.ndarray, dest: np.ndarray) -> None:
    """Unpack little-endian 12-bit pixels (3 bytes per 2) into the 2-D view `dest` (any row stride); the
    numpy path (no numba, or a float image)."""
    rows, cols = dest.shape
    triples = packed[:rows * cols * 3 // 2].reshape(rows, cols // 2, 3).astype(np.uint16)
    pairs = np.empty((rows, cols // 2, 2), np.uint16)
    pairs[..., 0] = triples[..., 0] | ((triples[..., 1] & 0xF) << 8)
    pairs[..., 1] = (triples[..., 1] >> 4) | (triples[..., 2] << 4)
    dest[...] = pairs.reshape(rows, cols)
