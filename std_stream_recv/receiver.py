"""std_stream_recv: a replica of the ImageBuffer on another server, fed by std_stream_send over ZMQ TCP.

PULL (bound on a configured interface) -> each image received straight into the slot of its id in this
server's ImageBuffer (ZMQ's one copy, no other) -> its ImageMetadata PUBlished on the same address
std_assembler would use, with this process's own consecutive sequence in user_1. So writer_agent and
std_h5_writer on the replica work unchanged. The source's sequence numbers that never arrived (dropped by
a slow link, or missed by the sender) are counted as `sequence_gaps`.

A message that is not an image of this detector's shape and type is counted and dropped.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Mapping

import numpy as np
import zmq

from core_buffer.config import DetectorConfig
from core_buffer.errors import ConfigError, FormatError
from core_buffer.formats import Dtype, Encoding, ImageMetadata
from core_buffer.ipc import image_metadata_address, make_socket
from core_buffer.ringbuffer import ImageBuffer
from core_buffer.service import Counters

log = logging.getLogger("std_stream_recv")

PUB_HWM = 100000
IMAGE_OK, IMAGE_TORN = b"\x01", b"\x00"  # last frame of a message from std_stream_send


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
        self.pull = make_socket(context, zmq.PULL, hwm=settings.queue_images)
        self.pull.bind(settings.bind)
        self.pub = make_socket(context, zmq.PUB, hwm=PUB_HWM)
        self.pub.bind(image_metadata_address(config))
        self.dtype_code = Dtype.from_numpy(config.image_dtype)
        self.sequence = 0
        self.last_source_sequence: int | None = None
        self.counters = Counters("images", "bytes", "sequence_gaps", "bad_messages", "source_restarts", "torn_images",
                                 "last_image_id", "sequence")
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
            self._on_message(head)

    def _drop(self, why: str) -> None:
        self.counters.bad_messages += 1
        if self.counters.bad_messages in (1, 10, 100) or self.counters.bad_messages % 10000 == 0:
            log.warning("dropped a bad message (%d so far): %s", self.counters.bad_messages, why)
        while self.pull.getsockopt(zmq.RCVMORE):
            self.pull.recv()

    def _on_message(self, head: bytes) -> None:
        try:
            meta = ImageMetadata.decode(head)
        except FormatError as exc:
            self._drop(str(exc))
            return
        if not self.pull.getsockopt(zmq.RCVMORE):
            self._drop(f"image {meta.id}: metadata without image bytes")
            return
        if meta.shape != self.config.image_shape or meta.dtype != self.dtype_code:
            self._drop(f"image {meta.id} is {meta.numpy_dtype} {meta.shape}; this replica holds "
                       f"{self.config.image_dtype} {self.config.image_shape}")
            return
        expected = meta.user_2 if meta.encoding == Encoding.BITSHUFFLE_LZ4 else meta.nbytes
        slot = self.images.begin_image(meta.id)
        n = self.pull.recv_into(slot)
        if n != expected or n > slot.nbytes or not self.pull.getsockopt(zmq.RCVMORE):
            self._drop(f"image {meta.id}: {n} bytes, expected {expected}")
            return  # the slot stays marked invalid: nobody reads it as image meta.id
        check = self.pull.recv()
        if check != IMAGE_OK or self.pull.getsockopt(zmq.RCVMORE):
            if check == IMAGE_TORN:
                self.counters.torn_images += 1  # the source slot was overwritten while being sent
                return
            self._drop(f"image {meta.id}: bad last frame {check[:8]!r}")
            return
        c = self.counters
        last = self.last_source_sequence
        if last is not None and meta.user_1 > last + 1:
            c.sequence_gaps += meta.user_1 - last - 1
        elif last is not None and meta.user_1 <= last:
            c.source_restarts += 1  # the source restarted its sequence
        self.last_source_sequence = meta.user_1
        self.sequence += 1
        published = dataclasses.replace(meta, user_1=self.sequence)
        self.images.commit_image(published)
        self.pub.send(published.encode())
        c.images += 1
        c.bytes += n
        c.last_image_id = meta.id
        c.sequence = self.sequence

    def stop(self) -> None:
        pass

    def close(self) -> None:
        self.pull.close()
        self.pub.close()
        self.images.close()

    def stats(self) -> Mapping[str, int]:
        return self.counters.snapshot()
