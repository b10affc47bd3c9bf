"""Compiled inner loops (numba): Jungfrau conversion and Gigafrost 12-bit unpacking.

Importing this module compiles nothing; the first call of a kernel does (numba's on-disk cache makes
later processes start fast). Without numba, `AVAILABLE` is False and callers use their numpy paths.

Why the Jungfrau kernel looks the way it does (measured on the 2-core AMD EPYC development VM, one
module frame = 512 x 1024 pixels, realistic data: ~98 % G0, the other ~2 % scattered at random):
- Every pixel is first converted as G0 in a loop LLVM vectorises: it reads the raw word and two
  float32 tables (pedestal, 1/gain) and writes float32, about 200 us per frame, bound by memory.
- A per-pixel branch on the gain costs a misprediction for every non-G0 pixel, and a second scalar pass
  that tests every pixel is as slow again. Instead a 64-pixel gain mask is built with one vector compare
  (`_gain_mask64`, an LLVM `icmp` on <64 x i16> bitcast to i64, i.e. compare + pack + movemask on
  x86), and its set bits are turned into pixel positions without branches (4 unconditional slots per
  mask, a loop only for the rare mask with more than 4 bits).
- The non-G0 pixels then read their (pedestal, 1/gain) pairs from a table that holds G1 and G2 of a
  pixel in one 16-byte record, so each fix-up touches one cache line; those lines are prefetched a few
  pixels ahead, because at ~2 % density they are random accesses into tables far larger than the cache.
- Arithmetic is the float32 reference `(adc - pedestal) * (1 / gain)` exactly (no fastmath): the loop
  is memory bound, so there is nothing to gain from reassociation, and results stay bit-identical to
  the numpy path.

Gigafrost: LLVM does not vectorise the 3-bytes-to-2-pixels loop by itself (about 600 images/s for
2016 x 2016 even with contiguous rows; 167/s through a strided 2-D view); `_unpack16` spells out the
SIMD version (one byte shuffle, a mask, a shift, a blend per 16 pixels) and writes straight into the
interleaved, flipped image rows: about 1000 images/s, against ~1900/s for a plain copy of the bytes.
"""
from __future__ import annotations

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    AVAILABLE = True
except ImportError:  # pragma: no cover - numba is a dependency; the numpy paths stay for robustness
    AVAILABLE = False

CHUNK_ROWS = 8  # rows converted as G0 before their non-G0 pixels are fixed (fits L1/L2 with the tables)
PREFETCH_AHEAD = 16  # non-G0 pixels between a table prefetch and its use
MASK_SLOTS = 4  # positions written without a branch per 64-pixel mask (P(more) ~1 % at 2 % non-G0)
SCRATCH_PAD = 64  # room past the last position for the unconditional slots

