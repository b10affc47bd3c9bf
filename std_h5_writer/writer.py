"""std_h5_writer: StoreStream in, images from the ImageBuffer into HDF5 files, writer status out.

start: refuse (failed status naming why) an output path outside `output_dirs`, in a missing directory,
or existing (unless `overwrite_files`), or a user it cannot write as; otherwise create the file with
`file_mode` and the requested owner, and report `writing`. A start while a file is open closes that one
first as interrupted (its run gets a failed status saying so).
write: copy the image out of its ImageBuffer slot, checking the slot's id before and after the copy, and
write it as one chunk; an image that is gone or was overwritten meanwhile is recorded with status 4
(lost) and its pixels are zeros, never another image's.
stop: trim to the images accounted for, close, report `finished` (or `failed` after an I/O error).
Statuses go out at start, every `writer.status_interval_s` while writing, and at the end. The file is
flushed every `writer.flush_interval_s`, so after a crash it is readable up to the last flush and its
`state` attribute still says "writing". Any I/O error (disk full, directory removed) fails the run with
the error's text, closes the file as far as possible and leaves the writer ready for the next start.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time
from typing import Mapping

import numpy as np
import zmq

from core_buffer.config import DetectorConfig
from core_buffer.errors import BufferMissingError, FormatError, ImageLostError
from core_buffer.formats import StoreOp, StoreStream, WriterState, WriterStatus
from core_buffer.ipc import make_socket, store_stream_address, writer_status_address
from core_buffer.output import OutputPathError, resolve_output_path
from core_buffer.ringbuffer import FrameBuffer, ImageBuffer
from core_buffer.service import Counters
from std_h5_writer.h5file import STATUS_LOST, OutputFile, create_exclusive

log = logging.getLogger("std_h5_writer")

HWM = 100000
UNSENT_STATUSES_MAX = 1000
COMPRESSIONS = ("none", "bitshuffle-lz4")


class WriterSettings:
    """The "writer" config section."""

    def __init__(self, config: DetectorConfig) -> None:
        section = config.section("writer")
        self.compression = section.str("compression", "none", choices=COMPRESSIONS)
        self.status_interval_s = section.float("status_interval_s", 1.0, min=0.05, max=3600.0)
        self.flush_interval_s = section.float("flush_interval_s", 2.0, min=0.05, max=3600.0)
        section.finish()


class RequestError(Exception):
    """A start that cannot be served; the message is for the person who asked."""


class Run:
    def __init__(self, run_id: int, request: dict, output_file: str, n_images: int) -> None:
        self.run_id, self.request, self.output_file, self.n_images = run_id, request, output_file, n_images
        self.file: OutputFile | None = None
        self.error: str | None = None
        self.started = time.monotonic()
        self.last_status = 0.0
        self.last_flush = time.monotonic()


class H5Writer:
    name = "std_h5_writer"
    rate_counters = ("images_written",)

    def __init__(self, config: DetectorConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.settings = WriterSettings(config)
        self.images = ImageBuffer.for_config(config)
        try:  # per-image pulse_id / daq_rec come from the FrameBuffer while it still holds the frame
            self.frames: FrameBuffer | None = FrameBuffer.for_config(config, create=False)
        except BufferMissingError:
            self.frames = None
        self.dtype = np.dtype(config.image_dtype)
        self.shape = config.image_shape
        self.buffer = np.empty(self.shape, self.dtype)
        self.context = context or zmq.Context.instance()
        self.pull = make_socket(self.context, zmq.PULL, hwm=HWM)
        self.pull.connect(store_stream_address(config))
        self.status = make_socket(self.context, zmq.PUSH, hwm=HWM, linger_ms=1000)
        self.status.bind(writer_status_address(config))
        self.run: Run | None = None
        self.unsent: collections.deque[bytes] = collections.deque(maxlen=UNSENT_STATUSES_MAX)
        self.counters = Counters("starts", "files_finished", "files_failed", "images_written", "images_lost",
                                 "bad_messages", "stray_messages", "statuses_not_sent", "writing",
                                 "last_written_id")
        log.info("writing %s images %s (%s), requests from %s, statuses to %s", self.dtype, self.shape,
                 self.settings.compression, store_stream_address(config), writer_status_address(config))

    # --- messages -------------------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> None:
        if self.pull.poll(timeout_s * 1000):
            for _ in range(1000):
                try:
                    parts = self.pull.recv_multipart(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                self._on_message(parts)
        self._periodic()

    def _on_message(self, parts: list[bytes]) -> None:
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
            self._write(message)
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
            create_exclusive(path, self.config.file_mode, self.config.overwrite_files, uid)
            run.file = OutputFile(path, self.config, request, message.n_images, self.dtype, self.settings.compression)
        except (OutputPathError, RequestError) as exc:
            self._report_refusal(message, run.output_file, str(exc))
            return
        except OSError as exc:
            self._report_refusal(message, run.output_file, f"cannot create the file: {exc.strerror or exc}")
            return
        self.run = run
        self.counters.writing = 1
        log.info("run %d: writing %d images to %s", run.run_id, run.n_images, run.output_file)
        self._send_status(run, WriterState.WRITING)

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

    def _write(self, message: StoreStream) -> None:
        run, meta = self.run, message.image
        i = message.i_image
        if not 0 <= i < run.n_images:
            self.counters.stray_messages += 1
            return
        f = run.file
        pulse_id = daq_rec = 0
        try:
            # Copy out of shared memory first (id checked before and after): the file write from a private
            # buffer is ~3x faster than straight from the shm mapping, and a lost image never reaches the file.
            self.images.copy_image(meta.id, self.buffer)
            if self.frames is not None and f.jungfrau:
                pulse_id, daq_rec = self._frame_fields(meta.id)
            f.write(i, self.buffer)
        except ImageLostError:
            f.record(i, meta.id, STATUS_LOST, meta.user_2)
            f.n_lost += 1
            self.counters.images_lost += 1
            return
        except OSError as exc:
            self._fail(run, f"I/O error writing image {i} to {run.output_file}: {exc}")
            return
        f.record(i, meta.id, meta.status, meta.user_2, pulse_id, daq_rec)
        f.n_written += 1
        f.written_since_flush += 1
        self.counters.images_written += 1
        self.counters.last_written_id = meta.id

    def _frame_fields(self, image_id: int) -> tuple[int, int]:
        try:
            frame = self.frames.read_frame_meta(image_id, 0)
        except ImageLostError:
            return 0, 0
        return frame.pulse_id, frame.daq_rec

    def _stop(self) -> None:
        run = self.run
        self._finish(run, "interrupted" if run.file.n_slots < run.n_images else "complete", None)

    def _fail(self, run: Run, error: str) -> None:
        log.error("run %d: %s", run.run_id, error)
        self._finish(run, "interrupted", error)

    def _finish(self, run: Run, state: str, error: str | None) -> None:
        if run.file is not None:
            try:
                run.file.close(state)
            except (OSError, RuntimeError, ValueError) as exc:
                error = error or f"closing {run.output_file} failed: {exc}"
                try:
                    run.file.file.close()
                except Exception:  # noqa: BLE001 - the file is beyond saving; the status says so
                    pass
        failed = error is not None
        run.error = error
        if self.run is run:
            self.run = None
            self.counters.writing = 0
        self.counters.files_failed += failed
        self.counters.files_finished += not failed
        self._send_status(run, WriterState.FAILED if failed else WriterState.FINISHED, error, file_state=state)
        log.info("run %d: %s %s (%d written, %d lost)%s", run.run_id, "failed" if failed else "finished",
                 run.output_file, run.file.n_written if run.file else 0, run.file.n_lost if run.file else 0,
                 f": {error}" if error else "")
        run.file = None

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
        if elapsed > 0 and n_written:
            details["images_per_s"] = round(n_written / elapsed, 1)
        self._push(WriterStatus(run.run_id, state, run.output_file, n_written, f.n_lost if f else 0, error, details))
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
        self._flush_statuses()
        run = self.run
        if run is None or run.file is None:
            return
        now = time.monotonic()
        if now - run.last_status >= self.settings.status_interval_s:
            self._send_status(run, WriterState.WRITING)
        if run.file.written_since_flush and now - run.last_flush >= self.settings.flush_interval_s:
            try:
                run.file.flush()
            except OSError as exc:
                self._fail(run, f"I/O error flushing {run.output_file}: {exc}")
                return
            run.last_flush = now

    # --- Service --------------------------------------------------------------------------------------

    def stop(self) -> None:
        self.poll(0)  # what is queued already (a stop, typically)
        if self.run is not None:
            self._finish(self.run, "interrupted", "std_h5_writer was stopped (SIGTERM) while writing")

    def close(self) -> None:
        self.pull.close()
        self.status.close()
        self.images.close()
        if self.frames is not None:
            self.frames.close()

    def stats(self) -> Mapping[str, int]:
        return self.counters.snapshot()
