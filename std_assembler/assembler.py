"""std_assembler: module frames from the FrameBuffer -> images in the ImageBuffer + ImageMetadata stream.

PULLs the ModuleFrame stream of every module, lets the Synchronizer decide which images are ready, and
for each: places (Jungfrau raw, Eiger, Gigafrost) or converts (Jungfrau converted) every module's frame
into the image's ImageBuffer slot, zeroes the area of missing modules, applies background and flat-field
corrections, commits the metadata and PUBlishes it with the sequence number in user_1.

A frame is read only if its FrameBuffer slot holds the very frame the message announced: the same id and
the same write generation (ModuleFrame.generation), checked before and after reading, so a frame of the
same id from a later acquisition is never taken for it (docs/std_assembler.md).

Status, the most serious first: 3 missing module (including a frame overwritten in the FrameBuffer
before it could be read), 2 modules disagree on frame index or pulse id, 1 lost packets, 0 good.
With `assembler.drop_incomplete`, images with missing modules (also a frame found overwritten while
assembling) are counted and not published.
A missing module's area is zero in the published image, also after background/flat-field corrections,
and so are gap pixels (docs/std_assembler.md). An image whose assembly raises is counted
(`images_failed`), logged, and not published; the images after it are assembled as usual.
"""
from __future__ import annotations

import logging
import time
from typing import Mapping

import numpy as np
import zmq

from core_buffer.config import DetectorConfig
from core_buffer.errors import FormatError
from core_buffer.formats import Dtype, ImageMetadata, ImageStatus, ModuleFrame
from core_buffer.ipc import image_metadata_address, make_socket, module_frames_address
from core_buffer.ringbuffer import FrameBuffer, ImageBuffer
from core_buffer.service import Counters
from std_assembler.convert import Corrections, JungfrauConverter
from std_assembler.geometry import Placer
from std_assembler.sync import ReadyImage, Synchronizer

log = logging.getLogger("std_assembler")

PULL_HWM = 100000
PUB_HWM = 10000
READ_ROUND = 16  # frames taken from one module's stream before the next module's turn
DRAIN_PER_SOCKET = 256  # at most this many per module and poll; then the timeouts are looked at


class AssemblerSettings:
    """The "assembler" config section."""

    def __init__(self, config: DetectorConfig) -> None:
        section = config.section("assembler")
        self.sync_timeout_s = section.float("sync_timeout_s", 0.5, min=0.001, max=600.0)
        self.drop_incomplete = section.bool("drop_incomplete", False)
        self.max_pending = section.int("max_pending", config.frame_buffer_slots, min=1)
        self.conversion_threads = section.int("conversion_threads", 1, min=1, max=64)
        section.finish()


