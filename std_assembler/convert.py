"""Pixel conversion and corrections: Jungfrau ADU -> keV, background subtraction, flat-field.

Jungfrau calibration file (HDF5, named by the config's `calibration_file`), in raw-stack coordinates, i.e.
the module frames stacked in module order (R = n_modules x frame rows, 1024 columns), before geometry:
- `pedestal`: float (3, R, 1024), ADU, per gain G0, G1, G2;
- `gain`: float (3, R, 1024), ADU per keV, per gain;
- `pixel_mask` (optional): integer (R, 1024), non-zero = bad pixel.
A pixel becomes `(adc - pedestal[g]) / gain[g]` with g from bits 15..14 (0 -> G0, 1 -> G1, 3 -> G2); the
invalid gain value 2, masked pixels and a zero gain give NaN and are counted.

The conversion is compiled (std_assembler/kernels.py; `assembler.conversion_threads` numba threads
split a frame's rows): every pixel is converted as G0 from two plain per-pixel tables, then the few
pixels in another gain are found with a vector compare and recomputed from a per-pixel G1/G2 record.
Without numba the same float32 arithmetic runs as numpy passes (slower), with identical results.

Corrections file (HDF5, `background_file` / `flatfield_file`): dataset `background` or `flatfield` of the
image's shape; the image becomes `(image - background) / flatfield` (float32), after geometry. Gap pixels
stay zero (the corrections are neutralised there at load); a flat-field of 0 gives NaN.
"""
from __future__ import annotations

import logging

import numpy as np

from core_buffer.config import DetectorConfig
from core_buffer.errors import ConfigError
from std_assembler import kernels

GAIN_SLOT = {0: 0, 1: 1, 3: 2}  # gain bits -> index in the calibration arrays
log = logging.getLogger("std_assembler")


