"""std_stream_recv: a replica of the ImageBuffer on another server, fed by std_stream_send over ZMQ TCP.

PULL (bound on a configured interface) -> each image received straight into the slot of its id in this
server's ImageBuffer (ZMQ's one copy, no other), the slot marked invalid meanwhile -> once the sender's
verdict says the source slot still held the image after its bytes left, the slot is committed and its
ImageMetadata PUBlished on the same address std_assembler would use. So writer_agent and std_h5_writer on
the replica work unchanged.

Sequence numbers (user_1): this process publishes its own sequence, and advances it by as much as the
source's advanced. An image the replica does not publish (never arrived, torn at the source, malformed)
is therefore a gap downstream, exactly as if the consumer had missed it on the detector server
(DESIGN.md §4: every consumer can tell how many messages it missed). Each lost image is counted once, by
what happened to it: `sequence_gaps` (never arrived: dropped by the sender or missed by it),
`torn_images` (overwritten at the source while it was sent), `bad_messages` (not an image of this
detector), `unconfirmed_images` (its verdict never came: the sender restarted, or its slot was needed
again first). A source whose sequence goes backwards restarted: counted in `source_restarts`, and the
published sequence just goes on.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import struct
from typing import Mapping

import zmq

from core_buffer.config import DetectorConfig
from core_buffer.errors import ConfigError, FormatError
from core_buffer.formats import Dtype, Encoding, ImageMetadata, Verdict
from core_buffer.ipc import image_metadata_address, make_socket
from core_buffer.ringbuffer import ImageBuffer
from core_buffer.service import Counters

log = logging.getLogger("std_stream_recv")

PUB_HWM = 100000
ENCODINGS = frozenset(int(e) for e in Encoding)
VERDICT_FLAGS = frozenset((Verdict.INTACT, Verdict.TORN))


def keep_message_buffers() -> None:
    """Let glibc keep the memory of freed large ZMQ messages instead of returning it to the kernel.

    ZMQ's I/O thread allocates a fresh buffer for every image it receives and we free it after copying
    the image into its slot. With glibc's defaults a buffer of a MiB or more goes back to the kernel on
    free, so each image paid for faulting in fresh zeroed pages: 30 % of the I/O thread's time in
    the profile. Process-wide, so called by the daemon, not by the class."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum: below it, allocations come from the heap
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        log.info("not glibc: freed message buffers go back to the kernel")


class ReceiverSettings:
    """The "stream_recv" config section; `--bind` overrides it."""

    def __init__(self, config: DetectorConfig, bind: str | None = None) -> None:
        section = config.section("stream_recv")
        self.bind = bind or section.str("bind", None)
        self.queue_images = section.int("queue_images", 16, min=1, max=4096)
        section.finish()
        if self.bind is None or not self.bind.startswith("tcp://"):
            raise ConfigError("stream_recv.bind", self.bind, "the ZMQ TCP address to listen on, on a "
                              "configured interface (--bind tcp://10.0.0.2:9100)", config.source)


