"""Bitshuffle-LZ4 chunks made in our own process, in the exact layout of the HDF5 bitshuffle filter
(filter id 32008), so that `write_direct_chunk` can store them and any reader with hdf5plugin decodes
them through the filter declared on the dataset.

Chunk layout (the filter's): uncompressed size u64 big-endian, block size in bytes u32 big-endian, then
the blocks as bitshuffle's `bshuf_compress_lz4` writes them.

Why in-process and not through HDF5's filter pipeline: the pipeline runs in the thread that calls
H5Dwrite, under h5py's global lock, so it can never use a second core, and it compresses from a copy of
the image. Calling the same C code directly lets us compress straight from the ImageBuffer slot, in as
many threads as the config asks (ctypes releases the GIL for the call), while the main thread writes.
The C code is the one hdf5plugin ships for the filter (`libh5bshuf.so` exports it), so the bytes are
the filter's own; `Bitshuffle()` checks that with a round trip before the writer relies on it.
"""
from __future__ import annotations

import ctypes
import os
import struct

import numpy as np

from core_buffer.errors import StdDaqError

HEADER = struct.Struct(">QI")  # uncompressed bytes, block bytes
BITSHUFFLE_FILTER_ID = 32008


def check_chunk_header(chunk: np.ndarray, nbytes: int, elem_size: int) -> tuple[int, int]:
    """(uncompressed bytes, block bytes) of a filter-32008 chunk; ValueError unless its header fits an
    image of `nbytes` bytes. Only the header is checked: the blocks are decoded by the reader."""
    if chunk.nbytes < HEADER.size:
        raise ValueError(f"a bitshuffle-LZ4 chunk has at least {HEADER.size} bytes, got {chunk.nbytes}")
    size, block_bytes = HEADER.unpack(chunk[:HEADER.size].tobytes())
    if size != nbytes:
        raise ValueError(f"the chunk header says {size} uncompressed bytes, the image has {nbytes}")
    if block_bytes == 0 or block_bytes % (8 * elem_size) or block_bytes > max(nbytes, 8 * elem_size):
        raise ValueError(f"the chunk header has an invalid block size {block_bytes}")
    return size, block_bytes


class CompressionUnavailable(StdDaqError):
    """hdf5plugin's bitshuffle library cannot be loaded or does not export what we call."""


def _library() -> ctypes.CDLL:
    import hdf5plugin

    path = os.path.join(hdf5plugin.PLUGIN_PATH, "libh5bshuf.so")
    try:
        lib = ctypes.CDLL(path)
        size_t, i64, ptr = ctypes.c_size_t, ctypes.c_int64, ctypes.c_void_p
        for name, restype, argtypes in (
            ("bshuf_compress_lz4", i64, [ptr, ptr, size_t, size_t, size_t]),
            ("bshuf_decompress_lz4", i64, [ptr, ptr, size_t, size_t, size_t]),
            ("bshuf_compress_lz4_bound", size_t, [size_t, size_t, size_t]),
            ("bshuf_default_block_size", size_t, [size_t]),
        ):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
    except (OSError, AttributeError) as exc:
        raise CompressionUnavailable(f"bitshuffle from hdf5plugin ({path}): {exc}") from None
    return lib


class Bitshuffle:
    """Compresses images of `n_elements` elements of `elem_size` bytes into filter-32008 chunks."""

    def __init__(self, elem_size: int, n_elements: int) -> None:
        self.lib = _library()
        self.elem_size, self.n_elements = elem_size, n_elements
        self.nbytes = elem_size * n_elements
        self.block_elements = int(self.lib.bshuf_default_block_size(elem_size))  # the filter's default
        self.max_chunk_bytes = HEADER.size + int(self.lib.bshuf_compress_lz4_bound(n_elements, elem_size,
                                                                                   self.block_elements))
        self._header = HEADER.pack(self.nbytes, self.block_elements * elem_size)
        self._self_check()

    def new_buffer(self) -> np.ndarray:
        """An output buffer big enough for any chunk."""
        return np.empty(self.max_chunk_bytes, np.uint8)

    def compress(self, pixels: np.ndarray, out: np.ndarray) -> int:
        """Compress the contiguous `pixels` (nbytes bytes, any view) into `out`; the chunk's size."""
        if pixels.nbytes != self.nbytes or not pixels.flags.c_contiguous:
            raise ValueError(f"expected {self.nbytes} contiguous bytes, got {pixels.nbytes}")
        out[:HEADER.size] = np.frombuffer(self._header, np.uint8)
        n = self.lib.bshuf_compress_lz4(pixels.ctypes.data, out.ctypes.data + HEADER.size, self.n_elements,
                                        self.elem_size, self.block_elements)
        if n < 0:
            raise RuntimeError(f"bshuf_compress_lz4 failed with {n}")
        return HEADER.size + n

    def decompress(self, chunk: np.ndarray, out: np.ndarray) -> None:
        """Decode a chunk made by `compress` (or any filter-32008 chunk of this image size) into `out`."""
        nbytes, block_bytes = self.check_header(chunk)
        if out.nbytes != nbytes or not out.flags.c_contiguous:
            raise ValueError("output buffer does not fit the chunk")
        n = self.lib.bshuf_decompress_lz4(chunk.ctypes.data + HEADER.size, out.ctypes.data, self.n_elements,
                                          self.elem_size, block_bytes // self.elem_size)
        if n < 0 or HEADER.size + n != chunk.nbytes:
            raise ValueError(f"not a valid bitshuffle-LZ4 chunk (decoder returned {n})")

    def check_header(self, chunk: np.ndarray) -> tuple[int, int]:
        return check_chunk_header(chunk, self.nbytes, self.elem_size)

    def _self_check(self) -> None:
        probe = (np.arange(self.nbytes, dtype=np.uint64) * 2654435761 >> 7).astype(np.uint8)
        chunk = self.new_buffer()
        n = self.compress(probe, chunk)
        back = np.empty_like(probe)
        try:
            self.decompress(chunk[:n], back)
        except ValueError as exc:
            raise CompressionUnavailable(f"bitshuffle round trip failed: {exc}") from None
        if not np.array_equal(back, probe):
            raise CompressionUnavailable("bitshuffle round trip gave other bytes")
