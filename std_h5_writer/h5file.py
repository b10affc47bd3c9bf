"""One output file (DESIGN.md §6): NXmx groups, the std-daq names as hard links, per-image metadata.

Layout (`<det>` is the detector name; docs/std_h5_writer.md has the full list):
    /entry                          NXentry: definition "NXmx", start_time, end_time
    /entry/data/data                (n, height, width) images, one per chunk        NXdata (signal)
    /entry/instrument/detector      NXdetector: data (link), description, pixel sizes, bit_depth_readout,
                                    depends_on, module (NXdetector_module), image_id, status, ...
    /entry/sample                   NXsample placeholder (depends_on ".")
    /<det>/data                     hard link to /entry/data/data
    /<det>/image_id u64, /<det>/status u16 (and for Jungfrau pulse_id u64, frame_index u64, daq_rec u32),
                                    the same datasets as under /entry/instrument/detector
Root attributes say what the file holds: detector name/type, bit depth, image shape, module positions,
conversion and calibration file, the request (JSON), start and end time, software version, and `state`:
"writing" while open (what a crash leaves), then "complete" or "interrupted" (stopped early, trimmed; or,
with an `interruption` attribute saying so, marked by the next writer after its writer died:
mark_interrupted).

Image status in the file: the ImageMetadata status (0 good, 1 missing packets, 2 id mismatch, 3 missing
module), 4 = lost: the image was overwritten in the ImageBuffer before it could be written, 5 = rejected:
the slot held something that is not an image of this file (other shape or dtype, compressed bytes the
file cannot take); for 4 and 5 the pixels are the fill value 0, never another image's. 0xFFFF = not
written: no write arrived for the row (also every row past the last flush of a file whose writer died).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import Iterable

import h5py
import hdf5plugin
from h5py import h5a, h5d, h5o, h5p, h5s, h5t
import numpy as np

from core_buffer import __version__
from core_buffer.config import DetectorConfig
from core_buffer.errors import StdDaqError
from core_buffer.output import open_output_directory
from std_h5_writer.page_cache import page_cache_for

STATUS_LOST = 4
STATUS_REJECTED = 5
STATUS_NOT_WRITTEN = 0xFFFF
STATUS_CODES = ("0 good, 1 missing packets, 2 id mismatch, 3 missing module, 4 lost in the buffer (pixels not "
                "written), 5 rejected: not an image of this file (pixels not written), 65535 not written")
NX = "NX_class"
log = logging.getLogger("std_h5_writer")

# Uncompressed chunks start on page (4 KiB) boundaries, packed: no holes, as a chunk never takes more
# than 4095 bytes beyond its size, and those share a block with the chunk's last bytes. Measured with the
# raw loop of benchmarks/h5_writer.py --alignment, page cache bounded (docs/std_h5_writer.md, "Chunks on
# page boundaries"): Eiger 500k images (1,058,840 bytes) packed without gaps 1.51-1.62 GB/s, at page
# boundaries 1.70-1.95 (a chunk that starts inside a page shares it with the chunk before, whose
# writeback has already started); for 1 MiB images MiB boundaries gave nothing over page boundaries.
# Before, chunks started on 1 MiB boundaries with HDF5's metadata in 1 MiB blocks: an Eiger 500k file
# took 2 MiB a chunk, half of it holes. Objects smaller than CHUNK_ALIGNMENT_THRESHOLD (HDF5's metadata,
# the per-image columns' chunks) are packed as HDF5 places them, and so are compressed chunks.
CHUNK_ALIGNMENT = 4096
CHUNK_ALIGNMENT_THRESHOLD = 64 << 10

# Files HDF5 failed to close (a metadata write failed: file too large, disk full). HDF5 (2.0) tears the
# file down all the same, descriptor included (so an unlinked file's blocks are freed: asserted in
# tests/std_h5_writer), but leaves the failed file's ID behind: h5py would call HDF5's close on it again
# when it finalises the object, so the h5py File (only it: ~1.4 KB, measured) is kept here, for good.
# Each one is logged with the count, so a writer that keeps collecting them is seen.
_UNCLOSABLE: list = []


def keep_unclosable(f: h5py.File, path: str, error: BaseException) -> None:
    """Keep `f`, which HDF5 failed to close, from being finalised (above), and log it."""
    _UNCLOSABLE.append(f)
    log.warning("HDF5 could not close %s (%s); its descriptor is released, its HDF5 handle kept (%d so far)",
                path, error, len(_UNCLOSABLE))

# Pixel pitch in metres, for the NXdetector (a detector type not listed gets none).
PIXEL_SIZE_M = {"jungfrau": 75e-6, "eiger": 75e-6, "gigafrost": 11e-6}

SPACE_RESERVE_BYTES = 4 * 2**20
ROOM_CHECK_BYTES = 16 * 2**20
PREALLOCATE_MAX_IMAGES = 65536  # the "writer.preallocate_max_images" default: ~85 ms at start
PAGE_CACHE_WINDOW_MIB = 16  # the "writer.page_cache_window_mib" default (docs/std_h5_writer.md)
COLUMN_START_ROWS = 65536  # per-image columns grow by doubling, so a huge n_images allocates nothing up front


# A file holds ~60 small objects (attributes, scalar datasets, links), all made at every start: h5py's
# high-level calls cost ~30 us an object more than its low-level ones (a temporary name and a rename per
# attribute, type guessing, ...). These helpers store the same types: variable-length UTF-8 strings for
# str, numpy's types for numbers and arrays.
_STR_FILE_TYPE = h5t.py_create(h5py.string_dtype(), logical=True)
_STR_MEMORY_TYPE = h5t.py_create(h5py.string_dtype())
# Without creation times, as h5py's high-level calls make every other object of the file: with HDF5's
# default they were in the datasets `_put` made (13 of them), and two files of the same run differed by
# them (tests/std_h5_writer/test_page_cache.py compares files byte for byte). The file's times are its
# `start_time` and `end_time`.
_UNTIMED = h5p.create(h5p.DATASET_CREATE)
_UNTIMED.set_obj_track_times(False)


def _typed(value: object) -> tuple[np.ndarray, h5t.TypeID, h5t.TypeID, h5s.SpaceID]:
    """(data, file type, memory type, dataspace) of a str, number or array."""
    if isinstance(value, str):
        data, file_type, memory_type = np.array(value, dtype=h5py.string_dtype()), _STR_FILE_TYPE, _STR_MEMORY_TYPE
    else:
        data = np.asarray(value)
        file_type = memory_type = h5t.py_create(data.dtype)
    space = h5s.create(h5s.SCALAR) if data.ndim == 0 else h5s.create_simple(data.shape)
    return data, file_type, memory_type, space


def _set_attrs(obj: h5py.HLObject, values: dict) -> None:
    """obj.attrs.update(values), through the low-level calls."""
    for name, value in values.items():
        key = name.encode()
        if h5a.exists(obj.id, key):
            h5a.delete(obj.id, key)
        data, file_type, memory_type, space = _typed(value)
        h5a.create(obj.id, key, file_type, space).write(data, mtype=memory_type)


def _put(group: h5py.Group, name: str, value: object, attrs: dict | None = None) -> None:
    """group[name] = value (a small dataset), with its attributes, through the low-level calls."""
    data, file_type, memory_type, space = _typed(value)
    dataset = h5d.create(group.id, name.encode(), file_type, space, dcpl=_UNTIMED)
    dataset.write(h5s.ALL, h5s.ALL, data, mtype=memory_type)
    if attrs:
        _set_attrs(h5py.Dataset(dataset), attrs)


def _link(group: h5py.Group, name: str, target: h5py.Dataset) -> None:
    """group[name] = target: a hard link."""
    h5o.link(target.id, group.id, name.encode())


def local_time(t: float | None = None) -> str:
    """The file's time format (ISO 8601, local time with its offset): now, or the time `t`."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


