"""Shared-memory ring buffers (DESIGN.md §3): FrameBuffer (one slot per image id, all modules) and
ImageBuffer (one slot per image id, the assembled image).

Segment layout:

    offset 0          header page: magic, layout version, n_slots, n_modules, meta bytes, data bytes
    PAGE + k*slot     slot k: n_modules metas, padded to a page, then n_modules data blocks, contiguous

so the data of a slot is the modules' frames stacked in module order, page-aligned: a zero-copy raw
image. The slot of an id is `id % n_slots`.

Overwrite detection is a per-slot sequence check. A writer sets the meta's id to INVALID_ID before it
writes data and stores the real id last; a reader checks the id before and after it reads. Stores from
one Python thread reach other cores in program order on x86-64 (TSO); the project documents that it runs
on x86-64.

Segments are created with O_EXCL by whichever process comes first and attached by everyone else; the
creator writes the magic last, so an attacher that finds a segment still being initialised waits for it.
Nobody unlinks a segment on exit except the launcher, the tests and `std-daq buffers rm`.
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import posix_ipc

from core_buffer.config import DetectorConfig
from core_buffer.errors import BufferLayoutError, BufferMissingError, ImageLostError, RingBufferError
from core_buffer.formats import INVALID_ID, ImageMetadata, ModuleFrame

PAGE = mmap.PAGESIZE
MAGIC = b"STDDAQRB"
LAYOUT_VERSION = 1
_HEADER = struct.Struct("<8sIIIIQQQ")  # magic, version, n_slots, n_modules, meta_bytes, data_bytes,
#                                        slot_bytes, first_slot_offset
_ID = struct.Struct("<Q")  # an ImageMetadata's id
_ID_OFFSET = ImageMetadata.DTYPE.fields["id"][1]
_ID_END = _ID_OFFSET + _ID.size
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; faults in every page in one call
SHM_DIR = "/dev/shm"
ATTACH_WAIT_S = 5.0
KINDS = ("frames", "images")
# What every std-daq segment is called: <namespace>-<detector_name>-<kind>, both names as config.py allows
# them (where one ends and the other begins is not recoverable from the name: both may hold '-').
SEGMENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*-[A-Za-z0-9][A-Za-z0-9_.-]*-(frames|images)$")


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class BufferLayout:
    n_slots: int
    n_modules: int
    meta_bytes: int
    data_bytes: int  # per module

    @property
    def meta_area_bytes(self) -> int:
        return _round_up(self.n_modules * self.meta_bytes, PAGE)

    @property
    def slot_bytes(self) -> int:
        return self.meta_area_bytes + _round_up(self.n_modules * self.data_bytes, PAGE)

    @property
    def total_bytes(self) -> int:
        return PAGE + self.n_slots * self.slot_bytes

    def header(self) -> bytes:
        return _HEADER.pack(MAGIC, LAYOUT_VERSION, self.n_slots, self.n_modules, self.meta_bytes,
                            self.data_bytes, self.slot_bytes, PAGE)

    def describe(self) -> str:
        return (f"{self.n_slots} slots x {self.n_modules} modules, {self.meta_bytes} B meta + "
                f"{self.data_bytes} B data per module")


def read_header(data: bytes | memoryview) -> tuple[BufferLayout, int] | None:
    """The layout and layout version a segment header describes, or None if it has no valid magic."""
    magic, version, n_slots, n_modules, meta_bytes, data_bytes, _, _ = _HEADER.unpack_from(data)
    if magic != MAGIC:
        return None
    return BufferLayout(n_slots, n_modules, meta_bytes, data_bytes), version


def shm_name(config: DetectorConfig, kind: str) -> str:
    """Segment name without the leading slash, e.g. std-daq-JF01-frames."""
    return f"{config.namespace}-{config.detector_name}-{kind}"


class RingBuffer:
    """A shared-memory segment of `n_slots` slots; subclasses give the slots their meta dtype."""

    META_DTYPE: ClassVar[np.dtype]

    def __init__(self, name: str, layout: BufferLayout, *, create: bool = True, mode: int = 0o660) -> None:
        if mode & stat.S_IWOTH:
            raise ValueError(f"shared-memory segment {name}: mode {mode:04o} would let anyone on the host write "
                             "into it")
        if layout.meta_bytes != self.META_DTYPE.itemsize:
            raise ValueError(f"{type(self).__name__} metas are {self.META_DTYPE.itemsize} B, "
                             f"layout says {layout.meta_bytes}")
        self.name = name
        self.layout = layout
        self.created = False
        shm = self._open(create, mode)
        try:
            self._mmap = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        if self.created:
            self._initialise()
        else:
            self._check_layout()
            self._map_pages()
        self._array = np.frombuffer(self._mmap, dtype=np.uint8)
        n, slot = layout.n_slots, layout.slot_bytes
        slots = self._array[PAGE:PAGE + n * slot].reshape(n, slot)
        meta_bytes = layout.n_modules * layout.meta_bytes
        # One structured view over all metas and one over all data: per-slot access is then indexing.
        self._metas = slots[:, :meta_bytes].view(self.META_DTYPE)  # shape (n_slots, n_modules)
        self._data = slots[:, layout.meta_area_bytes:layout.meta_area_bytes + layout.n_modules *
                           layout.data_bytes]  # shape (n_slots, n_modules * data_bytes)
        # The id of every meta as a uint64 view: writing one is a single aligned 8-byte store, so a reader
        # never sees half of an id.
        self._ids = self._metas["id"]  # shape (n_slots, n_modules)
        self._slot_bytes = layout.slot_bytes  # a property that computes: not for every access
        self._mapped()

    def _mapped(self) -> None:
        """Views a subclass makes once the slots are mapped."""

    # -- opening ---------------------------------------------------------------------------------
    def _open(self, create: bool, mode: int) -> posix_ipc.SharedMemory:
        path = "/" + self.name
        if create:
            try:
                shm = posix_ipc.SharedMemory(path, posix_ipc.O_CREX, mode=mode, size=0)
            except posix_ipc.ExistentialError:
                pass  # somebody else created it: attach below
            else:
                # Only the creator needs the room; an attacher maps pages that already exist. The segment
                # is sized after the check, so a refusal leaves nothing behind.
                try:
                    self._check_free_space()
                    os.fchmod(shm.fd, mode)  # the umask must not widen or narrow what the config asks for
                    os.ftruncate(shm.fd, self.layout.total_bytes)
                except BaseException:
                    shm.close_fd()
                    shm.unlink()
                    raise
                self.created = True
                return shm
        deadline = time.monotonic() + ATTACH_WAIT_S
        while True:
            try:
                shm = posix_ipc.SharedMemory(path)
            except posix_ipc.ExistentialError:
                if create and time.monotonic() < deadline:  # removed between our two calls: retry
                    return self._open(create, mode)
                raise BufferMissingError(f"shared-memory segment {self.name} does not exist") from None
            except posix_ipc.PermissionsError as exc:
                raise RingBufferError(f"no permission to open shared-memory segment {self.name}: "
                                      f"{exc}") from None
            if shm.size >= PAGE and self._magic_present(shm):
                try:
                    self._check_not_world_writable(shm)
                except BaseException:
                    shm.close_fd()
                    raise
                return shm
            shm.close_fd()
            if time.monotonic() > deadline:
                raise BufferLayoutError(
                    f"shared-memory segment {self.name} exists but was never initialised (its creator "
                    f"died?); remove it with: std-daq buffers rm {self.name}")
            time.sleep(0.01)

    def _check_not_world_writable(self, shm: posix_ipc.SharedMemory) -> None:
        # Whoever can write into a segment can hand forged or corrupted images to every reader, and the writer
        # stores them as the detector's. std-daq never creates such a segment (shm_mode refuses access for
        # others); one that is world-writable was widened by someone else, so it is refused, not used.
        mode = os.fstat(shm.fd).st_mode
        if mode & stat.S_IWOTH:
            raise RingBufferError(
                f"shared-memory segment {self.name} is writable by every user (mode {stat.S_IMODE(mode):04o}); "
                f"refusing to use it: stop the services using it and remove it (std-daq buffers rm {self.name})")

    @staticmethod
    def _magic_present(shm: posix_ipc.SharedMemory) -> bool:
        with mmap.mmap(shm.fd, PAGE, prot=mmap.PROT_READ) as head:
            return head[:len(MAGIC)] == MAGIC

    def _check_free_space(self) -> None:
        try:
            stat = os.statvfs(SHM_DIR)
        except OSError:
            return
        free = stat.f_bavail * stat.f_frsize
        if self.layout.total_bytes > free:
            raise RingBufferError(
                f"shared-memory segment {self.name} needs {self.layout.total_bytes / 2**20:.0f} MiB but "
                f"{SHM_DIR} has {free / 2**20:.0f} MiB free; lower the buffer slots in the config or "
                f"enlarge {SHM_DIR}")

    def _initialise(self) -> None:
        # Fault in every page now: the first write into fresh shared memory is page-fault bound
        # (~0.2-0.6 GB/s against >10 GB/s afterwards), which the hot paths must never pay.
        try:
            self._mmap.madvise(_MADV_POPULATE_WRITE)
        except (OSError, ValueError, AttributeError):
            view = np.frombuffer(self._mmap, dtype=np.uint8)
            view[::PAGE] = 0
            del view
        metas = np.frombuffer(self._mmap, dtype=np.uint8)
        slots = metas[PAGE:].reshape(self.layout.n_slots, self.layout.slot_bytes)
        slots[:, :self.layout.n_modules * self.layout.meta_bytes].view(self.META_DTYPE)["id"] = INVALID_ID
        del metas, slots
        self._mmap[len(MAGIC):_HEADER.size] = self.layout.header()[len(MAGIC):]
        self._mmap[:len(MAGIC)] = MAGIC  # last: attachers wait for it

    def _map_pages(self) -> None:
        # An attaching process has the pages in memory but not in its page tables: fill them now, or its
        # first pass over the ring pays a page fault per 4 KiB (measured: a writer reading from a freshly
        # attached ring ran at a third of its speed).
        try:
            self._mmap.madvise(_MADV_POPULATE_WRITE)
        except (OSError, ValueError, AttributeError):
            pass

    def _check_layout(self) -> None:
        found = read_header(self._mmap[:_HEADER.size])
        if found is None:
            self._mmap.close()
            raise BufferLayoutError(f"shared-memory segment {self.name} has no std-daq header")
        layout, version = found
        if version != LAYOUT_VERSION or layout != self.layout or len(self._mmap) < layout.total_bytes:
            self._mmap.close()
            raise BufferLayoutError(
                f"shared-memory segment {self.name} has layout [{layout.describe()}, version {version}] "
                f"but this process expects [{self.layout.describe()}, version {LAYOUT_VERSION}]; stop the "
                f"services using it and remove it (std-daq buffers rm {self.name}) or fix the config")

    # -- access ----------------------------------------------------------------------------------
    def slot_of(self, image_id: int) -> int:
        return image_id % self.layout.n_slots

    def metas(self, slot: int) -> np.ndarray:
        """Structured view of the metas of one slot, shape (n_modules,)."""
        return self._metas[slot]

    def all_metas(self, module: int = 0) -> np.ndarray:
        """Structured view of the metas of `module` in every slot, shape (n_slots,): for readers that
        look at many slots (one index instead of a call per slot)."""
        return self._metas[:, module]

    def slot_data(self, slot: int) -> np.ndarray:
        """uint8 view of the whole data of a slot (all modules, stacked)."""
        return self._data[slot]

    def module_data(self, slot: int, module: int) -> np.ndarray:
        size = self.layout.data_bytes
        return self._data[slot, module * size:(module + 1) * size]

    def slot_id(self, slot: int, module: int = 0) -> int:
        return int(self._ids[slot, module])

    # -- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap. Views handed out keep the mapping alive until they are gone."""
        self._metas = self._data = self._array = self._ids = self._sequences = None  # type: ignore[assignment]
        try:
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it does

    def unlink(self) -> None:
        unlink(self.name)

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unlink(name: str) -> bool:
    """Remove a segment by name; False if it did not exist."""
    try:
        posix_ipc.unlink_shared_memory("/" + name)
        return True
    except posix_ipc.ExistentialError:
        return False