def _read(path: str, key: str, name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if name not in f:
                raise ConfigError(key, path, f"an HDF5 file with a dataset '{name}'", source)
            data = f[name][()]
    except OSError as exc:
        raise ConfigError(key, path, f"a readable HDF5 file ({exc})", source) from None
    if data.shape != shape:
        raise ConfigError(key, path, f"'{name}' of shape {shape} (found {data.shape})", source)
    return np.asarray(data)


class JungfrauConverter:
    """Jungfrau ADU -> keV with the tables of the calibration file, laid out for the kernel
    (std_assembler/kernels.py explains the choices): per module, G0 pedestal and 1/gain as two plain
    float32 arrays (streamed by the vectorised G0 pass), and G1/G2 (pedestal, 1/gain) in one 16-byte
    record per pixel (read only by the few non-G0 pixels). A masked pixel, a zero or non-finite gain
    and a non-finite pedestal get 1/gain = NaN, so they convert to NaN in that gain."""

    def __init__(self, config: DetectorConfig, threads: int = 1, use_numba: bool = True) -> None:
        stream = config.stream
        self.h, self.w = stream.frame_height, stream.frame_width
        self.n_modules = config.n_modules
        rows = config.n_modules * self.h
        key, path = "calibration_file", config.calibration_file
        if path is None:
            raise ConfigError(key, None, "a calibration file when conversion is 'converted'", config.source)
        pedestal = _read(path, key, "pedestal", (3, rows, self.w), config.source).astype(np.float32)
        gain = _read(path, key, "gain", (3, rows, self.w), config.source).astype(np.float32)
        import h5py

        with h5py.File(path, "r") as f:
            has_mask = "pixel_mask" in f
        mask = (_read(path, key, "pixel_mask", (rows, self.w), config.source) != 0) if has_mask \
            else np.zeros((rows, self.w), bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            inverse = (np.float32(1) / gain).astype(np.float32)
        bad = (gain == 0) | ~np.isfinite(gain) | ~np.isfinite(pedestal) | mask[None]
        inverse[bad] = np.nan
        # Stack-wide tables; a module's are row slices of them (still C-contiguous).
        self._pedestal_g0 = np.ascontiguousarray(pedestal[0])
        self._inverse_g0 = np.ascontiguousarray(inverse[0])
        others = np.empty((rows, self.w, 4), np.float32)
        others[..., 0], others[..., 1] = pedestal[1], inverse[1]
        others[..., 2], others[..., 3] = pedestal[2], inverse[2]
        self._others = others.reshape(-1)
        bad_g0 = np.isnan(self._inverse_g0)
        n = self.h * self.w
        self._bad_g0 = [np.flatnonzero(bad_g0[m * self.h:(m + 1) * self.h]).astype(np.int64)
                        for m in range(config.n_modules)]
        self._tables = [self.tables(m) for m in range(config.n_modules)]
        self._bad_g0_stack = np.flatnonzero(bad_g0).astype(np.int64)
        self.threads = threads
        self.kernel = None
        if use_numba and self.w % 64:
            log.warning("frames %d pixels wide: Jungfrau conversion runs on the numpy path", self.w)
        elif use_numba:
            if kernels.AVAILABLE:
                self.kernel = kernels.convert_parallel if threads > 1 else kernels.convert_serial
                if threads > 1:
                    import numba

                    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            else:
                log.warning("numba is not installed: Jungfrau conversion runs on the slower numpy path")
        scratch = (max(threads, 1), kernels.CHUNK_ROWS * self.w + kernels.SCRATCH_PAD) if self.kernel else (1, 1)
        self._rows = np.zeros(scratch, np.int64)
        self._cols = np.zeros(scratch, np.int64)
        self._adc = np.empty(n, np.float32)  # numpy path only

    @property
    def path(self) -> str:
        return f"numba, {self.threads} thread(s)" if self.kernel is not None else "numpy"

    def tables(self, module: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = slice(module * self.h, (module + 1) * self.h)
        n = self.h * self.w * 4
        return self._pedestal_g0[rows], self._inverse_g0[rows], self._others[module * n:(module + 1) * n]

    def convert_stack(self, raw: np.ndarray, out: np.ndarray) -> int:
        """Convert all modules at once: `raw` the frames stacked in module order (n_modules * h x w, the
        FrameBuffer slot as it is), `out` the same shape (the image, when geometry is the plain stack).
        One kernel call per image instead of one per module (and one fork/join of the worker threads)."""
        if self.kernel is not None:
            return self.kernel(raw, self._pedestal_g0, self._inverse_g0, self._others, self._bad_g0_stack, out,
                               self._rows, self._cols)
        return sum(self.convert(m, raw[m * self.h:(m + 1) * self.h], out[m * self.h:(m + 1) * self.h])
                   for m in range(self.n_modules))

    def convert(self, module: int, raw: np.ndarray, out: np.ndarray) -> int:
        """Convert a module's raw frame (h x w uint16, C order) into `out` (h x w float32, any strides,
        e.g. a flipped view of the image); returns the number of NaN pixels."""
        pedestal_g0, inverse_g0, others = self._tables[module]
        if self.kernel is not None:
            return self.kernel(raw, pedestal_g0, inverse_g0, others, self._bad_g0[module], out,
                               self._rows, self._cols)
        # numpy: the same arithmetic in whole-array passes (G0 everywhere, then the other pixels)
        flat = raw.reshape(-1)
        adc = self._adc
        np.bitwise_and(flat, 0x3FFF, out=adc, casting="unsafe")
        result = (adc - pedestal_g0.reshape(-1)) * inverse_g0.reshape(-1)
        nan = int(np.count_nonzero(flat[self._bad_g0[module]] < 0x4000))
        fix = np.flatnonzero(flat > 0x3FFF)
        if fix.size:
            record = fix * 4 + 2 * (flat[fix] >> 15)
            value = (adc[fix] - others[record]) * others[record + 1]
            value[flat[fix] >> 14 == 2] = np.nan
            result[fix] = value
            nan += int(np.count_nonzero(np.isnan(value)))
        out[...] = result.reshape(self.h, self.w)
        return nan


class Corrections:
    """Background subtraction and flat-field division on the assembled float32 image."""

    def __init__(self, config: DetectorConfig) -> None:
        shape = config.image_shape
        self.background = None if config.background_file is None else \
            _read(config.background_file, "background_file", "background", shape, config.source).astype(np.float32)
        self.inverse_flat = None
        if config.flatfield_file is not None:
            flat = _read(config.flatfield_file, "flatfield_file", "flatfield", shape, config.source)
            with np.errstate(divide="ignore"):
                self.inverse_flat = np.where(flat != 0, 1.0 / flat, np.nan).astype(np.float32)

    @property
    def active(self) -> bool:
        return self.background is not None or self.inverse_flat is not None

    def keep_gaps_zero(self, covered: np.ndarray) -> None:
        """Make the corrections leave gap pixels (no module lands there) at zero: background 0 and
        1/flat-field 0 there, so no extra pass over the image is needed."""
        if self.background is not None:
            self.background[~covered] = 0
        if self.inverse_flat is not None:
            self.inverse_flat[~covered] = 0

    def apply(self, image: np.ndarray) -> None:
        if self.background is not None:
            np.subtract(image, self.background, out=image)
        if self.inverse_flat is not None:
            np.multiply(image, self.inverse_flat, out=image)