class UnmarkableFileError(StdDaqError):
    """A file a dead writer left open that cannot (or must not) be marked interrupted; the message says why."""


class OutputRemovedError(OSError):
    """The file is no longer at its path (it, or its directory, was removed or replaced while open)."""


def _create(name: str, dir_fd: int, mode: int, overwrite: bool, uid: int | None, **fapl) -> h5py.File:
    """A new HDF5 file `name` in the directory `dir_fd` with exactly `mode` and owner `uid`.

    The directory was reached from the allowed directory without following links and is pinned by its
    descriptor (core_buffer.output.open_output_directory), and HDF5 creates the file inside it through
    /proc/self/fd with O_CREAT|O_EXCL ("x"): a directory or name swapped for a symlink after the path was
    checked is refused, never followed. Never by truncating an existing file either, which matters for
    speed: ext4 (and XFS) flush every dirty page of a file that was truncated to zero when it is closed
    (ext4's auto_da_alloc), which made closing a 1 GiB file take ~0.45 s, as long as writing it. An
    existing file (overwrite on) is unlinked first, so a reader that has it open keeps the old data. The
    umask is set for the call so the file never exists with wider permissions than `mode`; only this (the
    writer's main) thread creates files."""
    if overwrite:
        try:
            if not stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
                os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
    old_umask = os.umask(0o777 & ~mode)
    try:
        f = h5py.File(f"/proc/self/fd/{dir_fd}/{name}", "x", **fapl)
    finally:
        os.umask(old_umask)
    try:
        fd = f.id.get_vfd_handle()
        os.fchmod(fd, mode)
        if uid is not None:
            import pwd

            os.fchown(fd, uid, pwd.getpwuid(uid).pw_gid)
    except BaseException:
        f.close()
        os.unlink(name, dir_fd=dir_fd)
        raise
    return f