class FrameBuffer(RingBuffer):
    """Frames of all modules per image id; written by std_udp_recv, read by std_assembler."""

    META_DTYPE = ModuleFrame.DTYPE

    @classmethod
    def for_config(cls, config: DetectorConfig, *, create: bool = True) -> FrameBuffer:
        layout = BufferLayout(config.frame_buffer_slots, config.n_modules, ModuleFrame.SIZE,
                              config.stream.frame_bytes)
        return cls(shm_name(config, "frames"), layout, create=create, mode=config.shm_mode)

    def begin_frame(self, image_id: int, module: int) -> np.ndarray:
        """Mark the module's meta in the slot of `image_id` as being written; return its data view."""
        slot = self.slot_of(image_id)
        self._metas[slot, module]["id"] = INVALID_ID
        return self.module_data(slot, module)

    def commit_frame(self, frame: ModuleFrame) -> None:
        """Store the meta of a written frame, the id last (readers check it)."""
        meta = self._metas[self.slot_of(frame.id), frame.module_id]
        for name in ModuleFrame.DTYPE.names[1:]:
            meta[name] = getattr(frame, name)
        meta["id"] = frame.id

    def read_frame_meta(self, image_id: int, module: int) -> ModuleFrame:
        """The meta of a module's frame of `image_id`; ImageLostError if the slot holds another id."""
        meta = self._metas[self.slot_of(image_id), module]
        frame = ModuleFrame.from_record(meta)
        if frame.id != image_id:
            raise ImageLostError(image_id, frame.id)
        return frame

    def frame_data(self, image_id: int, module: int) -> np.ndarray:
        """uint8 view of a module's frame data in the slot of `image_id` (no id check: see read_frame_meta
        before and `still_holds` after reading)."""
        return self.module_data(self.slot_of(image_id), module)

    def still_holds(self, image_id: int, module: int) -> bool:
        return self.slot_id(self.slot_of(image_id), module) == image_id

    def holds(self, image_id: int, module: int, generation: int) -> bool:
        """Whether the module's meta in the slot of `image_id` is that of the very frame written with
        `generation` (ModuleFrame.generation), not just a frame with the same id (another acquisition's).
        The id is read first: a frame committed after it was read stored its generation before its id."""
        meta = self._metas[self.slot_of(image_id), module]
        return int(meta["id"]) == image_id and int(meta["generation"]) == generation


