"""Jungfrau pedestals from dark runs written by std_h5_writer (raw mode): `std-daq pedestal`.

    std-daq pedestal CONFIG OUTPUT.h5 DARK_RUN.h5 [DARK_RUN.h5 ...] [--gain-from CALIBRATION.h5]

Every pixel of every image is sorted by its gain bits (G0, G1, G2; the invalid value 2 is skipped) and
the mean ADC per pixel and gain is the pedestal. Runs taken with the gain forced (daq_rec) supply G1 and
G2; a pixel never seen in a gain gets NaN there (and converts to NaN). Images with a non-zero status are
skipped. The output is a calibration file in the layout std_assembler reads (std_assembler/convert.py):
`pedestal` (3, R, 1024) in raw-stack coordinates, `gain` copied from --gain-from or 1.0 (so converted
images are pedestal-subtracted ADU), and per-gain pixel counts in `n_frames`.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from core_buffer.config import load_config
from core_buffer.errors import ConfigError
from std_assembler.convert import GAIN_SLOT
from std_assembler.geometry import Placer


def raw_stack(placer: Placer, image: np.ndarray, n_modules: int) -> np.ndarray:
    """The module frames of an assembled raw image, stacked in module order (geometry undone)."""
    return np.vstack([np.asarray(placer.target(image, m)) for m in range(n_modules)])


def accumulate(config, paths: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    import h5py
    import hdf5plugin  # noqa: F401 - compressed files

    stream = config.stream
    rows = config.n_modules * stream.frame_height
    sums = np.zeros((3, rows, stream.frame_width), np.float64)
    counts = np.zeros((3, rows, stream.frame_width), np.int64)
    placer = Placer(config)
    used = 0
    for path in paths:
        with h5py.File(path, "r") as f:
            data = f["entry/data/data"]
            status = f[f"{config.detector_name}/status"][:] if config.detector_name in f else \
                np.zeros(data.shape[0], np.uint16)
            if data.shape[1:] != config.image_shape or data.dtype != np.uint16:
                raise ValueError(f"{path}: images are {data.dtype} {data.shape[1:]}, expected raw uint16 "
                                 f"{config.image_shape} for {config.detector_name}")
            for i in range(data.shape[0]):
                if status[i]:
                    continue
                frames = raw_stack(placer, data[i], config.n_modules)
                gain = frames >> 14
                adc = (frames & 0x3FFF).astype(np.float64)
                for bits, slot in GAIN_SLOT.items():
                    mask = gain == bits
                    sums[slot][mask] += adc[mask]
                    counts[slot][mask] += 1
                used += 1
    return sums, counts, used


def missing_inputs(runs: list[str], gain_from: str | None) -> list[str]:
    """What is wrong with the input files before any is opened, one phrase each: h5py's own error for a
    missing file ("Unable to synchronously open file (unable to open file: name = ..., errno = 2, ...)")
    hides the one fact the operator needs."""
    named = [("dark run", path) for path in runs] + ([("--gain-from file", gain_from)] if gain_from else [])
    problems = []
    for what, path in named:
        if not os.path.exists(path):
            problems.append(f"{what} {path} does not exist")
        elif not os.path.isfile(path):
            problems.append(f"{what} {path} is not a file")
        elif not os.access(path, os.R_OK):
            problems.append(f"{what} {path} is not readable (permissions)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="std-daq pedestal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the detector config the dark runs were taken with")
    parser.add_argument("output", help="calibration file to write")
    parser.add_argument("runs", nargs="+", help="dark-run files written by std_h5_writer")
    parser.add_argument("--gain-from", default=None, help="calibration file whose 'gain' is copied")
    args = parser.parse_args(argv)
    import h5py

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"std-daq pedestal: bad config: {exc}", file=sys.stderr)
        return 2
    if config.detector_type != "jungfrau":
        print("std-daq pedestal: pedestals are for Jungfrau detectors", file=sys.stderr)
        return 2
    missing = missing_inputs(args.runs, args.gain_from)
    if missing:
        print("std-daq pedestal: " + "; ".join(missing), file=sys.stderr)
        return 2
    try:
        sums, counts, used = accumulate(config, args.runs)
    except (OSError, KeyError, ValueError) as exc:
        print(f"std-daq pedestal: {exc}", file=sys.stderr)
        return 1
    with np.errstate(invalid="ignore", divide="ignore"):
        pedestal = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)
    if args.gain_from:
        with h5py.File(args.gain_from, "r") as f:
            gain = f["gain"][()].astype(np.float32)
        if gain.shape != pedestal.shape:
            print(f"std-daq pedestal: gain in {args.gain_from} is {gain.shape}, expected {pedestal.shape}",
                  file=sys.stderr)
            return 1
    else:
        gain = np.ones_like(pedestal)
    with h5py.File(args.output, "w") as f:
        f["pedestal"] = pedestal
        f["gain"] = gain
        f["n_frames"] = counts.astype(np.int32)
        f.attrs["detector_name"] = config.detector_name
        f.attrs["runs"] = [str(p) for p in args.runs]
        f.attrs["gain_source"] = args.gain_from or "1.0 (pedestal-subtracted ADU)"
    seen = (counts > 0).reshape(3, -1).mean(axis=1) * 100
    print(f"std-daq pedestal: {used} images from {len(args.runs)} files -> {args.output}; pixels with a "
          f"pedestal: G0 {seen[0]:.1f} %, G1 {seen[1]:.1f} %, G2 {seen[2]:.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
