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


def raw_image(config: DetectorConfig, image_id: int) -> np.ndarray:
    """The raw (unconverted) image of `image_id` for Jungfrau and Eiger configs."""
    stream = config.stream
    frames = [frame_pattern(stream, m, image_id) for m in range(config.n_modules)]
    if config.detector_type == "eiger":
        frames = [_with_eiger_chip_gaps(f) for f in frames]
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
