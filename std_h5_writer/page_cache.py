"""The page cache an output file takes: kept bounded (`writer.page_cache` "bounded", the default) or left
to the kernel ("kernel").

Bounded: writeback of what the writer writes starts at once (sync_file_range with SYNC_FILE_RANGE_WRITE,
for every MiB written: the disk works while the next image is copied), and each time a window of
`writer.page_cache_window_mib` has been written, the window before it is waited for (the same call with
WAIT_BEFORE and WAIT_AFTER: its pages are clean then, and a writeback error shows here) and dropped
(posix_fadvise DONTNEED). A file so holds at most two windows of cached pages, and the MiB whose writeback
is not started yet. After each metadata flush the writeback of the whole file is started (HDF5's metadata
is not in the windows); at close the whole file is written back, waited for and dropped.

Why not O_DIRECT (docs/std_h5_writer.md has the figures): a direct write returns only once the disk has
the data, one request in flight, where the started writeback keeps the disk's queue full; in the same
10 GiB runs of benchmarks/h5_writer.py the loop with started writeback wrote 1.68 GB/s and the O_DIRECT
loop 1.39-1.51. O_DIRECT also needs block-aligned offsets, lengths and memory, which an Eiger image
(1,058,840 bytes), a compressed chunk placed by HDF5 and HDF5's own metadata are not. Why windows and not
one call at close: the pages an image took go back to the allocator while the next images are written,
so the writer reuses the same memory (on this project's VM a page the guest handed back to the host costs
a host fault: with a page cache that grows, the writer wrote 0.6-0.8 GB/s there, with three times the
CPU).

A file system that cannot do this for a file falls back to kernel mode for that file, says so once in the
log, and the writer puts the reason in the run's final status (`page_cache_fallback`): one that refuses
the calls (EINVAL, ESPIPE, ENOSYS, EOPNOTSUPP), or one whose pages are still cached after they were written
back and dropped (tmpfs and ramfs, whose pages are the file; an overlayfs whose calls reach no pages). The
second is checked once a file, with mincore, at the first window dropped (or at close).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import math
import mmap
import os

import numpy as np

log = logging.getLogger("std_h5_writer")

MODES = ("bounded", "kernel")
# Writeback is started once this much has been written since it was last started: per image for images of
# 1 MiB and more, and not a system call for each small (compressed) chunk.
WRITEBACK_START_BYTES = 1 << 20
# Errors that mean the file system does not do this for the file; any other error (EIO, ENOSPC) is a
# failed write and fails the run.
REFUSALS = (errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP)

SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
WRITE_BACK_AND_WAIT = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
PAGE_BYTES = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.sync_file_range.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value


def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    """sync_file_range(2); nbytes 0 means up to the end of the file. OSError on failure."""
    if _libc.sync_file_range(fd, offset, nbytes, flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def cached_bytes(fd: int, offset: int = 0, length: int | None = None) -> int:
    """Bytes of the file's pages in [offset, offset + length) (default: to its end) that are in the page
    cache (mincore on a read-only mapping, which faults nothing in). `fd` must be open for reading."""
    if length is None:
        length = os.fstat(fd).st_size - offset
    start = offset - offset % PAGE_BYTES
    length += offset - start
    if length <= 0:
        return 0
    address = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if address in (None, MAP_FAILED):
        code = ctypes.get_errno()
        raise OSError(code, f"mmap for mincore: {os.strerror(code)}")
    try:
        resident = np.zeros(-(-length // PAGE_BYTES), np.uint8)
        if _libc.mincore(address, length, resident.ctypes.data) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"mincore: {os.strerror(code)}")
        return int(np.count_nonzero(resident & 1)) * PAGE_BYTES
    finally:
        _libc.munmap(address, length)


class KernelPageCache:
    """Mode "kernel": the page cache is the kernel's business (its dirty limits and flusher threads)."""

    mode = "kernel"
    fallback: str | None = None

    def written(self, offset: int, nbytes: int) -> None:
        pass

    def flushed(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class BoundedPageCache:
    """Mode "bounded" for one file (module docstring). Works on its own descriptor of the file (a dup of
    HDF5's), so it can still write back and drop the file after HDF5 closed it; `close` releases it."""

    mode = "bounded"

    def __init__(self, fd: int, window_bytes: int, path: str) -> None:
        self.fd = os.dup(fd)
        self.window_bytes = window_bytes
        self.path = path
        self.fallback: str | None = None  # why this file went to kernel mode, once it did
        self.checked = False  # whether dropped pages were seen to leave the cache (_check_dropped)
        # What was written since writeback was last started: its range and bytes (a range, as the rows of
        # a file may come out of order).
        self.low, self.high, self.unstarted = math.inf, 0, 0
        self.window = (math.inf, 0, 0)  # (low, high, bytes) of the window being written, writeback started
        self.previous: tuple[int, int, int] | None = None  # the window before it: on its way to the disk
        self.bytes_written = 0

    def written(self, offset: int, nbytes: int) -> None:
        """`nbytes` were written at `offset`. The hot path (once an image, between two image copies, where
        every Python statement runs from caches the copy emptied): a few comparisons, and the rest once a
        MiB."""
        if self.fallback is not None:
            return
        if offset < self.low:
            self.low = offset
        if offset + nbytes > self.high:
            self.high = offset + nbytes
        self.unstarted += nbytes
        if self.unstarted >= WRITEBACK_START_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Start the writeback of what was written since the last start; the window is full: next one.
        (Once a MiB: libc is called directly, without sync_file_range's and _call's frames.)"""
        low, high, n = self.low, self.high, self.unstarted
        self.low, self.high, self.unstarted = math.inf, 0, 0
        self.bytes_written += n
        if _libc.sync_file_range(self.fd, low, high - low, SYNC_FILE_RANGE_WRITE) != 0:
            code = ctypes.get_errno()
            self._refused("sync_file_range", OSError(code, os.strerror(code)))
            return
        window_low, window_high, window_n = self.window
        self.window = (min(window_low, low), max(window_high, high), window_n + n)
        if self.window[2] >= self.window_bytes:
            self._next_window()

    def _next_window(self) -> None:
        """The window being written is full: the one before it to the disk (waited for) and out of the
        cache; the full one becomes the one before."""
        previous, self.previous, self.window = self.previous, self.window, (math.inf, 0, 0)
        if previous is not None:
            low, high, n = previous
            self._drop(low, high - low, n)

    def _drop(self, offset: int, length: int, n_written: int) -> None:
        """Wait for [offset, offset + length) to reach the disk and drop it (length 0: to the file's end)."""
        if not self._call(sync_file_range, self.fd, offset, length, WRITE_BACK_AND_WAIT):
            return
        if not self._call(os.posix_fadvise, self.fd, offset, length, os.POSIX_FADV_DONTNEED):
            return
        if not self.checked:
            self.checked = True
            self._check_dropped(offset, length, n_written)

    def _check_dropped(self, offset: int, length: int, n_written: int) -> None:
        """Once a file: pages written back and dropped must have left the cache. Where they did not, the
        file system keeps them (tmpfs, ramfs: they are the file) and bounding is moot. More than half
        still cached is that (a page or two may have been written again meanwhile: the chunk next to it)."""
        try:
            still = cached_bytes(self.fd, offset, length or None)
        except OSError as exc:  # no mapping of this file possible: nothing says the drop failed
            log.info("%s: cannot check the page cache it takes (%s)", self.path, exc)
            return
        if still > n_written // 2:
            self._fall_back(f"{still >> 20} MiB of its pages were still cached after they were written back and "
                            "dropped (a file system that keeps pages in memory, e.g. tmpfs)")

    def flushed(self) -> None:
        """HDF5 flushed its metadata (outside the windows): start writing it back."""
        if self.fallback is None:
            self._call(sync_file_range, self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)

    def finish(self) -> None:
        """At close: the whole file written back, waited for and dropped. Raises a writeback error."""
        if self.fallback is None:
            self._drop(0, 0, self.bytes_written + self.unstarted)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _call(self, function, *args) -> bool:
        """function(*args); False (and kernel mode from now on) if the file system refuses it."""
        try:
            function(*args)
        except OSError as exc:
            self._refused(function.__name__, exc)
            return False
        return True

    def _refused(self, name: str, exc: OSError) -> None:
        """The call `name` failed with `exc`: kernel mode from now on if the file system refuses it, else
        the error (EIO, ENOSPC: the write failed) is raised."""
        if exc.errno not in REFUSALS:
            raise exc
        self._fall_back(f"{name} refused: {exc.strerror}")

    def _fall_back(self, reason: str) -> None:
        self.fallback = reason
        log.warning("%s: page cache in kernel mode for this file, not bounded: %s", self.path, reason)


def page_cache_for(mode: str, fd: int, window_bytes: int, path: str) -> BoundedPageCache | KernelPageCache:
    """The page-cache policy of one file (writer.page_cache)."""
    if mode == "bounded":
        return BoundedPageCache(fd, window_bytes, path)
    return KernelPageCache()
