"""What an assembled image must hold, computed pixel by pixel from the simulator's pattern and the config,
independently of std_assembler's vectorised code."""
from __future__ import annotations

import numpy as np

from core_buffer.config import DetectorConfig
from core_buffer.pattern import frame_pattern

EIGER_CHIP = 256
EIGER_GAP = 2


def _with_eiger_chip_gaps(frame: np.ndarray) -> np.ndarray:
    """A half-module frame (256 x 512) with the gap columns between its two chips (256 x 514)."""
    rows, cols = frame.shape
    n_chips = cols // EIGER_CHIP
    out = np.zeros((rows, cols + EIGER_GAP * (n_chips - 1)), frame.dtype)
    for chip in range(n_chips):
        start = chip * (EIGER_CHIP + EIGER_GAP)
        out[:, start:start + EIGER_CHIP] = frame[:, chip * EIGER_CHIP:(chip + 1) * EIGER_CHIP]
    return out


def _placed(config: DetectorConfig, frames: list[np.ndarray]) -> np.ndarray:
    """Module frames put where module_positions says (stacked in module order without it), gaps 0."""
    if config.module_positions is None:
        return np.vstack(frames)
    image = np.zeros(config.image_shape, frames[0].dtype)
    for frame, pos in zip(frames, config.module_positions):
        rows, cols = frame.shape
        for r in range(rows):
            y = pos.y0 + r if pos.y1 >= pos.y0 else pos.y0 - r
            row = frame[r] if pos.x1 >= pos.x0 else frame[r][::-1]
            image[y, min(pos.x0, pos.x1):min(pos.x0, pos.x1) + cols] = row
    return image


def raw_image(config: DetectorConfig, image_id: int) -> np.ndarray:
    """The raw (unconverted) image of `image_id` for Jungfrau and Eiger configs."""
    stream = config.stream
    frames = [frame_pattern(stream, m, image_id) for m in range(config.n_modules)]
    if config.detector_type == "eiger":
        frames = [_with_eiger_chip_gaps(f) for f in frames]
    return _placed(config, frames)


# Jungfrau gain bits (15..14) -> index into the calibration's first axis; the value 2 is invalid.
JUNGFRAU_GAIN_INDEX = {0: 0, 1: 1, 3: 2}


def converted_image(config: DetectorConfig, image_id: int, pedestal: np.ndarray, gain: np.ndarray,
                    pixel_mask: np.ndarray) -> np.ndarray:
    """The Jungfrau image of `image_id` with `conversion: converted`, as docs/std_assembler.md defines it:
    float32 `(float32(adc) - pedestal[g]) * (1 / gain[g])` per pixel of the raw stack (pedestal and gain
    float32, shape (3, n_modules x 512, 1024)), NaN for the invalid gain value, a masked pixel, a zero or
    non-finite gain and a non-finite pedestal; then placed like a raw image, gaps 0."""
    rows = config.stream.frame_height
    frames = []
    for m in range(config.n_modules):
        raw = frame_pattern(config.stream, m, image_id)
        part = slice(m * rows, (m + 1) * rows)
        adc = (raw & 0x3FFF).astype(np.float32)
        bits = raw >> 14
        frame = np.full(raw.shape, np.nan, np.float32)
        for value, g in JUNGFRAU_GAIN_INDEX.items():
            ped, gn = pedestal[g, part], gain[g, part]
            ok = (bits == value) & (pixel_mask[part] == 0) & np.isfinite(ped) & np.isfinite(gn) & (gn != 0)
            frame[ok] = (adc[ok] - ped[ok]) * (np.float32(1) / gn[ok])
        frames.append(frame)
    return _placed(config, frames)
