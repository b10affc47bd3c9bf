"""std_stream_send: images from the ImageBuffer to a replica over ZMQ TCP, and a rate-reduced live preview.

Replica stream (PUSH, connected to std_stream_recv's bound PULL): per image three frames: the
ImageMetadata as the source published it (its user_1 is the source's sequence, so the replica counts
what it never got), the image bytes, copied by ZMQ straight out of the ring-buffer slot, and one byte
saying whether the slot still held that image after the copy. When the socket's high-water mark
(`queue_images`) is reached (a slow or absent replica), the image is dropped and counted: the sender
never waits, so it can never hold back the assembler.

Live preview (PUB, bound): an "array-1.0" JSON header and the raw image, for at most `live_rate_hz`
images per second or every `live_every`-th image. The socket keeps at most one message per viewer, so a
viewer that joins late gets the next image and a slow one never sees an old queue.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Mapping

import numpy as np
import zmq

from core_buffer.config import DetectorConfig
from core_buffer.errors import ConfigError, FormatError, ImageLostError
from core_buffer.formats import Encoding, ImageMetadata, ImageStatus
from core_buffer.ipc import image_metadata_address, make_socket
from core_buffer.ringbuffer import ImageBuffer
from core_buffer.service import Counters

log = logging.getLogger("std_stream_send")

SUB_HWM = 100000
LIVE_HWM = 2
IMAGE_OK, IMAGE_TORN = b"\x01", b"\x00"  # last frame of a replica message  # header + image of one preview image


class SenderSettings:
    """The "stream_send" config section; command-line options override it."""

    def __init__(self, config: DetectorConfig, to: str | None = None, live: str | None = None,
                 live_rate_hz: float | None = None, live_every: int | None = None) -> None:
        section = config.section("stream_send")
        self.to = to or section.str("to", None)
        self.live = live or section.str("live", None)
        self.queue_images = section.int("queue_images", 16, min=1, max=4096)
        rate = section.float("live_rate_hz", 10.0, min=0.0)
        every = section.int("live_every", 0, min=0)
        section.finish()
        self.live_rate_hz = rate if live_rate_hz is None else live_rate_hz
        self.live_every = every if live_every is None else live_every
        for key, address in (("stream_send.to", self.to), ("stream_send.live", self.live)):
            if address is not None and not address.startswith("tcp://"):
                raise ConfigError(key, address, "a ZMQ TCP address such as tcp://10.0.0.2:9100", config.source)
        if self.to is None and self.live is None:
            raise ConfigError("stream_send.to", None, "a replica address (--to tcp://HOST:PORT) and/or a live "
                              "preview address (--live tcp://IFACE:PORT)", config.source)


def live_header(meta: ImageMetadata, frame: int, detector_name: str) -> bytes:
    """The array-1.0 header of one preview image."""
    return json.dumps({
        "htype": "array-1.0",
        "shape": [meta.height, meta.width],
        "type": meta.numpy_dtype.name,
        "frame": frame,
        "image_id": meta.id,
        "is_good_frame": meta.status == ImageStatus.GOOD,
        "status": meta.status,
        "detector_name": detector_name,
    }).encode()


class StreamSender:
    name = "std_stream_send"
    rate_counters = ("images_sent", "bytes_sent")

    def __init__(self, config: DetectorConfig, settings: SenderSettings, context: zmq.Context | None = None) -> None:
        self.config, self.settings = config, settings
        context = context or zmq.Context.instance()
        self.images = ImageBuffer.for_config(config)
        self.sub = make_socket(context, zmq.SUB, hwm=SUB_HWM)
        self.sub.connect(image_metadata_address(config))
        self.data: zmq.Socket | None = None
        if settings.to:
            self.data = make_socket(context, zmq.PUSH, hwm=settings.queue_images, linger_ms=1000)
            self.data.connect(settings.to)
        self.live: zmq.Socket | None = None
        self.live_buffer = np.empty(config.image_bytes, np.uint8)
        if settings.live:
            self.live = make_socket(context, zmq.PUB, hwm=LIVE_HWM)
            # Small kernel buffers too: what waits for a slow viewer is a couple of images, not seconds.
            self.live.setsockopt(zmq.SNDBUF, 2 * config.image_bytes)
            self.live.bind(settings.live)
        self.last_live = 0.0
        self.last_sequence: int | None = None
        self.counters = Counters("images", "images_sent", "bytes_sent", "images_dropped", "images_lost",
                                 "images_missed", "live_images", "bad_messages")
        log.info("images from %s to %s (%d send buffers), live preview %s", image_metadata_address(config),
                 settings.to or "-", settings.queue_images,
                 f"on {settings.live}" if settings.live else "off")

    def poll(self, timeout_s: float) -> None:
        if not self.sub.poll(timeout_s * 1000):
            return
        for _ in range(1000):
            try:
                data = self.sub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                meta = ImageMetadata.decode(data.buffer)
            except FormatError:
                self.counters.bad_messages += 1
                continue
            self._on_image(meta)

    def _on_image(self, meta: ImageMetadata) -> None:
        c = self.counters
        c.images += 1
        if self.last_sequence is not None and meta.user_1 > self.last_sequence + 1:
            c.images_missed += meta.user_1 - self.last_sequence - 1  # our subscription overflowed
        self.last_sequence = meta.user_1
        n = meta.user_2 if meta.encoding == Encoding.BITSHUFFLE_LZ4 else meta.nbytes
        if n > self.config.image_bytes:
            c.bad_messages += 1
            return
        if self.data is not None:
            self._send_replica(meta, n)
        if self.live is not None and self._live_due(meta):
            self._send_live(meta, n)

    def _send_replica(self, meta: ImageMetadata, n: int) -> None:
        # ZMQ copies the image out of the slot while queueing the message; the slot's id is checked
        # before and after that copy, and the last frame says whether the copy is good. A multipart
        # message leaves only once its last frame is queued, so a torn image is marked before it goes.
        try:
            self.images.read_meta(meta.id)
            self.data.send(meta.encode(), zmq.NOBLOCK | zmq.SNDMORE)
        except ImageLostError:
            self.counters.images_lost += 1
            return
        except zmq.Again:
            self.counters.images_dropped += 1  # high-water mark reached (a slow replica), or none connected
            return
        self.data.send(self.images.raw_bytes(meta.id, n), zmq.SNDMORE, copy=True)
        if self.images.still_holds(meta.id):
            self.data.send(IMAGE_OK)
            self.counters.images_sent += 1
            self.counters.bytes_sent += n
        else:
            self.data.send(IMAGE_TORN)
            self.counters.images_lost += 1

    def _live_due(self, meta: ImageMetadata) -> bool:
        if self.settings.live_every:
            return meta.user_1 % self.settings.live_every == 0
        if self.settings.live_rate_hz <= 0:
            return True
        now = time.monotonic()
        if now - self.last_live < 1.0 / self.settings.live_rate_hz:
            return False
        self.last_live = now
        return True

    def _send_live(self, meta: ImageMetadata, n: int) -> None:
        buf = self.live_buffer[:n]
        try:
            self.images.copy_image(meta.id, buf)
        except ImageLostError:
            self.counters.images_lost += 1
            return
        header = live_header(meta, self.counters.live_images, self.config.detector_name)
        try:
            self.live.send_multipart([header, buf], zmq.NOBLOCK)
        except zmq.Again:
            return
        self.counters.live_images += 1

    def stop(self) -> None:
        pass  # what is queued gets the socket's linger time to reach the replica

    def close(self) -> None:
        self.sub.close()
        if self.data is not None:
            self.data.close()
        if self.live is not None:
            self.live.close()
        self.images.close()

    def stats(self) -> Mapping[str, int]:
        return self.counters.snapshot()
