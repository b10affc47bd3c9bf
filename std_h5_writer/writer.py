"""std_h5_writer: StoreStream in, images from the ImageBuffer into HDF5 files, writer status out.

start: refuse (failed status naming why) an output path outside `output_dirs`, in a missing directory,
or existing (unless `overwrite_files`), or a user it cannot write as, or anything else that stops the
file from being created (then nothing is left at the path); otherwise create the file with `file_mode`
and the requested owner, and report `writing`. A start while a file is open closes that one first as
interrupted (its run gets a failed status saying so). Every start gets a final status.
write: check the slot's metadata (shape, dtype, encoding), then write the image as one chunk straight
from its ImageBuffer slot (uncompressed), or compress it from the slot and write the chunk, or, for a
slot that already holds a bitshuffle-LZ4 chunk, write that chunk as it is. The slot's id and sequence
number (ImageMetadata.user_1, which the write message carries as the producer published it) are checked
before and after: an image that is gone or was overwritten meanwhile, also by another acquisition's image
with the same id, is recorded with status 4 (lost) and its row holds zeros, never another image's pixels;
a slot that is not an image of this file is recorded with status 5 (rejected).
stop: trim to the images accounted for, close, report `finished` (or `failed` after an I/O error).
Statuses go out at start, every `writer.status_interval_s` while writing (on time however many writes
are queued: the loops that work through a backlog watch the clock), and at the end. The file is
flushed when it is made and every `writer.flush_interval_s`, so after a crash (kill -9) it is readable up
to the last flush, with `state` "writing"; the writer keeps a record of the file it has open
(open_files.py), and the next writer of the detector, at its start, marks such a file "interrupted",
trims it to the rows that flush accounted for, and sends the final status the dead writer owed. Any I/O
error (disk full, directory removed) fails the run with the error's text, closes the file as far as
possible and leaves the writer ready for the next start. With `writer.page_cache` "bounded" (the default)
each file holds about two windows (`writer.page_cache_window_mib`) of page cache while it is written and
none once closed (page_cache.py); a file system that cannot do that gets kernel mode for the file, which
the final status says (`page_cache_fallback`).
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import struct
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import zmq

from core_buffer.config import DetectorConfig
from core_buffer.errors import FormatError, ImageLostError, RingBufferError
from core_buffer.formats import Dtype, Encoding, ImageMetadata, StoreOp, StoreStream, WriterState, WriterStatus
from core_buffer.ipc import make_socket, store_stream_address, writer_status_address
from core_buffer.output import OutputPathError, resolve_output_path
from core_buffer.ringbuffer import FrameBuffer, ImageBuffer
from core_buffer.service import Counters
from std_h5_writer import page_cache
from std_h5_writer.compression import Bitshuffle, CompressionUnavailable, check_chunk_header
from std_h5_writer.h5file import (PAGE_CACHE_WINDOW_MIB, PREALLOCATE_MAX_IMAGES, STATUS_LOST, STATUS_REJECTED,
                                  OutputFile, keep_unclosable)
from std_h5_writer.open_files import OpenFileRecords

log = logging.getLogger("std_h5_writer")

HWM = 100000
UNSENT_STATUSES_MAX = 1000
COMPRESSIONS = ("none", "bitshuffle-lz4")
# Uncompressed writes queued at most before they are done (_write_queued): the bookkeeping of a batch
# costs the same for 64 or 256 images (numpy calls, from cold caches after 64-256 MiB of copying), and
# 1000 images took ~4 ms less with 256 (in-process, alternating).
WRITE_BATCH = 256
VECTOR_MIN_WRITES = 8  # from this many queued writes on, they are done as a batch (_write_queued)
PENDING_POLL_S = 0.001  # poll timeout while compressed images are in flight: their results go out at once
# The fields of a StoreStream that a write needs (op, i_image, run_id, the image's id and sequence number
# user_1), read with one struct call: StoreStream.decode builds two dataclasses and checks every field
# (12 us a message, 4% of the time an image may take at 3 GB/s); the slot's own metadata is read and
# checked anyway.
WRITE_FIELDS = struct.Struct("<II8xQ8xQ24xQ")


class WriterSettings:
    """The "writer" config section (defaults in docs/std_h5_writer.md)."""

    def __init__(self, config: DetectorConfig) -> None:
        section = config.section("writer")
        self.compression = section.str("compression", "none", choices=COMPRESSIONS)
        self.compression_threads = section.int("compression_threads", 1, min=1, max=64)
        self.status_interval_s = section.float("status_interval_s", 1.0, min=0.05, max=3600.0)
        self.flush_interval_s = section.float("flush_interval_s", 2.0, min=0.05, max=3600.0)
        self.preallocate_max_images = section.int("preallocate_max_images", PREALLOCATE_MAX_IMAGES, min=0)
        self.page_cache = section.str("page_cache", "bounded", choices=page_cache.MODES)
        self.page_cache_window_mib = section.int("page_cache_window_mib", PAGE_CACHE_WINDOW_MIB, min=1, max=4096)
        section.finish()


class RequestError(Exception):
    """A start that cannot be served; the message is for the person who asked."""


class Run:
    def __init__(self, run_id: int, request: dict, output_file: str, n_images: int) -> None:
        self.run_id, self.request, self.output_file, self.n_images = run_id, request, output_file, n_images
        self.file: OutputFile | None = None
        self.record: str | None = None  # the name of its record of the open file (open_files.py)
        self.error: str | None = None
        self.started = time.monotonic()
        self.last_status = 0.0
        self.last_flush = time.monotonic()


@dataclass
class Pending:
    """An image being compressed by the thread pool; written by the main thread in arrival order."""

    run: Run
    i: int
    meta: ImageMetadata
    fields: tuple[int, int]
    future: Future
    out: np.ndarray


class H5Writer:
    name = "std_h5_writer"
    rate_counters = ("images_written",)

    def __init__(self, config: DetectorConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.settings = WriterSettings(config)
        # Before anything else, and before the StoreStream is connected: a second writer of this detector
        # stops here, without taking a message meant for the first (open_files.py).
        self.records = OpenFileRecords.for_config(config)
        try:
            self.images = ImageBuffer.for_config(config)
            self.frames: FrameBuffer | None = None
            self.dtype = np.dtype(config.image_dtype)
            self.shape = config.image_shape
            self.image_bytes = config.image_bytes
            self.buffer = np.empty(self.shape, self.dtype)  # only for HDF5's filter path (no bitshuffle library)
            # For the uncompressed hot path (_write_queued): every slot's metadata and bytes, indexed by slot, and
            # the ImageMetadata dtype code of this file's images.
            self.n_slots = self.images.layout.n_slots
            self.slot_metas = self.images.all_metas()
            self.slot_ids = self.slot_metas["id"]
            self.slot_sequences = self.slot_metas["user_1"]
            self.slot_bytes = [memoryview(self.images.slot_data(slot)[:self.image_bytes])
                               for slot in range(self.n_slots)]
            self.dtype_code = int(Dtype.from_numpy(self.dtype))
            # Writes received and not done yet (_write_queued): their rows, image ids and sequence numbers.
            self.queued_rows: list[int] = []
            self.queued_ids: list[int] = []
            self.queued_sequences: list[int] = []
            # When _periodic must run at the latest (the `writing` status, a flush): the loops that work
            # through a backlog of writes watch it, so a slow disk delays no status (docs/std_h5_writer.md).
            self.periodic_due = math.inf
            self.compressed = self.settings.compression == "bitshuffle-lz4"
            self.compressor: Bitshuffle | None = None
            self.pool: ThreadPoolExecutor | None = None
            self.pending: collections.deque[Pending] = collections.deque()
            self.free_buffers: list[np.ndarray] = []
            if self.compressed:
                self._set_up_compression()
            self.counters = Counters("starts", "files_finished", "files_failed", "images_written", "images_lost",
                                     "images_rejected", "frame_fields_missing", "bad_messages", "stray_messages",
                                     "statuses_not_sent", "writing", "last_written_id", "left_open_marked",
                                     "left_open_not_marked", "page_cache_fallbacks")
            self._attach_frames()
            self.context = context or zmq.Context.instance()
            self.pull = make_socket(self.context, zmq.PULL, hwm=HWM)
            self.pull.connect(store_stream_address(config))
            self.status = make_socket(self.context, zmq.PUSH, hwm=HWM, linger_ms=1000)
            self.status.bind(writer_status_address(config))
            self.run: Run | None = None
            self.unsent: collections.deque[bytes] = collections.deque(maxlen=UNSENT_STATUSES_MAX)
            log.info("writing %s images %s (%s%s), requests from %s, statuses to %s", self.dtype, self.shape,
                     self.settings.compression,
                     f", {self.settings.compression_threads} thread(s)" if self.compressor else "",
                     store_stream_address(config), writer_status_address(config))
        except BaseException:
            self.records.close()
            raise
        self._mark_left_open()

    def _set_up_compression(self) -> None:
        try:
            self.compressor = Bitshuffle(self.dtype.itemsize, int(np.prod(self.shape)))
        except CompressionUnavailable as exc:
            # HDF5's own filter still writes correct files, on one core and from a copy.
            log.warning("compressing through HDF5's filter pipeline instead of in-process: %s", exc)
            return
        threads = self.settings.compression_threads
        self.free_buffers = [self.compressor.new_buffer() for _ in range(2 * threads + 1)]
        if threads > 1:
            self.pool = ThreadPoolExecutor(threads, thread_name_prefix="bitshuffle")

    def _attach_frames(self) -> None:
        """Per-image pulse_id / daq_rec come from the FrameBuffer while it still holds the frame. It is made
        by the receivers, which may start after us (the launcher starts the writer first): retried at every
        start until it is there."""
        if self.frames is not None or self.config.detector_type != "jungfrau":
            return
        try:
            self.frames = FrameBuffer.for_config(self.config, create=False)
        except RingBufferError as exc:
            log.info("no FrameBuffer yet (%s); pulse_id and daq_rec wait for it", exc)

    # --- messages -------------------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> None:
        if self.pull.poll((PENDING_POLL_S if self.pending else timeout_s) * 1000):
            clock = time.monotonic
            for _ in range(1000):
                try:
                    parts = self.pull.recv_multipart(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                self._on_message(parts)
                # A write can take milliseconds (compressing, a slow disk): a backlog of them must not hold
                # the status back (1000 of them took longer than writer_agent waits for a status).
                if clock() >= self.periodic_due:
                    self._periodic()
            self._write_queued()
        self._drain(block=False)
        self._periodic()

    def _on_message(self, parts: list[bytes]) -> None:
        if len(parts[0]) == StoreStream.SIZE:
            op, i, run_id, image_id, sequence = WRITE_FIELDS.unpack_from(parts[0])
            if op == StoreOp.WRITE:
                if self.run is None or run_id != self.run.run_id:
                    self.counters.stray_messages += 1
                elif self.compressed:
                    self._write(i, image_id, sequence)
                else:
                    self.queued_rows.append(i)
                    self.queued_ids.append(image_id)
                    self.queued_sequences.append(sequence)
                    if len(self.queued_rows) >= WRITE_BATCH:
                        self._write_queued()
                return
        self._write_queued()  # the writes before this message first
        try:
            message = StoreStream.decode(parts[0])
        except FormatError as exc:
            self.counters.bad_messages += 1
            log.warning("dropped a bad StoreStream message: %s", exc)
            return
        if message.op == StoreOp.START:
            self._start(message, parts[1] if len(parts) > 1 else b"")
        elif self.run is None or message.run_id != self.run.run_id:
            self.counters.stray_messages += 1  # a write or stop for a run that is not open
        elif message.op == StoreOp.WRITE:
            self._write(message.i_image, message.image.id, message.image.user_1)
        else:
            self._stop()

    def _start(self, message: StoreStream, body: bytes) -> None:
        self.counters.starts += 1
        if self.run is not None:
            self._finish(self.run, "interrupted", f"interrupted by the start of run {message.run_id}")
        try:
            request = json.loads(body.decode()) if body else {}
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            self._report_refusal(message, "", f"the start's request frame is not a JSON object ({exc})")
            return
        output_file = request.get("output_file")
        run = Run(message.run_id, request, str(output_file), message.n_images)
        try:
            if message.n_images < 1:
                raise RequestError(f"n_images must be at least 1, got {message.n_images}")
            path = resolve_output_path(output_file, self.config.output_dirs, self.config.overwrite_files)
            run.output_file = path
            uid = self._owner(message.user_id)
            self._attach_frames()
            # Recorded before the file is made, so a kill from here on leaves a record for the next writer;
            # once per file (~0.05 ms), removed when the file is closed or was not made.
            run.record = self.records.note(path, run.run_id, request)
            run.file = OutputFile(path, self.config, request, message.n_images, self.dtype,
                                  self.settings.compression, mode=self.config.file_mode,
                                  overwrite=self.config.overwrite_files, uid=uid,
                                  preallocate_max_images=self.settings.preallocate_max_images,
                                  page_cache=self.settings.page_cache,
                                  page_cache_window_bytes=self.settings.page_cache_window_mib << 20)
        except (OutputPathError, RequestError) as exc:
            self.records.forget(run.record)
            self._report_refusal(message, run.output_file, str(exc))
            return
        except OSError as exc:
            self.records.forget(run.record)
            self._report_refusal(message, run.output_file, f"cannot create the file: {exc.strerror or exc}")
            return
        except Exception as exc:  # noqa: BLE001 - every start gets a status (DESIGN.md §4), whatever failed
            self.records.forget(run.record)
            log.exception("run %d: creating %s failed", message.run_id, run.output_file)
            self._report_refusal(message, run.output_file, f"cannot create the file: {type(exc).__name__}: {exc}")
            return
        self.run = run
        self.counters.writing = 1
        log.info("run %d: writing %d images to %s", run.run_id, run.n_images, run.output_file)
        self._send_status(run, WriterState.WRITING)
        self.periodic_due = run.last_status + self.settings.status_interval_s

    def _owner(self, user_id: int) -> int | None:
        """The uid to own the file: None = the writer's own. user_id 0 means "not given"."""
        if user_id == 0 or user_id == os.geteuid():
            return None
        if os.geteuid() != 0:
            raise RequestError(f"the writer runs as uid {os.geteuid()} and cannot create files for uid {user_id}")
        import pwd

        try:
            pwd.getpwuid(user_id)
        except KeyError:
            raise RequestError(f"user_id {user_id} is not a user on the writer's host") from None
        return user_id

    def _mark_left_open(self) -> None:
        """Mark interrupted the file(s) a previous writer of this detector left open when it died (its
        records, open_files.py), and send the final status that writer owed each run: a writer_agent
        still waiting for the run ends its request with it, instead of after its writer_timeout_s."""
        for left in self.records.recover(self.config.output_dirs):
            marked = left.marked
            details = {"request_id": left.request.get("request_id"), "n_images": left.request.get("n_images"),
                       "dead_writer_pid": left.pid}
            died = f"std_h5_writer died while writing (pid {left.pid}: killed or crashed)"
            if marked is None:
                self.counters.left_open_not_marked += 1
                status = WriterStatus(left.run_id, WriterState.FAILED, left.output_file,
                                      error=f"{died}; restarted: {left.error}", details=details)
            else:
                self.counters.left_open_marked += 1
                details.update(n_lost=marked.n_lost, n_rejected=marked.n_rejected, file_state="interrupted")
                status = WriterStatus(left.run_id, WriterState.FAILED, left.output_file, marked.n_written,
                                      marked.n_lost + marked.n_rejected,
                                      f"{died}; restarted, it marked {left.output_file} interrupted: "
                                      f"{marked.n_written} images readable, those after its last flush lost",
                                      details)
            self._push(status)

    # --- images ---------------------------------------------------------------------------------------

    def _write(self, i: int, image_id: int, sequence: int) -> None:
        """Write row `i` from the slot of `image_id`, if it holds the very image published with `sequence`
        (user_1): the same id alone may be another acquisition's image (the detector numbers from 1 again
        at every start), and a slot that holds another image is the lost path, as an overwritten one."""
        run = self.run
        if not 0 <= i < run.n_images:
            self.counters.stray_messages += 1
            return
        try:
            meta = self._slot_meta(image_id, sequence)  # the slot's own metadata, not the message's copy
            problem = self._rejection(meta)
            if problem and not self.images.holds(image_id, sequence):
                raise ImageLostError(image_id, self.images.slot_id(self.images.slot_of(image_id)))
            if problem:
                self._reject(run.file, i, meta, problem)
            elif meta.encoding == Encoding.BITSHUFFLE_LZ4:
                self._write_from_slot(run.file, i, meta, self.images.raw_bytes(image_id, meta.user_2))
            elif not self.compressed:
                self._write_from_slot(run.file, i, meta, self.images.raw_bytes(image_id, self.image_bytes))
            elif self.compressor is not None:
                self._compress(run.file, i, meta)
            else:
                # HDF5's filter reads it: a private copy, checked after the copy (id, then sequence)
                self.images.copy_image(image_id, self.buffer, sequence)
                run.file.write_pixels(i, self.buffer)
                self._written(run.file, i, meta, self._frame_fields(image_id))
        except ImageLostError:
            self._lost(run.file, i, image_id)
        except Exception as exc:  # noqa: BLE001 - OSError (disk full, ...) and anything h5py raises
            if not isinstance(exc, OSError):
                log.exception("run %d: writing image %d failed", run.run_id, i)
            self._fail(run, f"I/O error writing image {i} to {run.output_file}: {exc}")

    def _write_queued(self) -> None:
        """Do the queued writes of an uncompressed run: the hot path. A few go through _write one by one;
        more are done in batches (_write_batch). A batch stops when _periodic is due and the rest waits
        for the next one: at 1 MiB and 100 MB/s a batch of 256 takes 2.6 s, and a status that waits for a
        backlog of such batches is one writer_agent takes for a dead writer."""
        while self.queued_rows:
            self._write_batch()
            if time.monotonic() >= self.periodic_due:
                self._periodic()

    def _write_batch(self) -> None:
        """Do queued writes in phases over the whole batch, with numpy for the bookkeeping: check the slots'
        metadata, write the images (one pwrite each and nothing else in between but the check that the slot
        still holds its image, and a look at the clock), record them. At 1 MiB an image each microsecond
        per image is 0.4% of the writer's speed, and Python run between two 1 MiB copies runs from cold
        caches: 1000 images took 245 ms this way against 259 ms one by one (in-process, with ZMQ;
        docs/std_h5_writer.md). The writes not done when _periodic is due are queued again."""
        rows, ids, sequences = self.queued_rows, self.queued_ids, self.queued_sequences
        self.queued_rows, self.queued_ids, self.queued_sequences = [], [], []
        run = self.run
        if run is None:
            return
        if len(rows) < VECTOR_MIN_WRITES:
            for i, image_id, sequence in zip(rows, ids, sequences):
                self._write(i, image_id, sequence)
                if self.run is not run:
                    return  # it failed the run
            return
        f = run.file
        rows_a, ids_a = np.array(rows, np.int64), np.array(ids, np.uint64)
        sequences_a = np.array(sequences, np.uint64)
        slots = ids_a % np.uint64(self.n_slots)
        metas = self.slot_metas[slots]  # a copy: what the slots held before the writes
        good = ((metas["id"] == ids_a) & (metas["user_1"] == sequences_a) & (metas["height"] == self.shape[0])
                & (metas["width"] == self.shape[1]) & (metas["dtype"] == self.dtype_code)
                & (metas["encoding"] == Encoding.RAW) & (rows_a < run.n_images))
        if not good.all():
            for k in np.flatnonzero(~good).tolist():
                self._write(rows[k], ids[k], sequences[k])  # the general path says what is wrong with it
                if self.run is not run:
                    return
            rows_a, ids_a, sequences_a, slots, metas = (rows_a[good], ids_a[good], sequences_a[good], slots[good],
                                                        metas[good])
        pulse_ids, daq_recs, no_frame = self._frame_fields_of(f, ids_a)
        slot_bytes, slot_ids, slot_sequences = self.slot_bytes, self.slot_ids, self.slot_sequences
        written, error = 0, None
        clock, due = time.monotonic, self.periodic_due
        # Whether each slot still held its image right after the image was written: checked at once, not
        # after the whole batch, so that a slot reused after its image was safely out does not count. The
        # id first, then the sequence number (as ImageBuffer.holds): a producer stores an image's user_1
        # before its id, so a matching id read first and a matching user_1 read after it prove the slot
        # held this very image, not one of the same id that another acquisition committed meanwhile.
        overwritten = np.zeros(len(rows_a), bool)
        try:
            if f.chunk_offsets is not None:
                f.ensure_room(len(rows_a) * f.chunk_bytes)
                write = f.write_preallocated
            else:
                write = f.write_chunk
            for i, slot, image_id, sequence in zip(rows_a.tolist(), slots.tolist(), ids_a.tolist(),
                                                   sequences_a.tolist()):
                write(i, slot_bytes[slot])
                overwritten[written] = slot_ids[slot] != image_id or slot_sequences[slot] != sequence
                written += 1
                if clock() >= due:
                    break
        except Exception as exc:  # noqa: BLE001 - OSError (disk full, ...) and anything h5py raises
            if not isinstance(exc, OSError):
                log.exception("run %d: writing image %d failed", run.run_id, rows_a[written])
            error = f"I/O error writing image {rows_a[written]} to {run.output_file}: {exc}"
        if error is None and written < len(rows_a):  # _periodic is due: the rest after it
            self.queued_rows = rows_a[written:].tolist()
            self.queued_ids = ids_a[written:].tolist()
            self.queued_sequences = sequences_a[written:].tolist()
        self.counters.frame_fields_missing += int(no_frame[:written].sum())  # the rest count when they are done
        done = np.zeros(len(rows_a), bool)
        done[:written] = True
        for k in np.flatnonzero(overwritten).tolist():
            try:
                f.erase(int(rows_a[k]))
            except Exception as exc:  # noqa: BLE001 - as above
                error = error or f"I/O error erasing image {rows_a[k]} in {run.output_file}: {exc}"
                done[k:] = False
                break
            self._lost(f, int(rows_a[k]), int(ids_a[k]))
        done &= ~overwritten
        n = int(done.sum())
        if n:
            f.record_many(rows_a[done], ids_a[done], metas["status"][done], metas["user_2"][done],
                          pulse_ids[done], daq_recs[done])
            f.n_written += n
            f.written_since_flush += n
            self.counters.images_written += n
            self.counters.last_written_id = int(ids_a[done][-1])
        if error is not None:
            self._fail(run, error)

    def _frame_fields_of(self, f: OutputFile, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pulse_ids, daq_recs, missing) of Jungfrau images, from module 0's frames in the FrameBuffer (0
        where the frame is gone, and `missing` True: the caller counts those it writes in
        frame_fields_missing); with image_id_source "pulse_id" the image id is the pulse id whatever the
        FrameBuffer holds. Zeros for other detectors."""
        pulse_ids = np.zeros(len(ids), np.uint64)
        daq_recs = np.zeros(len(ids), np.uint32)
        if not f.jungfrau:
            return pulse_ids, daq_recs, np.zeros(len(ids), bool)
        if self.config.image_id_source == "pulse_id":
            pulse_ids[:] = ids
        if self.frames is None:
            return pulse_ids, daq_recs, np.ones(len(ids), bool)
        frames = self.frames.all_metas(0)[ids % np.uint64(self.frames.layout.n_slots)]
        there = frames["id"] == ids
        from_frames = there & (pulse_ids == 0)
        pulse_ids[from_frames] = frames["pulse_id"][from_frames]
        daq_recs[there] = frames["daq_rec"][there]
        return pulse_ids, daq_recs, ~there

    def _slot_meta(self, image_id: int, sequence: int) -> ImageMetadata:
        """The metadata in the slot of `image_id` (ImageLostError if the slot holds another id, or the same
        id with another sequence number: another acquisition's image). What ImageBuffer.read_meta does,
        with one `item()` instead of a field-by-field copy (16 -> 4 us). A copy torn by a commit meanwhile
        is caught by the check after the image was read (ImageBuffer.holds)."""
        version, id_, *fields = self.slot_metas[image_id % self.n_slots].item()
        meta = ImageMetadata(id_, *fields, version)
        if id_ != image_id or meta.user_1 != sequence:
            raise ImageLostError(image_id, id_)
        return meta

    def _rejection(self, meta: ImageMetadata) -> str | None:
        """Why the slot is not an image this file can take, or None."""
        if (meta.height, meta.width) != self.shape:
            return f"shape {meta.height}x{meta.width}, the file holds {self.shape[0]}x{self.shape[1]}"
        try:
            dtype = Dtype(meta.dtype).numpy
        except ValueError:
            return f"unknown dtype code {meta.dtype}"
        if dtype != self.dtype:
            return f"dtype {dtype}, the file holds {self.dtype}"
        if meta.encoding == Encoding.RAW:
            return None
        if meta.encoding != Encoding.BITSHUFFLE_LZ4:
            return f"unknown encoding {meta.encoding}"
        if not self.compressed:
            return "bitshuffle-LZ4 bytes for an uncompressed file"
        if not 0 < meta.user_2 <= self.image_bytes:
            return f"compressed size {meta.user_2} outside 1..{self.image_bytes}"
        try:
            check_chunk_header(self.images.raw_bytes(meta.id, meta.user_2), self.image_bytes, self.dtype.itemsize)
        except ValueError as exc:
            return str(exc)
        return None

    def _write_from_slot(self, f: OutputFile, i: int, meta: ImageMetadata, chunk: np.ndarray) -> None:
        """Write the slot's bytes as the chunk, from shared memory without a copy, then check the slot still
        holds the image (its id and sequence number, `meta` being the slot's as checked before); if it was
        overwritten meanwhile, what reached the file may be mixed, so the row is erased (rewritten with the
        fill value) and recorded as lost. Saves a 1 MiB copy per image; the erase costs one more chunk
        write, only for a lost image."""
        fields = self._frame_fields(meta.id)
        f.write_chunk(i, chunk)
        if not self.images.holds(meta.id, meta.user_1):
            f.erase(i)
            raise ImageLostError(meta.id, self.images.slot_id(self.images.slot_of(meta.id)))
        self._written(f, i, meta, fields)

    def _compress(self, f: OutputFile, i: int, meta: ImageMetadata) -> None:
        """Compress from the slot: inline with one thread, else in the pool, written later in order."""
        fields = self._frame_fields(meta.id)
        if self.pool is None:
            out = self.free_buffers[0]
            n = self._compress_slot(meta.id, meta.user_1, out)
            if n is None:
                raise ImageLostError(meta.id, self.images.slot_id(self.images.slot_of(meta.id)))
            f.write_chunk(i, out[:n])
            self._written(f, i, meta, fields)
            return
        run = self.run
        if not self.free_buffers:
            self._drain(block=True, limit=1)  # the pool is full: wait for the oldest
            if self.run is not run:
                return  # writing the oldest failed the run
        out = self.free_buffers.pop()
        self.pending.append(Pending(run, i, meta, fields, self.pool.submit(self._compress_slot, meta.id,
                                                                          meta.user_1, out), out))

    def _compress_slot(self, image_id: int, sequence: int, out: np.ndarray) -> int | None:
        """The chunk size, or None if the slot no longer holds the image published with `sequence` (runs
        in a pool thread; the caller checked the slot's metadata before)."""
        n = self.compressor.compress(self.images.raw_bytes(image_id, self.image_bytes), out)
        return n if self.images.holds(image_id, sequence) else None

    def _drain(self, block: bool, limit: int | None = None) -> None:
        """Write the compressed images that are ready, oldest first (all of them, waiting, if `block`)."""
        done = 0
        while self.pending and (block or self.pending[0].future.done()) and (limit is None or done < limit):
            job = self.pending.popleft()
            try:
                n = job.future.result()
                run = self.run
                if run is None or job.run is not run or run.file is None:
                    continue  # the run ended meanwhile (failed, interrupted): its results are dropped
                try:
                    if n is None:
                        self._lost(run.file, job.i, job.meta.id)
                    else:
                        run.file.write_chunk(job.i, job.out[:n])
                        self._written(run.file, job.i, job.meta, job.fields)
                except Exception as exc:  # noqa: BLE001 - as in _write
                    if not isinstance(exc, OSError):
                        log.exception("run %d: writing image %d failed", run.run_id, job.i)
                    self._fail(run, f"I/O error writing image {job.i} to {run.output_file}: {exc}")
            finally:
                self.free_buffers.append(job.out)
                done += 1

    def _written(self, f: OutputFile, i: int, meta: ImageMetadata, fields: tuple[int, int]) -> None:
        pulse_id, daq_rec = fields
        f.record(i, meta.id, meta.status, meta.user_2 if meta.encoding == Encoding.RAW else 0, pulse_id, daq_rec)
        f.n_written += 1
        f.written_since_flush += 1
        self.counters.images_written += 1
        self.counters.last_written_id = meta.id

    def _lost(self, f: OutputFile, i: int, image_id: int) -> None:
        f.record(i, image_id, STATUS_LOST)
        f.n_lost += 1
        self.counters.images_lost += 1

    def _reject(self, f: OutputFile, i: int, meta: ImageMetadata, problem: str) -> None:
        f.record(i, meta.id, STATUS_REJECTED)
        f.n_rejected += 1
        self.counters.images_rejected += 1
        n = self.counters.images_rejected
        if n == 1 or n % 1000 == 0:
            log.warning("image %d rejected (%d so far): the slot holds %s", meta.id, n, problem)

    def _frame_fields(self, image_id: int) -> tuple[int, int]:
        """(pulse_id, daq_rec) of one image: _frame_fields_of for the paths that take images one by one."""
        pulse_ids, daq_recs, missing = self._frame_fields_of(self.run.file, np.array([image_id], np.uint64))
        self.counters.frame_fields_missing += int(missing[0])
        return int(pulse_ids[0]), int(daq_recs[0])

    # --- ends of runs ---------------------------------------------------------------------------------

    def _stop(self) -> None:
        self._drain(block=True)
        run = self.run
        if run is not None:  # (a failed write while draining ended it already)
            self._finish(run, "interrupted" if run.file.n_slots < run.n_images else "complete", None)

    def _fail(self, run: Run, error: str) -> None:
        log.error("run %d: %s", run.run_id, error)
        self._finish(run, "interrupted", error)

    def _finish(self, run: Run, state: str, error: str | None) -> None:
        if self.run is run:
            self.run = None  # first: images still in the pool are dropped, not written
            self.counters.writing = 0
        self._drain(block=True)
        if run.file is not None:
            closed = True
            try:
                run.file.close(state)
            except Exception as exc:  # noqa: BLE001 - the status must go out whatever closing raised
                error = error or f"closing {run.output_file} failed: {exc}"
                try:
                    run.file.file.close()
                except Exception as close_exc:  # noqa: BLE001 - the file is beyond saving; the status says so
                    # HDF5 could not close it (a write failed inside its metadata): its descriptor is
                    # released, the h5py File kept (h5file.keep_unclosable); not the OutputFile, whose
                    # per-image columns can be tens of MB. Its record stays: the next writer tries to
                    # mark it interrupted.
                    keep_unclosable(run.file.file, run.output_file, close_exc)
                    closed = False
            if closed:
                self.records.forget(run.record)
        failed = error is not None
        run.error = error
        self.counters.files_failed += failed
        self.counters.files_finished += not failed
        self._send_status(run, WriterState.FAILED if failed else WriterState.FINISHED, error, file_state=state,
                          **self._page_cache_details(run))
        log.info("run %d: %s %s (%d written, %d lost, %d rejected)%s", run.run_id,
                 "failed" if failed else "finished", run.output_file, run.file.n_written if run.file else 0,
                 run.file.n_lost if run.file else 0, run.file.n_rejected if run.file else 0,
                 f": {error}" if error else "")
        run.file = None

    def _page_cache_details(self, run: Run) -> dict:
        """The final status says how the file's page cache was kept: `page_cache` the mode it was written
        in, and `page_cache_fallback` why a file meant to be bounded was not (page_cache.py)."""
        if run.file is None:
            return {}
        fallback = run.file.cache.fallback
        if fallback is None:
            return {"page_cache": run.file.cache.mode}
        self.counters.page_cache_fallbacks += 1
        return {"page_cache": "kernel", "page_cache_fallback": fallback}

    def _report_refusal(self, message: StoreStream, output_file: str, reason: str) -> None:
        log.warning("run %d refused: %s", message.run_id, reason)
        self.counters.files_failed += 1
        status = WriterStatus(message.run_id, WriterState.FAILED, output_file or "", error=reason)
        self._push(status)

    def _send_status(self, run: Run, state: WriterState, error: str | None = None, **extra) -> None:
        f = run.file
        elapsed = time.monotonic() - run.started
        details = {"n_images": run.n_images, "request_id": run.request.get("request_id"),
                   "duration_s": round(elapsed, 3), **extra}
        n_written = f.n_written if f else 0
        if f:
            details.update(n_lost=f.n_lost, n_rejected=f.n_rejected)
        if elapsed > 0 and n_written:
            details["images_per_s"] = round(n_written / elapsed, 1)
        n_missing = f.n_lost + f.n_rejected if f else 0
        self._push(WriterStatus(run.run_id, state, run.output_file, n_written, n_missing, error, details))
        run.last_status = time.monotonic()

    def _push(self, status: WriterStatus) -> None:
        if len(self.unsent) == self.unsent.maxlen:
            self.counters.statuses_not_sent += 1  # the oldest waiting status is dropped
        self.unsent.append(status.encode())
        self._flush_statuses()

    def _flush_statuses(self) -> None:
        """Send the waiting statuses; with no writer_agent connected (it restarts, or reconnects after
        our own restart) they wait here instead of being lost."""
        while self.unsent:
            try:
                self.status.send(self.unsent[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            self.unsent.popleft()

    def _periodic(self) -> None:
        """Send the waiting statuses, the `writing` status and flush the file when they are due, and note
        when to come back at the latest (periodic_due)."""
        self._flush_statuses()
        run = self.run
        if run is None or run.file is None:
            self.periodic_due = math.inf
            return
        now = time.monotonic()
        if now - run.last_status >= self.settings.status_interval_s:
            self._send_status(run, WriterState.WRITING)
        if run.file.written_since_flush and now - run.last_flush >= self.settings.flush_interval_s:
            try:
                run.file.flush()
            except Exception as exc:  # noqa: BLE001 - as in _write
                self._fail(run, f"I/O error flushing {run.output_file}: {exc}")
                self.periodic_due = math.inf
                return
            run.last_flush = now
        # The flush is due only once images were written since the last one; until then, the status is
        # what to come back for (a due time in the past would cut every batch after one image).
        self.periodic_due = run.last_status + self.settings.status_interval_s
        if run.file.written_since_flush:
            self.periodic_due = min(self.periodic_due, run.last_flush + self.settings.flush_interval_s)

    # --- Service --------------------------------------------------------------------------------------

    def stop(self) -> None:
        self.poll(0)  # what is queued already (a stop, typically)
        if self.run is not None:
            self._finish(self.run, "interrupted", "std_h5_writer was stopped (SIGTERM) while writing")

    def close(self) -> None:
        # Order: the pool first (its threads read the ImageBuffer), then sockets, then the buffers, then the
        # lock of the record directory (the next writer may start once this one is done with everything).
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.pull.close()
        self.status.close()
        self.slot_bytes = []  # views into the ImageBuffer: gone before it is unmapped
        self.images.close()
        if self.frames is not None:
            self.frames.close()
        self.records.close()

    def stats(self) -> Mapping[str, int]:
        return self.counters.snapshot()
