"""A test stand-in for std_assembler: images with the simulator's pattern into a real ImageBuffer, and
their ImageMetadata on the real PUB address, with consecutive sequence numbers (or gaps on request)."""
from __future__ import annotations

import threading
import time

import numpy as np
import zmq

from core_buffer.config import DetectorConfig
from core_buffer.formats import ImageMetadata
from core_buffer.ipc import image_metadata_address, make_socket
from core_buffer.pattern import frame_pattern
from core_buffer.ringbuffer import ImageBuffer


def expected_image(config: DetectorConfig, image_id: int) -> np.ndarray:
    """What the producer puts in the buffer for `image_id` (modules stacked, as a raw Jungfrau)."""
    return np.vstack([frame_pattern(config.stream, m, image_id) for m in range(config.n_modules)])


class ImageProducer:
    def __init__(self, config: DetectorConfig, *, skip_sequence_every: int = 0) -> None:
        self.config = config
        self.images = ImageBuffer.for_config(config)
        self.pub = make_socket(zmq.Context.instance(), zmq.PUB, hwm=100000)
        self.pub.bind(image_metadata_address(config))
        self.next_id = 1
        self.sequence = 0
        self.skip_sequence_every = skip_sequence_every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def publish(self) -> int:
        with self._lock:
            image_id = self.next_id
            self.next_id += 1
            pixels = expected_image(self.config, image_id)
            self.images.begin_image(image_id)[:pixels.nbytes] = pixels.reshape(-1).view(np.uint8)
            self.sequence += 1
            if self.skip_sequence_every and image_id % self.skip_sequence_every == 0:
                self.sequence += 1  # as if the consumer had missed one message
            meta = ImageMetadata(image_id, *self.config.image_shape, user_1=self.sequence, user_2=image_id)
            self.images.commit_image(meta)
            self.pub.send(meta.encode())
            return image_id

    def start(self, rate_hz: float) -> None:
        def loop() -> None:
            period = 1.0 / rate_hz
            next_at = time.monotonic()
            while not self._stop.is_set():
                self.publish()
                next_at += period
                self._stop.wait(max(0.0, next_at - time.monotonic()))

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.pub.close()
        self.images.close()
