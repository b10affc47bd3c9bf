"""One output file (DESIGN.md §6): NXmx groups, the std-daq names as hard links, per-image metadata.

Layout (`<det>` is the detector name):
    /entry                       NXentry
    /entry/data/data             (n, height, width) images, one per chunk       NXdata (signal)
    /entry/instrument/detector   NXdetector: description, bit_depth_readout, image_id, status, ...
    /<det>/data                  hard link to /entry/data/data
    /<det>/image_id  u64, /<det>/status u16 (and for Jungfrau pulse_id u64, frame_index u64, daq_rec u32),
                                 the same datasets as under /entry/instrument/detector
Root attributes say what the file holds: detector name/type, bit depth, image shape, module positions,
conversion and calibration file, the request (JSON), start and end time, software version, and `state`:
"writing" while open (what a crash leaves), then "complete" or "interrupted" (stopped early, trimmed).

Image status in the file: the ImageMetadata status (0 good, 1 missing packets, 2 id mismatch, 3 missing
module), or 4 = lost: the image was overwritten in the ImageBuffer before it could be written; its pixels
are left as the dataset's fill value 0, never another image's.
"""
from __future__ import annotations

import json
import os
import time

import h5py
import hdf5plugin
import numpy as np

from core_buffer import __version__
from core_buffer.config import DetectorConfig

STATUS_LOST = 4
NX = "NX_class"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def create_exclusive(path: str, mode: int, overwrite: bool, uid: int | None) -> None:
    """Create the file with exactly `mode` (umask-proof) and owner `uid`, never through a symlink."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
        if uid is not None:
            import pwd

            os.fchown(fd, uid, pwd.getpwuid(uid).pw_gid)
    finally:
        os.close(fd)


class OutputFile:
    def __init__(self, path: str, config: DetectorConfig, request: dict, n_images: int, dtype: np.dtype,
                 compression: str) -> None:
        self.path = path
        self.n_images = n_images
        self.det = config.detector_name
        self.jungfrau = config.detector_type == "jungfrau"
        h, w = config.image_shape
        self.compressed = compression == "bitshuffle-lz4"
        # The file exists already, with its mode and owner. The default (earliest) format has no "open for
        # writing" flag in the superblock, so a file whose writer was killed opens as it was at its last flush
        # (the latest format would refuse it until `h5clear -s`).
        self.file = h5py.File(path, "w")
        f = self.file
        f.attrs.update({
            "detector_name": config.detector_name, "detector_type": config.detector_type,
            "bit_depth": config.bit_depth, "image_height": h, "image_width": w,
            "image_dtype": np.dtype(dtype).str, "conversion": config.conversion,
            "calibration_file": config.calibration_file or "", "background_file": config.background_file or "",
            "flatfield_file": config.flatfield_file or "", "compression": compression,
            "module_positions": json.dumps([[p.x0, p.y0, p.x1, p.y1] for p in config.module_positions]
                                           if config.module_positions else None),
            "request": json.dumps(request), "start_time": _now(), "software": f"std-daq {__version__}",
            "state": "writing", "status_codes": "0 good, 1 missing packets, 2 id mismatch, 3 missing module, "
                                                "4 lost in the buffer (pixels not written)",
        })
        entry = f.create_group("entry")
        entry.attrs[NX] = "NXentry"
        entry.attrs["default"] = "data"
        data_group = entry.create_group("data")
        data_group.attrs[NX] = "NXdata"
        data_group.attrs["signal"] = "data"
        extra = dict(hdf5plugin.Bitshuffle(cname="lz4")) if self.compressed else {}
        self.data = data_group.create_dataset("data", shape=(n_images, h, w), maxshape=(None, h, w), dtype=dtype,
                                              chunks=(1, h, w), fillvalue=0, **extra)
        detector = entry.create_group("instrument").create_group("detector")
        entry["instrument"].attrs[NX] = "NXinstrument"
        detector.attrs[NX] = "NXdetector"
        detector["description"] = config.detector_type
        detector["bit_depth_readout"] = config.bit_depth
        self.per_image = {"image_id": np.uint64, "status": np.uint16}
        if self.jungfrau:
            self.per_image.update(pulse_id=np.uint64, frame_index=np.uint64, daq_rec=np.uint32)
        self.columns = {name: np.zeros(n_images, dt) for name, dt in self.per_image.items()}
        self.meta = {name: detector.create_dataset(name, shape=(n_images,), maxshape=(None,), dtype=dt,
                                                   chunks=(min(max(n_images, 1), 4096),))
                     for name, dt in self.per_image.items()}
        std = f.create_group(self.det)
        std["data"] = self.data
        for name, dset in self.meta.items():
            std[name] = dset
        self.n_slots = 0  # images accounted for (written or recorded as lost)
        self.n_written = 0
        self.n_lost = 0
        self.written_since_flush = 0

    def write(self, i: int, pixels: np.ndarray) -> None:
        """Write image `i` (an array of the image's shape and dtype) as one chunk."""
        if self.compressed:
            self.data[i] = pixels
        else:
            self.data.id.write_direct_chunk((i, 0, 0), pixels)

    def record(self, i: int, image_id: int, status: int, frame_index: int = 0, pulse_id: int = 0,
               daq_rec: int = 0) -> None:
        c = self.columns
        c["image_id"][i], c["status"][i] = image_id, status
        if self.jungfrau:
            c["pulse_id"][i], c["frame_index"][i], c["daq_rec"][i] = pulse_id, frame_index, daq_rec
        self.n_slots = max(self.n_slots, i + 1)

    def flush(self) -> None:
        n = self.n_slots
        for name, dset in self.meta.items():
            dset[:n] = self.columns[name][:n]
        self.file.flush()
        self.written_since_flush = 0

    def close(self, state: str) -> None:
        """Trim to the images accounted for, write the end attributes, close."""
        n = self.n_slots
        self.data.resize(n, axis=0)
        for name, dset in self.meta.items():
            dset.resize((n,))
            dset[:n] = self.columns[name][:n]
        self.file.attrs.update({"state": state, "end_time": _now(), "n_images_written": self.n_written,
                                "n_images_lost": self.n_lost})
        self.file.close()
