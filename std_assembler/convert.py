"""Pixel conversion and corrections: Jungfrau ADU -> keV, background subtraction, flat-field.

Jungfrau calibration file (HDF5, named by the config's `calibration_file`), in raw-stack coordinates, i.e.
the module frames stacked in module order (R = n_modules x frame rows, 1024 columns), before geometry:
- `pedestal`: float (3, R, 1024), ADU, per gain G0, G1, G2;
- `gain`: float (3, R, 1024), ADU per keV, per gain;
- `pixel_mask` (optional): integer (R, 1024), non-zero = bad pixel.
A pixel becomes `(adc - pedestal[g]) / gain[g]` with g from bits 15..14 (0 -> G0, 1 -> G1, 3 -> G2); the
invalid gain value 2, masked pixels and a zero gain give NaN and are counted.

The conversion is one compiled pass over the frame (numba; `assembler.conversion_threads` threads): G0
pixels, the common case, read two plain per-pixel tables; other gains read a table of (pedestal, 1/gain)
pairs interleaved by gain value. Without numba the same arithmetic runs as numpy passes (slower).

Corrections file (HDF5, `background_file` / `flatfield_file`): dataset `background` or `flatfield` of the
image's shape; the image becomes `(image - background) / flatfield` (float32), after geometry.
"""
from __future__ import annotations

import logging

import numpy as np

from core_buffer.config import DetectorConfig
from core_buffer.errors import ConfigError

GAIN_SLOT = {0: 0, 1: 1, 3: 2}  # gain bits -> index in the calibration arrays
log = logging.getLogger("std_assembler")


def _compile_kernel(threads: int):
    """The conversion loop compiled with numba (one pass over the frame); None without numba."""
    try:
        import numba
    except ImportError:
        log.warning("numba is not installed: Jungfrau conversion runs on the slower numpy path")
        return None
    parallel = threads > 1

    @numba.njit(nogil=True, boundscheck=False, parallel=parallel, cache=False)
    def kernel(raw, pedestal_g0, inverse_g0, pairs, out):  # pragma: no cover - compiled
        nan = 0
        for i in numba.prange(raw.size):
            v = raw[i]
            g = v >> 14
            adc = np.float32(v & 0x3FFF)
            if g == 0:
                r = (adc - pedestal_g0[i]) * inverse_g0[i]
            else:
                r = (adc - pairs[i, g, 0]) * pairs[i, g, 1]
            out[i] = r
            if r != r:
                nan += 1
        return nan

    if parallel:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return kernel


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
    """Per module: G0 tables as plain arrays (the fast path: every pixel converted as G0), and for the
    pixels in another gain one gather of (pedestal, 1/gain) pairs from a table interleaved by gain value
    (4 pairs per pixel, gain value 2 holding NaN). Real data is mostly G0, so the fix-up is small."""

    def __init__(self, config: DetectorConfig, threads: int = 1, use_numba: bool = True) -> None:
        stream = config.stream
        self.h, self.w = stream.frame_height, stream.frame_width
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
        n = self.h * self.w
        with np.errstate(divide="ignore"):
            inverse = np.where(gain != 0, 1.0 / gain, np.nan).astype(np.float32)
        inverse[:, mask] = np.nan
        self.pedestal_g0, self.inverse_g0, self.pairs, self.pair_tables = [], [], [], []
        for m in range(config.n_modules):
            rows_m = slice(m * self.h, (m + 1) * self.h)
            pairs = np.full((n, 4, 2), np.nan, np.float32)
            for bits, slot in GAIN_SLOT.items():
                pairs[:, bits, 0] = pedestal[slot, rows_m].reshape(-1)
                pairs[:, bits, 1] = inverse[slot, rows_m].reshape(-1)
            self.pair_tables.append(pairs)
            self.pairs.append(pairs.view(np.uint64).reshape(-1))  # one 8-byte gather per pixel
            self.pedestal_g0.append(np.ascontiguousarray(pedestal[0, rows_m]).reshape(-1))
            self.inverse_g0.append(np.ascontiguousarray(inverse[0, rows_m]).reshape(-1))
        self._gain = np.empty(n, np.uint16)
        self._adc = np.empty(n, np.uint16)
        self._out = np.empty(n, np.float32)
        self.kernel = _compile_kernel(threads) if use_numba else None
        if self.kernel is not None:  # compile now, not on the first image
            self.kernel(np.zeros(n, np.uint16), self.pedestal_g0[0], self.inverse_g0[0], self.pair_tables[0],
                        self._out)

    @property
    def path(self) -> str:
        return "numba" if self.kernel is not None else "numpy"

    def convert(self, module: int, raw: np.ndarray, out: np.ndarray) -> int:
        """Convert a module's raw frame (h x w uint16) into `out` (h x w float32 view); returns NaN pixels."""
        flat = raw.reshape(-1)
        direct = out.flags.c_contiguous
        result = out.reshape(-1) if direct else self._out
        if self.kernel is not None:
            nan = self.kernel(flat, self.pedestal_g0[module], self.inverse_g0[module], self.pair_tables[module],
                              result)
            if not direct:
                out[...] = result.reshape(self.h, self.w)
            return int(nan)
        np.bitwise_and(flat, 0x3FFF, out=self._adc)
        np.subtract(self._adc, self.pedestal_g0[module], out=result)
        np.multiply(result, self.inverse_g0[module], out=result)
        np.right_shift(flat, 14, out=self._gain)
        others = np.flatnonzero(self._gain)
        if others.size:
            index = others * 4 + self._gain[others]
            pairs = np.take(self.pairs[module], index, mode="clip").view(np.float32).reshape(-1, 2)
            result[others] = (self._adc[others] - pairs[:, 0]) * pairs[:, 1]
        if not direct:
            out[...] = result.reshape(self.h, self.w)
        return int(np.count_nonzero(np.isnan(result)))


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

    def apply(self, image: np.ndarray) -> None:
        if self.background is not None:
            np.subtract(image, self.background, out=image)
        if self.inverse_flat is not None:
            np.multiply(image, self.inverse_flat, out=image)