class StreamReceiver:
    name = "std_stream_recv"
    rate_counters = ("images", "bytes")

    def __init__(self, config: DetectorConfig, settings: ReceiverSettings, context: zmq.Context | None = None) -> None:
        self.config, self.settings = config, settings
        context = context or zmq.Context.instance()
        self.images = ImageBuffer.for_config(config)
        self.pull = make_socket(context, zmq.PULL, hwm=2 * settings.queue_images)  # an image, then its verdict
        self.pull.bind(settings.bind)
        self.pub = make_socket(context, zmq.PUB, hwm=PUB_HWM)
        self.pub.bind(image_metadata_address(config))
        # version, height, width, dtype of every image this replica accepts
        self.expected_header = (ImageMetadata.VERSION, *config.image_shape, Dtype.from_numpy(config.image_dtype))
        self.image_bytes = config.image_bytes  # a property that computes: not for every image
        self.sequence = 0  # the last sequence number given out (published, or skipped for a lost image)
        self.last_source_sequence: int | None = None
        # Images received into their slot and waiting for their verdict, by slot: (id, the ImageMetadata to
        # commit and publish, encoded, bytes).
        self.unconfirmed: dict[int, tuple[int, bytes, int]] = {}
        self.counters = Counters("images", "bytes", "sequence_gaps", "torn_images", "bad_messages",
                                 "unconfirmed_images", "source_restarts", "last_image_id", "sequence")
        log.info("replica of %s %s images: from %s into %s", config.image_dtype, config.image_shape,
                 settings.bind, image_metadata_address(config))

    def poll(self, timeout_s: float) -> None:
        if not self.pull.poll(timeout_s * 1000):
            return
        for _ in range(1000):
            try:
                head = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            more = self.pull.getsockopt(zmq.RCVMORE)
            if not more and len(head) % Verdict.SIZE == 0:  # never an image: a header is 56 B, then more
                self._on_verdicts(head)
            else:
                self._on_image(head, more)

    def _drop(self, why: str) -> None:
        self.counters.bad_messages += 1
        if self.counters.bad_messages in (1, 10, 100) or self.counters.bad_messages % 10000 == 0:
            log.warning("dropped a bad message (%d so far): %s", self.counters.bad_messages, why)
        while self.pull.getsockopt(zmq.RCVMORE):
            self.pull.recv()

    def _next_sequence(self, source_sequence: int) -> int:
        """Our sequence number for the image with the source's `source_sequence`: ours advances as the
        source's did, so what never arrived is a gap downstream too (and counted here, once)."""
        c = self.counters
        last, step = self.last_source_sequence, 1
        if last is not None and source_sequence > last:
            step = source_sequence - last
            c.sequence_gaps += step - 1
        elif last is not None:
            c.source_restarts += 1  # the source restarted its sequence: what it lost is unknowable
        self.last_source_sequence = source_sequence
        self.sequence += step
        c.sequence = self.sequence
        return self.sequence

    def _on_image(self, head: bytes, more: int) -> None:
        # The header straight from the struct, compared with what this replica holds: ImageMetadata.decode
        # (with its checks and error messages) runs only for what fails that comparison.
        try:
            (version, image_id, height, width, dtype, encoding, source_id, status, source_sequence,
             user_2) = ImageMetadata.STRUCT.unpack(head)
        except struct.error:
            self._drop(f"a message of {len(head)} bytes is neither an image header nor a verdict")
            return
        if (version, height, width, dtype) != self.expected_header or encoding not in ENCODINGS:
            self._on_foreign_image(head, more)
            return
        # From here on the message has the source's sequence number: it is accounted for by the sequence
        # whatever becomes of it, and counted below only under why it was lost.
        sequence = self._next_sequence(source_sequence)
        if not more:
            self._drop(f"image {image_id}: metadata without image bytes")
            return
        expected = user_2 if encoding == Encoding.BITSHUFFLE_LZ4 else self.image_bytes
        slot = self.images.slot_of(image_id)
        if slot in self.unconfirmed:
            del self.unconfirmed[slot]  # its verdict never came, and now its slot is needed
            self.counters.unconfirmed_images += 1
        data = self.images.begin_image(image_id)
        n = self.pull.recv_into(data)
        if n != expected or n > data.nbytes or self.pull.getsockopt(zmq.RCVMORE):
            self._drop(f"image {image_id}: {n} bytes, expected {expected}")
            return  # the slot stays marked invalid: nobody reads it as image image_id
        self.unconfirmed[slot] = (image_id, ImageMetadata.STRUCT.pack(version, image_id, height, width, dtype, encoding,
                                                                      source_id, status, sequence, user_2), n)

    def _on_foreign_image(self, head: bytes, more: int) -> None:
        """A message that is not an image header of this replica's shape and type: dropped and counted
        (still with its sequence number accounted for, if it has one)."""
        try:
            meta = ImageMetadata.decode(head)
        except FormatError as exc:
            self._drop(str(exc))
            return
        self._next_sequence(meta.user_1)
        self._drop(f"image {meta.id} is {meta.numpy_dtype} {meta.shape}; this replica holds "
                   f"{self.config.image_dtype} {self.config.image_shape}")

    def _on_verdicts(self, message: bytes) -> None:
        # Straight from the struct; Verdict.decode_many (dataclasses, error messages) only for a bad message.
        verdicts = list(Verdict.STRUCT.iter_unpack(message))
        if any(flag not in VERDICT_FLAGS for _, flag in verdicts):
            try:
                Verdict.decode_many(message)
            except FormatError as exc:
                self._drop(str(exc))
            return
        for image_id, flag in verdicts:
            self._on_verdict(image_id, flag == Verdict.INTACT)

    def _on_verdict(self, image_id: int, intact: bool) -> None:
        slot = self.images.slot_of(image_id)
        waiting = self.unconfirmed.get(slot)
        if waiting is None or waiting[0] != image_id:
            return  # an image we never got (dropped on the way, or bad): counted as such
        del self.unconfirmed[slot]
        _, encoded, n = waiting
        c = self.counters
        if not intact:
            c.torn_images += 1  # the source slot was overwritten while being sent: its slot stays invalid
            return
        self.images.commit_encoded(encoded)
        self.pub.send(encoded)
        c.images += 1
        c.bytes += n
        c.last_image_id = image_id

    def stop(self) -> None:
        pass

    def close(self) -> None:
        self.counters.unconfirmed_images += len(self.unconfirmed)
        self.unconfirmed.clear()
        self.pull.close()
        self.pub.close()
        self.images.close()

    def stats(self) -> Mapping[str, int]:
        return self.counters.snapshot()