if AVAILABLE:
    _I16 = ir.IntType(16)
    _I32 = ir.IntType(32)
    _I64 = ir.IntType(64)

    @intrinsic
    def _gain_mask64(typingctx, pixels, start):
        """Bit j set when pixels.flat[start + j] has non-zero gain bits (value > 0x3FFF)."""
        if not (isinstance(pixels, types.Array) and pixels.dtype == types.uint16 and pixels.layout == "C"):
            return None
        sig = types.uint64(pixels, start)

        def codegen(context, builder, signature, args):
            array = context.make_array(signature.args[0])(context, builder, args[0])
            vector = ir.VectorType(_I16, 64)
            address = builder.bitcast(builder.gep(array.data, [args[1]]), vector.as_pointer())
            words = builder.load(address, align=2)
            above = builder.icmp_unsigned(">", words, ir.Constant(vector, [ir.Constant(_I16, 0x3FFF)] * 64))
            return builder.bitcast(above, _I64)

        return sig, codegen

    @intrinsic
    def _trailing_zeros(typingctx, value):
        """Index of the lowest set bit of a uint64; 64 for 0."""
        sig = types.int64(types.uint64)

        def codegen(context, builder, signature, args):
            return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

        return sig, codegen

    @intrinsic
    def _popcount(typingctx, value):
        sig = types.int64(types.uint64)

        def codegen(context, builder, signature, args):
            return builder.ctpop(args[0])

        return sig, codegen

    @intrinsic
    def _prefetch(typingctx, array, index):
        """A read prefetch of array.flat[index] (no effect on results)."""
        if not isinstance(array, types.Array):
            return None
        sig = types.void(array, index)

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            i8p = ir.IntType(8).as_pointer()
            function = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32]), "llvm.prefetch.p0i8")
            address = builder.bitcast(builder.gep(data, [args[1]]), i8p)
            builder.call(function, [address, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    def _jit(**options):
        """numba.njit with the on-disk cache when there is somewhere to keep it.

        numba caches next to the module or in the user's cache directory; a read-only installation run by a
        user without a home (the Docker image, a systemd unit without NUMBA_CACHE_DIR) has neither, and
        numba then refuses the function outright. Such a process compiles its kernels itself instead
        (a second or two at its first image).
        """
        def decorate(function):
            try:
                return numba.njit(nogil=True, boundscheck=False, cache=True, **options)(function)
            except RuntimeError:  # "cannot cache function ...: no locator available"
                return numba.njit(nogil=True, boundscheck=False, **options)(function)

        return decorate

    _ONE = np.uint64(1)

    @_jit()
    def _convert_rows(raw, pedestal_g0, inverse_g0, others, out, row_begin, row_end, rows, cols):
        """Rows [row_begin, row_end) of a Jungfrau frame (or stack of frames); returns the NaN pixels
        among the non-G0 ones (G0 NaNs come from the table and are counted by `_count_g0_nan`).
        raw: (h, w) uint16, C order, w a multiple of 64; pedestal_g0, inverse_g0: (h, w) float32;
        others: (h * w * 4) float32, per pixel (pedestal G1, 1/gain G1, pedestal G2, 1/gain G2);
        out: (h, w) float32, any strides; rows, cols: int64 scratch of CHUNK_ROWS * w + SCRATCH_PAD."""
        w = raw.shape[1]
        nan = 0
        for chunk in range(row_begin, row_end, CHUNK_ROWS):
            chunk_end = min(chunk + CHUNK_ROWS, row_end)
            found = 0
            for r in range(chunk, chunk_end):
                for c in range(w):  # everything as G0: vectorised, the memory-bound part
                    out[r, c] = (np.float32(raw[r, c] & 0x3FFF) - pedestal_g0[r, c]) * inverse_g0[r, c]
                for block in range(0, w, 64):
                    mask = _gain_mask64(raw, r * w + block)
                    n_set = _popcount(mask)
                    for slot in range(MASK_SLOTS):  # no branch: slots past n_set are overwritten later
                        rows[found + slot] = r
                        cols[found + slot] = block + _trailing_zeros(mask)
                        mask &= mask - _ONE
                    if n_set > MASK_SLOTS:
                        k = found + MASK_SLOTS
                        while mask:
                            rows[k] = r
                            cols[k] = block + _trailing_zeros(mask)
                            k += 1
                            mask &= mask - _ONE
                    found += n_set
            for k in range(found):
                if k + PREFETCH_AHEAD < found:
                    _prefetch(others, (rows[k + PREFETCH_AHEAD] * w + cols[k + PREFETCH_AHEAD]) * 4)
                r = rows[k]
                c = cols[k]
                v = raw[r, c]
                record = (r * w + c) * 4 + 2 * (v >> 15)  # G1 (01) -> 0, G2 (11) and invalid (10) -> 2
                value = (np.float32(v & 0x3FFF) - others[record]) * others[record + 1]
                if v >> 14 == 2:
                    value = np.float32(np.nan)
                out[r, c] = value
                nan += value != value
        return nan

    @_jit()
    def _count_g0_nan(raw, bad_g0):
        """How many of the pixels whose G0 table gives NaN (masked, zero gain) are G0 in `raw`."""
        flat = raw.reshape(-1)
        n = 0
        for k in range(bad_g0.size):
            n += flat[bad_g0[k]] < 0x4000
        return n

    @_jit()
    def convert_serial(raw, pedestal_g0, inverse_g0, others, bad_g0, out, rows, cols):
        """Convert a Jungfrau frame on the calling thread; returns the number of NaN pixels."""
        nan = _convert_rows(raw, pedestal_g0, inverse_g0, others, out, 0, raw.shape[0], rows[0], cols[0])
        return nan + _count_g0_nan(raw, bad_g0)

    @_jit(parallel=True)
    def convert_parallel(raw, pedestal_g0, inverse_g0, others, bad_g0, out, rows, cols):
        """The same, its rows split into rows.shape[0] stripes run by numba's worker threads."""
        h = raw.shape[0]
        stripes = rows.shape[0]
        step = (h + stripes - 1) // stripes
        nan = 0
        for s in numba.prange(stripes):
            nan += _convert_rows(raw, pedestal_g0, inverse_g0, others, out, s * step, min(h, (s + 1) * step),
                                 rows[s], cols[s])
        return nan + _count_g0_nan(raw, bad_g0)

    @intrinsic
    def _unpack16(typingctx, packed, at, image, to):
        """16 pixels from the 24 bytes at packed[at] (12-bit, little-endian) into image.flat[to:to + 16]
        (uint16, or float32 for corrected images). Reads 32 bytes: callers keep 8 bytes of room behind.
        One byte shuffle puts bytes (3k, 3k+1) and (3k+1, 3k+2) into 16-bit lanes; even lanes keep their
        low 12 bits, odd lanes their high 12 (vpshufb + vpblendw on AVX2)."""
        if not (isinstance(packed, types.Array) and packed.dtype == types.uint8 and packed.layout == "C"
                and isinstance(image, types.Array) and image.layout == "C"
                and image.dtype in (types.uint16, types.float32)):
            return None
        sig = types.void(packed, at, image, to)

        def codegen(context, builder, signature, args):
            source = context.make_array(signature.args[0])(context, builder, args[0])
            target = context.make_array(signature.args[2])(context, builder, args[2])
            i8, i32 = ir.IntType(8), ir.IntType(32)
            raw = ir.VectorType(i8, 32)
            lanes = ir.VectorType(_I16, 16)
            data = builder.load(builder.bitcast(builder.gep(source.data, [args[1]]), raw.as_pointer()), align=1)
            order = [i for k in range(8) for i in (3 * k, 3 * k + 1, 3 * k + 1, 3 * k + 2)]
            pairs = builder.shuffle_vector(data, ir.Constant(raw, None), ir.Constant(ir.VectorType(i32, 32), order))
            words = builder.bitcast(pairs, lanes)
            low = builder.and_(words, ir.Constant(lanes, [0x0FFF] * 16))
            high = builder.lshr(words, ir.Constant(lanes, [4] * 16))
            pixels = builder.select(ir.Constant(ir.VectorType(ir.IntType(1), 16), [1, 0] * 8), low, high)
            if signature.args[2].dtype == types.float32:
                floats = ir.VectorType(ir.FloatType(), 16)
                pixels = builder.uitofp(pixels, floats)
                address = builder.bitcast(builder.gep(target.data, [args[3]]), floats.as_pointer())
            else:
                address = builder.bitcast(builder.gep(target.data, [args[3]]), lanes.as_pointer())
            builder.store(pixels, address, align=2)
            return context.get_dummy_value()

        return sig, codegen

    @_jit()
    def unpack_12bit(packed, image, rows, cols, y0, dy, x0):
        """A Gigafrost stream's frame, `rows` rows of `cols` 12-bit pixels packed row after row, into the
        C-ordered `image` (uint16 or float32): its row r goes to image row y0 + dy * r (dy = 2 interleaves
        the two links, -2 also flips a top quadrant), columns x0 .. x0 + cols - 1."""
        n = packed.size
        row_bytes = cols * 3 // 2
        width = image.shape[1]
        for r in range(rows):
            source = r * row_bytes
            y = y0 + dy * r
            target = y * width + x0
            done = 0
            while done + 16 <= cols and source + done * 3 // 2 + 32 <= n:
                _unpack16(packed, source + done * 3 // 2, image, target + done)
                done += 16
            for p in range(done // 2, cols // 2):  # the rest of the row (and the frame's last bytes)
                b0 = np.uint16(packed[source + 3 * p])
                b1 = np.uint16(packed[source + 3 * p + 1])
                b2 = np.uint16(packed[source + 3 * p + 2])
                image[y, x0 + 2 * p] = b0 | ((b1 & 0xF) << 8)
                image[y, x0 + 2 * p + 1] = (b1 >> 4) | (b2 << 4)

    @_jit()
    def _unpack_streams(slot, frame_bytes, image, rows, cols, y0, dy, x0, first, last):
        for m in range(first, last):
            unpack_12bit(slot[m * frame_bytes:(m + 1) * frame_bytes], image, rows, cols, y0[m], dy[m], x0[m])

    @_jit()
    def unpack_streams_serial(slot, frame_bytes, image, rows, cols, y0, dy, x0):
        """Every stream of a FrameBuffer slot (the frames back to back, `frame_bytes` each) into `image`;
        stream m's rows go to image rows y0[m] + dy[m] * r from column x0[m] (see `unpack_12bit`)."""
        _unpack_streams(slot, frame_bytes, image, rows, cols, y0, dy, x0, 0, y0.size)

    @_jit(parallel=True)
    def unpack_streams_parallel(slot, frame_bytes, image, rows, cols, y0, dy, x0):
        """The same, the streams shared among numba's worker threads."""
        for m in numba.prange(y0.size):
            _unpack_streams(slot, frame_bytes, image, rows, cols, y0, dy, x0, m, m + 1)