class Assembler:
    name = "std_assembler"
    rate_counters = ("images", "frames")

    def __init__(self, config: DetectorConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.settings = AssemblerSettings(config)
        self.placer = Placer(config, self.settings.conversion_threads)
        self.converter = None
        if config.detector_type == "jungfrau" and config.conversion == "converted":
            self.converter = JungfrauConverter(config, self.settings.conversion_threads)
            log.info("Jungfrau conversion from %s (%s path)", config.calibration_file, self.converter.path)
        self.corrections = Corrections(config)
        self.dtype = config.image_dtype
        self.dtype_code = int(Dtype.from_numpy(self.dtype))
        self.shape = config.image_shape
        self.image_bytes = config.image_bytes
        self.n_modules = config.n_modules
        self._frame_cache: dict[int, tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = {}
        self._image_cache: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
        self._stack_cache: dict[int, np.ndarray] = {}
        self._stacked_conversion = self.converter is not None and self.placer.stacked
        self._whole_slots = self._stacked_conversion or (self.placer.places_whole_slots and
                                                         np.dtype(self.dtype) in (np.uint16, np.float32))
        self.frames = FrameBuffer.for_config(config)
        self.images = ImageBuffer.for_config(config)
        if not self.images.created:  # a fresh segment is all zero
            self._clear_stale_gaps()
        if self.corrections.active:
            self.corrections.keep_gaps_zero(self.placer.coverage())
        self.sync = Synchronizer(config.n_modules, self.settings.sync_timeout_s, self.settings.max_pending,
                                 restart_jump=config.frame_buffer_slots)
        self.counters = Counters("frames", "images", "images_good", "images_missing_packets", "images_mismatch",
                                 "images_missing_module", "images_dropped", "images_failed", "frames_overwritten",
                                 "late_frames", "module_restarts", "detector_restarts", "restarts_not_followed",
                                 "forward_jumps", "id_gaps", "skipped_ids", "nan_pixels", "bad_messages",
                                 "last_image_id", "sequence")
        self.context = context or zmq.Context.instance()
        self.pulls = []
        self.module_of: dict[zmq.Socket, int] = {}
        self.poller = zmq.Poller()
        for m in range(config.n_modules):
            pull = make_socket(self.context, zmq.PULL, hwm=PULL_HWM)
            pull.connect(module_frames_address(config, m))
            self.poller.register(pull, zmq.POLLIN)
            self.pulls.append(pull)
            self.module_of[pull] = m
        self._warm_up()
        self.pub = make_socket(self.context, zmq.PUB, hwm=PUB_HWM)
        self.pub.bind(image_metadata_address(config))
        self.sequence = 0
        log.info("assembling %d modules of %s into %s images %s, metadata on %s", config.n_modules,
                 config.detector_type, self.dtype, self.shape, image_metadata_address(config))

    def _clear_stale_gaps(self) -> None:
        """Gap pixels are never written, so they are zero only in a fresh segment. An attached segment may
        hold images of an earlier run with other module positions (the same byte size passes the layout
        check): a slot with anything but zero in this geometry's gaps holds no image of ours. Its gaps
        are zeroed and it is marked invalid, so no reader takes it for an image of this geometry. A
        restart with the same geometry finds zero gaps and changes nothing: the images in the ring stay
        readable. Cost: reading the gap pixels of every slot once (docs/std_assembler.md)."""
        gaps = np.flatnonzero(~self.placer.coverage())
        if gaps.size == 0:  # the default Jungfrau stack, Gigafrost: no gaps
            return
        stale = 0
        for slot in range(self.images.layout.n_slots):
            pixels = self.images.slot_data(slot)[:self.image_bytes].view(self.dtype)
            if pixels[gaps].any():  # (a copy of the gap pixels only)
                self.images.begin_image(slot)  # slot < n_slots: marks this very slot invalid
                pixels[gaps] = 0
                stale += 1
        if stale:
            log.warning("%d ImageBuffer slots held pixels in this geometry's gaps (images of another "
                        "geometry?): zeroed and marked invalid", stale)

    def _warm_up(self) -> None:
        """Compile (or load from numba's cache) the kernels for exactly the array layouts the images will
        use, now rather than on the first image (a first compile takes seconds)."""
        scratch = np.zeros(self.shape, self.dtype)
        stream = self.config.stream
        frame = self.placer.frame_pixels(np.zeros(stream.frame_bytes, np.uint8))
        if self._whole_slots and self.converter is None:
            self.placer.place_slot(scratch, np.zeros(self.n_modules * stream.frame_bytes, np.uint8))
        if self._stacked_conversion:
            self.converter.convert_stack(np.zeros((self.n_modules * stream.frame_height, stream.frame_width),
                                                  stream.pixel_dtype), scratch)
        for m in range(self.n_modules):
            if self.converter is not None:
                self.converter.convert(m, frame, self.placer.target(scratch, m))
            elif m == 0:
                self.placer.place(scratch, m, frame)

    # --- the hot path -------------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> None:
        events = self.poller.poll(timeout_s * 1000 if not self.sync.waiting else min(timeout_s, 0.01) * 1000)
        # Round robin, READ_ROUND frames per module and round: with a backlog queued, reading one module's
        # stream to the end first would leave its images waiting for the others in hundreds and push the
        # oldest out incomplete although every module delivered them. The limits on waiting images apply
        # only between rounds, when every module has had its turn.
        readable = [sock for sock, _ in events]
        for _ in range(DRAIN_PER_SOCKET // READ_ROUND):
            now = time.monotonic()  # per round: assembling a round's images can take a while
            more = []
            for sock in readable:
                for _ in range(READ_ROUND):
                    try:
                        message = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(sock, message, now)
                else:
                    more.append(sock)  # may hold more
            self._assemble_all(self.sync.release_overdue())
            if not more:
                break
            readable = more
        self._assemble_all(self.sync.expire(time.monotonic()))
        self._copy_sync_counters()

    def _copy_sync_counters(self) -> None:
        c, sync = self.counters, self.sync
        c.late_frames, c.module_restarts, c.detector_restarts = sync.late_frames, sync.module_restarts, \
            sync.detector_restarts
        c.restarts_not_followed, c.forward_jumps = sync.restarts_not_followed, sync.forward_jumps
        c.id_gaps, c.skipped_ids = sync.id_gaps, sync.skipped_ids

    def _on_message(self, sock: zmq.Socket, message: bytes, now: float) -> None:
        try:
            frame = ModuleFrame.decode(message)
        except FormatError:
            self.counters.bad_messages += 1
            return
        if frame.module_id != self.module_of[sock]:
            self.counters.bad_messages += 1
            return
        self.counters.frames += 1
        ready = self.sync.add(frame, now)
        if ready:
            self._assemble_all(ready)

    def _assemble_all(self, ready: list[ReadyImage]) -> None:
        """Assemble each image on its own: one that fails is counted and logged, the rest go on."""
        if not ready:
            return
        c = self.counters
        for image in ready:
            try:
                self._assemble(image)
            except Exception:  # noqa: BLE001 - one bad image must not lose the others of its batch
                c.images_failed += 1
                if c.images_failed == 1 or c.images_failed % 1000 == 0:
                    log.exception("image %d (%s, missing modules %s) could not be assembled (%d so far); "
                                  "it is not published", image.image_id, image.reason, image.missing,
                                  c.images_failed)

    def _assemble(self, ready: ReadyImage) -> None:
        c = self.counters
        image_id = ready.image_id
        missing = list(ready.missing)
        if missing and self.settings.drop_incomplete:
            c.images_dropped += 1
            return
        self.images.begin_image(image_id)  # marks the slot invalid until commit_image
        image, targets = self._image_views(self.images.slot_of(image_id))
        slot = self.frames.slot_of(image_id)
        frame_ids, frame_generations, frame_pixels = self._frame_views(slot)
        placer, converter = self.placer, self.converter
        lost_packets = False
        frames = ready.frames

        def holds(m: int) -> bool:  # the slot holds module m's very frame (the id read first, then the generation)
            return frame_ids[m] == image_id and frame_generations[m] == frames[m].generation

        whole = self._whole_slots and not missing and all(holds(m) for m in range(self.n_modules))
        if whole:  # every frame is there: one compiled call for the whole image
            if converter is not None:  # the image is the plain stack of the frames
                c.nan_pixels += converter.convert_stack(self._frame_stack(slot), image)
            else:
                placer.place_slot(image, self.frames.slot_data(slot))
        for m in range(self.n_modules):
            frame = ready.frames.get(m)
            if frame is None:
                placer.zero(image, m)
                continue
            if not whole:
                if not holds(m):  # overwritten in the FrameBuffer before we got to it
                    c.frames_overwritten += 1
                    missing.append(m)
                    placer.zero(image, m)
                    continue
                if converter is not None:
                    c.nan_pixels += converter.convert(m, frame_pixels[m], targets[m])
                else:
                    placer.place(image, m, frame_pixels[m])
            if not holds(m):  # overwritten while we read it
                c.frames_overwritten += 1
                missing.append(m)
                placer.zero(image, m)
                continue
            lost_packets |= frame.n_recv_packets < frame.n_packets
        if missing and self.settings.drop_incomplete:  # a frame turned out overwritten: incomplete after all
            c.images_dropped += 1  # not published, no sequence number; the slot stays marked invalid
            return
        present = [f for m, f in ready.frames.items() if m not in missing]
        mismatch = len({(f.frame_index, f.pulse_id) for f in present}) > 1
        if missing:
            status = ImageStatus.MISSING_MODULE
            c.images_missing_module += 1
        elif mismatch:
            status = ImageStatus.ID_MISMATCH
            c.images_mismatch += 1
        elif lost_packets:
            status = ImageStatus.MISSING_PACKETS
            c.images_missing_packets += 1
        else:
            status = ImageStatus.GOOD
            c.images_good += 1
        if self.corrections.active:
            self.corrections.apply(image)
            for m in set(missing):  # corrections turned their zeros into -background / flat-field
                placer.zero(image, m)
        frame_index = present[0].frame_index if present else 0
        meta = ImageMetadata(image_id, self.shape[0], self.shape[1], self.dtype_code, status=int(status),
                             user_1=self.sequence, user_2=frame_index)
        self.images.commit_image(meta)
        try:
            self.pub.send(meta.encode(), zmq.NOBLOCK)
        except zmq.Again:  # PUB drops by itself; kept for clarity
            pass
        self.sequence += 1
        c.images += 1
        c.sequence = self.sequence
        c.last_image_id = image_id

    # Views on the shared memory, made once per slot: building numpy views costs microseconds per module,
    # as much as placing a small frame.

    def _frame_views(self, slot: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(the module frames' ids and generations, live; each module's frame as pixels) of a FrameBuffer
        slot."""
        views = self._frame_cache.get(slot)
        if views is None:
            frames, placer = self.frames, self.placer
            pixels = [placer.frame_pixels(frames.module_data(slot, m)) for m in range(self.n_modules)]
            metas = frames.metas(slot)
            views = self._frame_cache[slot] = (metas["id"], metas["generation"], pixels)
        return views

    def _frame_stack(self, slot: int) -> np.ndarray:
        """The frames of a FrameBuffer slot as one raw stack (n_modules * rows x cols pixels), zero-copy."""
        stack = self._stack_cache.get(slot)
        if stack is None:
            stream = self.config.stream
            rows = self.n_modules * stream.frame_height
            stack = self.frames.slot_data(slot)[:self.n_modules * stream.frame_bytes].view(stream.pixel_dtype)
            stack = self._stack_cache[slot] = stack.reshape(rows, stream.frame_width)
        return stack

    def _image_views(self, slot: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(the typed image, each module's target view in it) of an ImageBuffer slot."""
        views = self._image_cache.get(slot)
        if views is None:
            image = self.images.slot_data(slot)[:self.image_bytes].view(self.dtype).reshape(self.shape)
            targets = [self.placer.target(image, m) for m in range(self.n_modules)] if self.converter else []
            views = self._image_cache[slot] = (image, targets)
        return views

    # --- Service --------------------------------------------------------------------------------------

    def stop(self) -> None:
        # Frames already queued were finished by the receivers: take them, then release what waits.
        self.poll(0)
        self._assemble_all(self.sync.expire(float("inf")))
        self._copy_sync_counters()

    def close(self) -> None:
        self._frame_cache.clear()  # our views of the buffers go before the buffers
        self._image_cache.clear()
        self._stack_cache.clear()
        for pull in self.pulls:
            pull.close()
        self.pub.close(linger=0)
        self.frames.close()
        self.images.close()

    def stats(self) -> Mapping[str, int]:
        return self.counters.snapshot()