class ImageBuffer(RingBuffer):
    """Assembled images per image id; written by std_assembler or std_stream_recv, read by the writer."""

    META_DTYPE = ImageMetadata.DTYPE

    def _mapped(self) -> None:
        self._sequences = self._metas[:, 0]["user_1"]  # shape (n_slots,): the producers' sequence numbers

    @classmethod
    def for_config(cls, config: DetectorConfig, *, create: bool = True) -> ImageBuffer:
        layout = BufferLayout(config.image_buffer_slots, 1, ImageMetadata.SIZE, config.image_bytes)
        return cls(shm_name(config, "images"), layout, create=create, mode=config.shm_mode)

    def begin_image(self, image_id: int) -> np.ndarray:
        """Mark the slot of `image_id` as being written; return its uint8 data view."""
        slot = image_id % self.layout.n_slots
        self._ids[slot, 0] = INVALID_ID
        return self._data[slot]

    def image_view(self, image_id: int, dtype: np.dtype | str, shape: tuple[int, int]) -> np.ndarray:
        """Typed zero-copy view of the slot of `image_id` (no id check)."""
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self._data[self.slot_of(image_id), :n].view(dtype).reshape(shape)

    def commit_image(self, meta: ImageMetadata) -> None:
        """Store the metadata of a written image in its slot, the id last (readers check it)."""
        self.commit_encoded(meta.encode())

    def commit_encoded(self, encoded: bytes) -> None:
        """commit_image for an ImageMetadata already encoded (56 B), as a producer that publishes it has it.

        The id is made invalid (as begin_image leaves it; a commit without begin_image must not show the
        old id with new fields), the other fields are written in two slices, then the id. Field by field
        through numpy this took ~3 us; now ~0.3 us."""
        if len(encoded) != ImageMetadata.SIZE:
            raise ValueError(f"an encoded ImageMetadata is {ImageMetadata.SIZE} B, got {len(encoded)}")
        image_id = _ID.unpack_from(encoded, _ID_OFFSET)[0]
        slot = image_id % self.layout.n_slots
        meta = PAGE + slot * self._slot_bytes  # module 0's meta is the first thing in the slot
        self._ids[slot, 0] = INVALID_ID
        self._mmap[meta:meta + _ID_OFFSET] = encoded[:_ID_OFFSET]
        self._mmap[meta + _ID_END:meta + ImageMetadata.SIZE] = encoded[_ID_END:]
        self._ids[slot, 0] = image_id

    def read_meta(self, image_id: int) -> ImageMetadata:
        """The metadata stored with `image_id`; ImageLostError if its slot holds another id."""
        record = self._metas[self.slot_of(image_id), 0]
        meta = ImageMetadata.from_record(record)
        if meta.id != image_id:
            raise ImageLostError(image_id, meta.id)
        return meta

    def still_holds(self, image_id: int) -> bool:
        return int(self._ids[image_id % self.layout.n_slots, 0]) == image_id  # twice per image in a sender

    def holds(self, image_id: int, sequence: int) -> bool:
        """Whether the slot of `image_id` holds the very image published with `sequence` (its user_1), not
        just an image with the same id (another acquisition's, after the detector numbered from 1 again).
        The id is read first: an image committed after it was read stored its user_1 before its id."""
        slot = image_id % self.layout.n_slots
        return int(self._ids[slot, 0]) == image_id and int(self._sequences[slot]) == sequence

    def raw_bytes(self, image_id: int, nbytes: int) -> np.ndarray:
        """Zero-copy uint8 view of the first `nbytes` of the slot of `image_id` (no id check: callers
        check `still_holds` after they have copied it)."""
        return self._data[self.slot_of(image_id), :nbytes]

    def copy_image(self, image_id: int, out: np.ndarray, sequence: int | None = None) -> ImageMetadata:
        """Copy the image of `image_id` (and, if given, of `sequence`) into `out` (raw bytes); ImageLostError
        if it was not there or was overwritten while being copied, in which case `out` must not be used."""
        meta = self.read_meta(image_id)
        if sequence is not None and meta.user_1 != sequence:
            raise ImageLostError(image_id, image_id)
        n = out.nbytes
        np.copyto(out.reshape(-1).view(np.uint8), self._data[self.slot_of(image_id), :n])
        if not self.holds(image_id, meta.user_1):
            raise ImageLostError(image_id, self.slot_id(self.slot_of(image_id)))
        return meta