def _unlink_made(name: str, dir_fd: int, identity: tuple[int, int]) -> None:
    """Remove the half-made file `name` from the directory it was created in (`dir_fd`), if that name
    still is the file (device and inode `identity`): never by path, where a directory on the way swapped
    for a symlink since would have a root writer remove a file of the same name elsewhere and leave this
    one; nor a file someone put in its place."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(name, dir_fd=dir_fd)
            return
    except FileNotFoundError:
        pass
    log.warning("the half-made file %s was moved or removed meanwhile; not removed", name)


class OutputFile:
    def __init__(self, path: str, config: DetectorConfig, request: dict, n_images: int, dtype: np.dtype,
                 compression: str, *, mode: int = 0o640, overwrite: bool = False, uid: int | None = None,
                 preallocate_max_images: int = PREALLOCATE_MAX_IMAGES, page_cache: str = "bounded",
                 page_cache_window_bytes: int = PAGE_CACHE_WINDOW_MIB << 20) -> None:
        """Create the file and its layout; on any failure nothing is left at `path`. `page_cache` is the
        writer.page_cache mode (page_cache.py)."""
        self.path = path
        self.n_images = n_images
        self.det = config.detector_name
        self.jungfrau = config.detector_type == "jungfrau"
        self.shape = config.image_shape
        self.dtype = np.dtype(dtype)
        self.compressed = compression == "bitshuffle-lz4"
        self.chunk_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        # Uncompressed runs of up to `preallocate_max_images` have every chunk allocated by HDF5 when the
        # dataset is made (without writing it), and the images go to those addresses with one pwrite
        # each: ~3% faster than H5Dwrite_chunk (docs/std_h5_writer.md). Allocating costs ~1.3 us an
        # image at start, so longer runs write through H5Dwrite_chunk instead of stalling their start.
        self.preallocate = not self.compressed and n_images <= preallocate_max_images
        self.chunk_offsets: list[int] | None = None
        fapl = {} if self.compressed else {"alignment_threshold": CHUNK_ALIGNMENT_THRESHOLD,
                                           "alignment_interval": CHUNK_ALIGNMENT}
        # Room kept free for closing the file (per-image columns, attributes, HDF5's metadata): a file
        # system that runs full inside HDF5's own metadata writes leaves the file unclosable (and h5py
        # crashes the process when it finalises it), so a run stops before that, with ENOSPC of its own.
        self.reserve_bytes = SPACE_RESERVE_BYTES + 64 * n_images
        self.room_unchecked = 0
        # The directory stays open until the file is complete: a failure before that removes the
        # half-made file from the very directory it was created in (_unlink_made).
        name = os.path.basename(path)
        dir_fd = open_output_directory(path, config.output_dirs)
        try:
            # The default (earliest) file format on purpose: it has no "open for writing" flag in the
            # superblock, so a file whose writer was killed opens as it was at its last flush (the latest
            # format would refuse it until `h5clear -s`).
            self.file = _create(name, dir_fd, mode, overwrite, uid, **fapl)
            self.fd = self.file.id.get_vfd_handle()
            created = os.fstat(self.fd)
            self.identity = (created.st_dev, created.st_ino)
            try:
                self._layout(config, request, compression)
                # The layout reaches the file now, not at the first periodic flush: a writer killed before
                # that one leaves a file of no rows that opens (and is marked interrupted on restart), where
                # it left a superblock only ("truncated file": HDF5 keeps new metadata in memory until a
                # flush). ~0.2 ms a file. The flush also extends the file to its allocated size (the
                # preallocated chunks, as holes): a run longer than the file size limit is refused here
                # ("File too large").
                self.file.flush()
                self.cache = page_cache_for(page_cache, self.fd, page_cache_window_bytes, path)
            except BaseException:
                try:
                    self.file.close()
                except Exception as exc:  # noqa: BLE001 - a metadata write failed (EFBIG, ENOSPC): HDF5 cannot close it
                    keep_unclosable(self.file, path, exc)
                _unlink_made(name, dir_fd, self.identity)
                raise
        finally:
            os.close(dir_fd)
        # Where the file ended after the last chunk HDF5 placed (the H5Dwrite_chunk paths): HDF5 appends
        # chunks at the end of the file, so what it grew by is what the page cache must know was written.
        self.end_written = os.fstat(self.fd).st_size
        self.n_slots = 0  # rows accounted for (written, lost or rejected): the length the file is trimmed to
        self.n_written = 0
        self.n_lost = 0
        self.n_rejected = 0
        self.written_since_flush = 0

    def _layout(self, config: DetectorConfig, request: dict, compression: str) -> None:
        f, (h, w), n_images = self.file, self.shape, self.n_images
        start = local_time()
        _set_attrs(f, {
            "detector_name": config.detector_name, "detector_type": config.detector_type,
            "bit_depth": config.bit_depth, "image_height": h, "image_width": w,
            "image_dtype": self.dtype.str, "conversion": config.conversion,
            "calibration_file": config.calibration_file or "", "background_file": config.background_file or "",
            "flatfield_file": config.flatfield_file or "", "compression": compression,
            "module_positions": json.dumps([[p.x0, p.y0, p.x1, p.y1] for p in config.module_positions]
                                           if config.module_positions else None),
            "request": json.dumps(request), "start_time": start, "software": f"std-daq {__version__}",
            "state": "writing", "status_codes": STATUS_CODES,
        })
        entry = f.create_group("entry")
        _set_attrs(entry, {NX: "NXentry", "default": "data"})
        _put(entry, "definition", "NXmx")
        _put(entry, "start_time", start)
        # Written now so the group is complete even in a file whose writer died; overwritten at close.
        self.end_time = entry.create_dataset("end_time", data=start, dtype=h5py.string_dtype(length=64))
        data_group = entry.create_group("data")
        _set_attrs(data_group, {NX: "NXdata", "signal": "data"})
        extra = dict(hdf5plugin.Bitshuffle(cname="lz4")) if self.compressed else {}
        if self.preallocate:
            dcpl = h5p.create(h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5d.ALLOC_TIME_EARLY)
            extra = {"dcpl": dcpl, "fill_time": "never"}  # a row never written reads 0 (a hole of a new file)
        self.data = data_group.create_dataset("data", shape=(n_images, h, w), maxshape=(None, h, w),
                                              dtype=self.dtype, chunks=(1, h, w), fillvalue=0, **extra)
        if self.preallocate:
            offsets: list[int] = []
            self.data.id.chunk_iter(lambda chunk: offsets.append(chunk.byte_offset))
            if len(offsets) != n_images:
                raise RuntimeError(f"HDF5 allocated {len(offsets)} chunks for {n_images} images")
            self.chunk_offsets = offsets

        instrument = entry.create_group("instrument")
        _set_attrs(instrument, {NX: "NXinstrument"})
        detector = instrument.create_group("detector")
        _set_attrs(detector, {NX: "NXdetector"})
        _link(detector, "data", self.data)  # the NXmx place of the images: a hard link, not a copy
        _put(detector, "description", config.detector_type)
        _put(detector, "bit_depth_readout", config.bit_depth)
        _put(detector, "depends_on", ".")
        pixel = PIXEL_SIZE_M.get(config.detector_type)
        module = detector.create_group("module")
        _set_attrs(module, {NX: "NXdetector_module"})
        _put(module, "data_origin", np.array([0, 0], np.int32))
        _put(module, "data_size", np.array([h, w], np.int32))
        if pixel is not None:
            for name in ("x_pixel_size", "y_pixel_size"):
                _put(detector, name, pixel, {"units": "m"})
            # Geometry without a beamline model: the module at the detector origin, fast axis along x, slow
            # along y; a beamline that knows its geometry overwrites these.
            _put(module, "module_offset", 0.0, {"transformation_type": "translation", "vector": [1.0, 0.0, 0.0],
                                                "units": "m", "depends_on": "."})
            for name, vector in (("fast_pixel_direction", [1.0, 0.0, 0.0]), ("slow_pixel_direction", [0.0, 1.0, 0.0])):
                _put(module, name, pixel, {"transformation_type": "translation", "vector": vector, "units": "m",
                                           "depends_on": "/entry/instrument/detector/module/module_offset"})
        sample = entry.create_group("sample")
        _set_attrs(sample, {NX: "NXsample"})
        _put(sample, "depends_on", ".")

        self.per_image = {"image_id": np.uint64, "status": np.uint16}
        if self.jungfrau:
            self.per_image.update(pulse_id=np.uint64, frame_index=np.uint64, daq_rec=np.uint32)
        rows = min(max(n_images, 1), COLUMN_START_ROWS)
        self.columns = {name: np.zeros(rows, dt) for name, dt in self.per_image.items()}
        self.columns["status"][:] = STATUS_NOT_WRITTEN
        self.meta = {name: detector.create_dataset(
            name, shape=(n_images,), maxshape=(None,), dtype=dt, chunks=(min(max(n_images, 1), 4096),),
            fillvalue=STATUS_NOT_WRITTEN if name == "status" else 0) for name, dt in self.per_image.items()}
        std = f.create_group(self.det)
        _link(std, "data", self.data)
        for name, dset in self.meta.items():
            _link(std, name, dset)

    # --- images ---------------------------------------------------------------------------------------

    def ensure_room(self, nbytes: int) -> None:
        """OSError(ENOSPC) unless `nbytes` fit on the file system with the closing reserve left over. The
        free space is looked up once per ROOM_CHECK_BYTES written (what it showed free beyond the reserve,
        up to that much, is spent without looking again)."""
        if nbytes <= self.room_unchecked:
            self.room_unchecked -= nbytes
            return
        st = os.fstatvfs(self.fd)
        free = st.f_bavail * st.f_frsize
        if free < nbytes + self.reserve_bytes:
            raise OSError(errno.ENOSPC, f"No space left on device: {free / 2**20:.1f} MiB free where {self.path} "
                                        f"is, and {self.reserve_bytes / 2**20:.1f} MiB are kept to close the file")
        self.room_unchecked = min(free - self.reserve_bytes - nbytes, ROOM_CHECK_BYTES)

    def write_chunk(self, i: int, chunk: np.ndarray) -> None:
        """Store row `i` as it will be on disk: raw pixels, or a bitshuffle-LZ4 chunk for a compressed file.
        A contiguous view of shared memory is fine: it is written from where it is, without a copy."""
        self.ensure_room(chunk.nbytes + CHUNK_ALIGNMENT)
        if self.chunk_offsets is None:
            self.data.id.write_direct_chunk((i, 0, 0), chunk)
            self._note_appended()
            return
        if chunk.nbytes != self.chunk_bytes:
            raise ValueError(f"a chunk of {chunk.nbytes} bytes for an uncompressed file of {self.chunk_bytes}")
        self.write_preallocated(i, memoryview(chunk).cast("B"))

    def write_preallocated(self, i: int, view: memoryview) -> None:
        """Row `i` of an uncompressed file whose chunks are preallocated (`chunk_offsets`), from a byte
        view of exactly `chunk_bytes`: the hot path's write_chunk, without the checks. The caller has
        made sure of the room (ensure_room)."""
        offset = self.chunk_offsets[i]
        done = os.pwrite(self.fd, view, offset)
        while done < len(view):  # a short write (a signal, or the disk filling up): go on or get its error
            done += os.pwrite(self.fd, view[done:], offset + done)
        self.cache.written(offset, done)

    def _note_appended(self) -> None:
        """Tell a bounded page cache what HDF5 just wrote (a chunk it placed: end_written)."""
        if self.cache.mode == "bounded":
            end = os.fstat(self.fd).st_size
            if end > self.end_written:
                self.cache.written(self.end_written, end - self.end_written)
                self.end_written = end

    def write_pixels(self, i: int, pixels: np.ndarray) -> None:
        """Store row `i` from pixels, through HDF5's filter pipeline if the file is compressed (slow path)."""
        if self.compressed:
            self.ensure_room(pixels.nbytes)
            self.data[i] = pixels
            self._note_appended()
        else:
            self.write_chunk(i, pixels)

    def erase(self, i: int) -> None:
        """Replace row `i` with zeros after it turned out not to be the image (rare: see writer.py)."""
        if self.chunk_offsets is None:
            self.data[i] = 0
        else:
            self.write_chunk(i, np.zeros(self.chunk_bytes, np.uint8))

    def record(self, i: int, image_id: int, status: int, frame_index: int = 0, pulse_id: int = 0,
               daq_rec: int = 0) -> None:
        c = self.columns
        if i >= len(c["status"]):
            self._grow(i + 1)
        c["image_id"][i], c["status"][i] = image_id, status
        if self.jungfrau:
            c["pulse_id"][i], c["frame_index"][i], c["daq_rec"][i] = pulse_id, frame_index, daq_rec
        self.n_slots = max(self.n_slots, i + 1)

    def record_many(self, rows: np.ndarray, image_ids: np.ndarray, statuses: np.ndarray, frame_indexes: np.ndarray,
                    pulse_ids: np.ndarray, daq_recs: np.ndarray) -> None:
        """record() for arrays of rows."""
        c = self.columns
        top = int(rows.max()) + 1
        if top > len(c["status"]):
            self._grow(top)
        c["image_id"][rows], c["status"][rows] = image_ids, statuses
        if self.jungfrau:
            c["pulse_id"][rows], c["frame_index"][rows], c["daq_rec"][rows] = pulse_ids, frame_indexes, daq_recs
        self.n_slots = max(self.n_slots, top)

    def _grow(self, rows: int) -> None:
        size = min(max(rows, 2 * len(self.columns["status"])), self.n_images)
        for name, column in self.columns.items():
            grown = np.full(size, STATUS_NOT_WRITTEN if name == "status" else 0, column.dtype)
            grown[:len(column)] = column
            self.columns[name] = grown

    def check_in_place(self) -> None:
        """OutputRemovedError if the path no longer leads to this file: writing on would fill an inode
        nobody can reach, and the run must not end as a success."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != self.identity:
            raise OutputRemovedError(f"{self.path} was removed or replaced during the write (its directory "
                                     "deleted?); the images written to it are lost")

    def _write_columns(self, n: int) -> None:
        """The first `n` rows of the per-image columns into their datasets (through h5py's low-level
        calls: a sixth of the time of `dset[:n] = ...`, which counts in every file's close)."""
        if n == 0:
            return
        memory = h5s.create_simple((n,))
        for name, dset in self.meta.items():
            space = dset.id.get_space()
            space.select_hyperslab((0,), (n,))
            dset.id.write(memory, space, np.ascontiguousarray(self.columns[name][:n]))

    def flush(self) -> None:
        self.check_in_place()
        self._write_columns(self.n_slots)
        self.file.flush()
        self.cache.flushed()
        self.written_since_flush = 0

    def close(self, state: str) -> None:
        """Trim to the rows accounted for, write the end time and attributes, close; with a bounded page
        cache, the whole file written back (waited for: a writeback error raises) and dropped after."""
        try:
            n = self.n_slots
            if n < self.n_images:
                self.data.resize(n, axis=0)
                for dset in self.meta.values():
                    dset.resize((n,))
            self._write_columns(n)
            end = local_time()
            self.end_time[()] = end
            _set_attrs(self.file, {"state": state, "end_time": end, "n_images_written": self.n_written,
                                   "n_images_lost": self.n_lost, "n_images_rejected": self.n_rejected})
            self.file.close()
            self.cache.finish()
        finally:
            self.cache.close()  # its descriptor, whatever failed: the writer serves on
        self.check_in_place()


# --- a file whose writer died ---------------------------------------------------------------------------

PER_IMAGE_NAMES = ("image_id", "status", "pulse_id", "frame_index", "daq_rec")


@dataclass(frozen=True)
class Interrupted:
    """What mark_interrupted left in a file whose writer died."""

    n_rows: int  # rows kept, the file trimmed to them: the rows its last flush accounted for
    n_written: int  # of those, images with their pixels (status 0-3)
    n_lost: int
    n_rejected: int
    already_marked: bool  # an earlier marking had done it (and was itself cut off before it was noted)


def mark_interrupted(path: str, output_dirs: Iterable[str], request: dict, note: str) -> Interrupted:
    """Mark the file a killed writer left open at `path` as interrupted: root attribute `state` =
    "interrupted", `interruption` = `note`, `end_time` = the file's last modification (the dead writer's
    last write), the `n_images_*` counts, and the file trimmed to the rows its last flush accounted for
    (the rows after them read "not written" and held nothing anyone can identify).

    Only the file that writer created: reached inside `output_dirs` without following links, a regular
    file, its `request` attribute equal to `request` and its `state` "writing" (anything else raises
    UnmarkableFileError, and the file is left as it is). Opened without HDF5's file lock: its writer is
    dead (the caller holds the detector's writer lock), and a reader that has it open must not stop the
    marking. Any other failure (HDF5 cannot open or read it: killed halfway through a metadata write)
    raises what HDF5 raised."""
    name = os.path.basename(path)
    dir_fd = open_output_directory(path, output_dirs)
    try:
        # O_NONBLOCK: a FIFO put there must not hang the writer's start.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnmarkableFileError(f"{path} is not a regular file")
        last_write = local_time(st.st_mtime)
        # The inode just checked, opened again read-write through its descriptor (not through the name).
        f = h5py.File(f"/proc/self/fd/{fd}", "r+", locking=False)
    finally:
        os.close(fd)
    try:
        result = _mark(f, path, request, note, last_write)
    except BaseException:
        _close_or_keep(f, path)
        raise
    _close_or_keep(f, path)
    return result


def _close_or_keep(f: h5py.File, path: str) -> None:
    try:
        f.close()
    except BaseException as exc:
        keep_unclosable(f, path, exc)
        raise


def _text(value: object) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value if isinstance(value, str) else None


def _mark(f: h5py.File, path: str, request: dict, note: str, last_write: str) -> Interrupted:
    attrs = f.attrs
    try:
        written_request = json.loads(_text(attrs.get("request")) or "null")
    except ValueError:
        written_request = None
    if written_request != request:
        raise UnmarkableFileError(f"{path} holds another request than the one the dead writer had open (the file "
                                  "was replaced since?); left as it is")
    state = _text(attrs.get("state"))
    if state == "interrupted" and "interruption" in attrs:
        return Interrupted(f["entry/data/data"].shape[0], int(attrs.get("n_images_written", 0)),
                           int(attrs.get("n_images_lost", 0)), int(attrs.get("n_images_rejected", 0)), True)
    if state != "writing":
        raise UnmarkableFileError(f"{path} says state {state!r}, not 'writing'; left as it is")
    detector = f["entry/instrument/detector"]
    statuses = detector["status"][:]
    accounted = np.flatnonzero(statuses != STATUS_NOT_WRITTEN)
    n_rows = int(accounted[-1]) + 1 if len(accounted) else 0
    kept = statuses[:n_rows]
    n_lost = int((kept == STATUS_LOST).sum())
    n_rejected = int((kept == STATUS_REJECTED).sum())
    n_written = len(accounted) - n_lost - n_rejected
    _set_attrs(f, {"state": "interrupted", "interruption": note, "end_time": last_write,
                   "n_images_written": n_written, "n_images_lost": n_lost, "n_images_rejected": n_rejected})
    f["entry/end_time"][()] = last_write
    f.flush()  # the mark first, then the trim
    data = f["entry/data/data"]
    if data.shape[0] > n_rows:
        data.resize(n_rows, axis=0)
    for column in PER_IMAGE_NAMES:
        if column in detector and detector[column].shape[0] > n_rows:
            detector[column].resize((n_rows,))
    return Interrupted(n_rows, n_written, n_lost, n_rejected, False)
