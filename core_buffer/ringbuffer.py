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

Segments are created with O_EXCL by whichever process comes first and attached by everyone else. The
creator holds an exclusive flock on the segment while it initialises it (reserves its memory, faults in
every page, writes the header) and writes the magic last; an attacher that finds a segment without the
magic waits for as long as a creator holds that lock, however long a multi-GB segment takes. A segment
without the magic that nobody locks or maps is a dead creator's. Creation either ends with a complete
segment or removes what it made and raises RingBufferError (a full /dev/shm included: never a SIGBUS).
Nobody unlinks a segment on exit except the launcher, the tests and `std-daq buffers rm`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from typing import ClassVar, Iterator

import numpy as np
import posix_ipc

from core_buffer.config import DetectorConfig
from core_buffer.errors import BufferLayoutError, BufferMissingError, ImageLostError, RingBufferError
from core_buffer.formats import INVALID_ID, ImageMetadata, ModuleFrame

log = logging.getLogger(__name__)

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
# How long an attacher waits for a segment without the magic that no creator holds locked (the creator has
# created it but not yet locked it, or it died; or it is an older std-daq's that takes no lock) before it
# looks whether any live process maps it.
ATTACH_WAIT_S = 5.0
# How long an attacher waits for a creator that is alive and still initialising (it holds the lock, or
# without the lock: a live process maps the segment). Faulting in a 16M Jungfrau's FrameBuffer (512 slots
# of 32 MiB) takes seconds to tens of seconds on a loaded host; this only bounds a creator that hangs.
ATTACH_CREATOR_WAIT_S = 600.0
_MAX_CREATE_ATTEMPTS = 100  # a segment that keeps being removed as soon as it is created: give up
KINDS = ("frames", "images")
# What every std-daq segment is called: <namespace>-<detector_name>-<kind>, both names as config.py allows
# them (where one ends and the other begins is not recoverable from the name: both may hold '-').
SEGMENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*-[A-Za-z0-9][A-Za-z0-9_.-]*-(frames|images)$")


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _shm_space() -> str:
    """'<free> free of <size>' for SHM_DIR, for error messages."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError as exc:
        return f"unknown free space ({exc.strerror})"
    return f"{_mib(st.f_bavail * st.f_frsize)} free of {_mib(st.f_blocks * st.f_frsize)}"


@contextlib.contextmanager
def _reservation_turn() -> Iterator[None]:
    """Hold an exclusive flock on SHM_DIR itself: the std-daq creators of this host (any user, any
    container sharing the host's /dev/shm) reserve memory one at a time. Without the directory (it cannot be
    opened) there are no turns: fallocate still fails cleanly, only a race may then fail both creators."""
    try:
        fd = os.open(SHM_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        fd = -1
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # drops the lock


def _processes_mapping(name: str, inode: int) -> list[int]:
    """Pids of the live processes (that this one may look at) that have segment `name` mapped."""
    pids = []
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/maps") as maps:
                for line in maps:
                    # address perms offset dev inode path
                    fields = line.split(maxsplit=5)
                    if (len(fields) == 6 and fields[4] == str(inode)
                            and fields[5].rstrip("\n").removesuffix(" (deleted)").endswith("/" + name)):
                        pids.append(int(entry))
                        break
        except (OSError, ValueError):
            continue  # gone meanwhile, or another user's process we may not look into
    return pids


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
        if self.created:
            try:
                self._initialise(shm)
            except BaseException:
                self._discard(shm)
                raise
            fcntl.flock(shm.fd, fcntl.LOCK_UN)  # after the magic: attachers no longer need to wait
            shm.close_fd()
        else:
            try:
                self._mmap = mmap.mmap(shm.fd, shm.size)
            finally:
                shm.close_fd()
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

    # -- opening ----------------------------------------------------------------------------------
    def _open(self, create: bool, mode: int) -> posix_ipc.SharedMemory:
        path = "/" + self.name
        for _ in range(_MAX_CREATE_ATTEMPTS):
            if create:
                try:
                    shm = posix_ipc.SharedMemory(path, posix_ipc.O_CREX, mode=mode, size=0)
                except posix_ipc.ExistentialError:
                    pass  # somebody else created it: attach below
                else:
                    self._prepare(shm, mode)
                    self.created = True
                    return shm
            shm = self._wait_until_initialised(path)
            if shm is not None:
                return shm
            if not create:
                raise BufferMissingError(f"shared-memory segment {self.name} does not exist")
            # removed between our two calls (its creator failed and removed it, say): create it ourselves
        raise RingBufferError(f"shared-memory segment {self.name} was removed every time this process tried "
                              f"to attach to it ({_MAX_CREATE_ATTEMPTS} times)")

    def _prepare(self, shm: posix_ipc.SharedMemory, mode: int) -> None:
        """Lock, size and reserve the memory of a segment this process just created; on any failure the
        segment is removed (it is ours: O_EXCL) and the error raised."""
        try:
            # The lock tells attachers that the creator is alive and busy, for as long as it takes. Why a lock
            # and not a pid in the header: the kernel drops it when the creator dies, however it dies; it
            # works across pid namespaces (containers sharing the host's /dev/shm with `ipc: host` see
            # different pids); a reused pid cannot pass for the creator; and the header stays as it was.
            fcntl.flock(shm.fd, fcntl.LOCK_EX)  # blocks only while an attacher looks (LOCK_SH, a moment)
            os.fchmod(shm.fd, mode)  # the umask must not widen or narrow what the config asks for
            # Reserve every page before anything writes to one. A page of a tmpfs file is allocated at its
            # first touch, and a touch that finds /dev/shm full is a SIGBUS: a free-space check does not
            # prevent it, since two creators can both pass it before either has taken its room (and
            # MADV_POPULATE_WRITE then fails with EFAULT). fallocate takes the pages or fails with ENOSPC
            # (ENOMEM at a memory cgroup's limit), an error we can report, and it leaves no page of the
            # segment that a later touch would have to allocate. It is not atomic between callers, though:
            # two creators racing for the last room could each get part of it and both fail (and, restarted
            # together, fail again). So std-daq creators take turns, check and reservation together.
            # No ftruncate first: fallocate sets the size itself once it has every page, so the segment
            # never has a size with holes in it (a reader mapping its header, `std-daq buffers list` say,
            # would allocate the page by faulting on it: on a full /dev/shm, a SIGBUS).
            with _reservation_turn():
                # Only the creator needs the room; an attacher maps pages that already exist. Cheap and
                # worded for the operator; fallocate is what really decides (other programs use /dev/shm).
                self._check_free_space()
                try:
                    os.posix_fallocate(shm.fd, 0, self.layout.total_bytes)
                except OSError as exc:
                    raise self._no_room(exc, "reserving its memory") from None
        except BaseException:
            self._discard(shm)
            raise

    def _discard(self, shm: posix_ipc.SharedMemory) -> None:
        """Remove a segment this process created and failed to initialise: unlinked before the fd (and the
        lock) goes, so an attacher never finds it unlocked and takes it for a dead creator's."""
        mapped = getattr(self, "_mmap", None)
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:
                pass
        try:
            shm.unlink()
        except posix_ipc.ExistentialError:
            pass  # removed by someone else meanwhile
        shm.close_fd()

    def _no_room(self, exc: OSError, step: str) -> RingBufferError:
        hint = ""
        if exc.errno == errno.ENOMEM:
            hint = " (out of memory: a memory limit of this process or its cgroup?)"
        return RingBufferError(
            f"shared-memory segment {self.name} needs {_mib(self.layout.total_bytes)}; {step} failed: "
            f"{exc.strerror or exc}{hint}; {SHM_DIR} has {_shm_space()} (other segments may have taken the "
            f"room while this one was created); the segment was removed; lower the buffer slots in the "
            f"config or enlarge {SHM_DIR}")

    def _wait_until_initialised(self, path: str) -> posix_ipc.SharedMemory | None:
        """Open the existing segment once its creator has written the magic; None if there is none."""
        started = time.monotonic()
        unlocked_since: float | None = None  # since when it has been without the magic and without a lock
        holders: list[int] = []  # live processes mapping it, although no creator locks it
        said = False
        while True:
            try:
                shm = posix_ipc.SharedMemory(path)
            except posix_ipc.ExistentialError:
                return None
            except posix_ipc.PermissionsError as exc:
                raise RingBufferError(f"no permission to open shared-memory segment {self.name}: "
                                      f"{exc}") from None
            try:
                state = self._state(shm)
                if state == "ready":
                    self._check_not_world_writable(shm)
                    return shm
                st = os.fstat(shm.fd)
            except BaseException:
                shm.close_fd()
                raise
            shm.close_fd()
            now = time.monotonic()
            if state == "busy":
                unlocked_since, holders = None, []
            elif unlocked_since is None:
                unlocked_since = now
            elif now - unlocked_since > ATTACH_WAIT_S:
                # Not locked for a while: its creator died, or it is not a creator that locks (an older
                # std-daq's). Whether anybody alive maps it tells the two apart.
                holders = _processes_mapping(self.name, st.st_ino)
                if not holders:
                    raise BufferLayoutError(
                        f"shared-memory segment {self.name} exists but was never initialised: its creator "
                        f"died before it finished, and no process holds it; if no std-daq service of this "
                        f"detector is starting, remove it with: std-daq buffers rm {self.name}")
                unlocked_since = now  # look again after another ATTACH_WAIT_S
            alive = state == "busy" or bool(holders)  # a live process is (or may be) initialising it
            if alive and now - started > ATTACH_WAIT_S and not said:
                log.info("waiting for %s to finish initialising shared-memory segment %s (%s)",
                         self._who_holds(st, holders), self.name, _mib(self.layout.total_bytes))
                said = True
            if alive and now - started > ATTACH_CREATOR_WAIT_S:
                raise BufferLayoutError(
                    f"shared-memory segment {self.name} has not been initialised after "
                    f"{ATTACH_CREATOR_WAIT_S:.0f} s: {self._who_holds(st, holders)} is alive and holds "
                    f"it; do not remove the segment while that process runs (it is a std-daq service of "
                    f"this detector starting, or one that hangs: stop it first)")
            time.sleep(0.01)

    @staticmethod
    def _who_holds(st: os.stat_result, holders: list[int]) -> str:
        """'its creator (pid N)' from the flock in /proc/locks, or the processes mapping the segment."""
        if holders:
            return f"process {', '.join(map(str, holders))} (mapping it without a creator's lock)"
        # /proc/locks: "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF"; the pid as this pid namespace
        # sees it (0 or -1 when the creator runs in another container).
        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        try:
            with open("/proc/locks") as locks:
                for line in locks:
                    fields = line.split()  # a waiter's line has "->" in field 1: not matched
                    if (len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "WRITE"
                            and fields[5] == device and fields[4].isdigit() and int(fields[4]) > 0):
                        return f"its creator (pid {fields[4]})"
        except OSError:
            pass
        return "its creator"

    def _state(self, shm: posix_ipc.SharedMemory) -> str:
        """'ready' (the magic is there), 'busy' (a creator holds the lock) or 'unlocked' (neither)."""
        if self._magic_present(shm):
            return "ready"
        try:
            fcntl.flock(shm.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "busy"
        try:
            # The creator may have written the magic and let go of the lock between the two looks.
            return "ready" if self._magic_present(shm) else "unlocked"
        finally:
            fcntl.flock(shm.fd, fcntl.LOCK_UN)

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
        # pread, not a mapping: reading a hole of a tmpfs file through read(2) returns zeros, while a fault
        # on it allocates a page, which on a full /dev/shm is a SIGBUS.
        return os.pread(shm.fd, len(MAGIC), 0) == MAGIC

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

    def _initialise(self, shm: posix_ipc.SharedMemory) -> None:
        """Map, fault in and describe a segment whose memory _prepare reserved; the magic last."""
        self._mmap = mmap.mmap(shm.fd, self.layout.total_bytes)
        # Fault in every page now: the first write into fresh shared memory is page-fault bound
        # (~0.2-0.6 GB/s against >10 GB/s afterwards), which the hot paths must never pay.
        if not self._populate("faulting in its pages"):
            # No MADV_POPULATE_WRITE (Linux < 5.14): touch a byte per page. Safe only because every page
            # is reserved already (posix_fallocate): a touch allocates nothing, so it cannot fault.
            view = np.frombuffer(self._mmap, dtype=np.uint8)
            view[::PAGE] = 0
            del view
        metas = np.frombuffer(self._mmap, dtype=np.uint8)
        slots = metas[PAGE:].reshape(self.layout.n_slots, self.layout.slot_bytes)
        slots[:, :self.layout.n_modules * self.layout.meta_bytes].view(self.META_DTYPE)["id"] = INVALID_ID
        del metas, slots
        self._mmap[len(MAGIC):_HEADER.size] = self.layout.header()[len(MAGIC):]
        self._mmap[:len(MAGIC)] = MAGIC  # last: attachers wait for it

    def _populate(self, step: str) -> bool:
        """MADV_POPULATE_WRITE over the whole mapping: True when done, False when the kernel or Python does
        not support it (EINVAL, no madvise), RingBufferError when it failed for want of memory (EFAULT: a
        page that could not be allocated, what a touch would have turned into a SIGBUS; ENOMEM) or
        otherwise. A failure is never taken for "not supported"."""
        while True:
            try:
                self._mmap.madvise(_MADV_POPULATE_WRITE)
                return True
            except AttributeError:
                return False
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    return False
                if self.created:
                    raise self._no_room(exc, step) from None
                size = len(self._mmap)
                self._mmap.close()
                raise RingBufferError(
                    f"shared-memory segment {self.name} ({_mib(size)}) cannot be mapped into this process: "
                    f"{step} failed: {exc.strerror or exc} (EFAULT: some of its pages have no memory behind "
                    f"them and {SHM_DIR} has no room for them; ENOMEM: a memory limit of this process?); "
                    f"{SHM_DIR} has {_shm_space()}") from None

    def _map_pages(self) -> None:
        # An attaching process has the pages in memory but not in its page tables: fill them now, or its
        # first pass over the ring pays a page fault per 4 KiB (measured: a writer reading from a freshly
        # attached ring ran at a third of its speed). Its creator reserved and faulted in every page, so
        # this fails only for a segment someone else enlarged or made: then it is an error here, not a
        # SIGBUS at the first write to a page that has no memory behind it.
        self._populate("faulting in its pages")

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
