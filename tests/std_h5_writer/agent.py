"""The test's side of std_h5_writer's contracts (tests/std_h5_writer): an Agent that plays writer_agent and
the image producer, and a run of images written through it."""
from __future__ import annotations

import json
import time

import numpy as np
import zmq

from core_buffer.formats import ImageMetadata, StoreOp, StoreStream, WriterState, WriterStatus
from core_buffer.ipc import ipc_file, make_socket, remove_socket_file, store_stream_address, writer_status_address
from core_buffer.pattern import frame_pattern
from core_buffer.ringbuffer import ImageBuffer


class Agent:
    """The test's side of the StoreStream contract, plus an image producer."""

    def __init__(self, config):
        self.config = config
        ctx = zmq.Context.instance()
        self.push = make_socket(ctx, zmq.PUSH, hwm=10000)
        self.push.bind(store_stream_address(config))
        self.status = make_socket(ctx, zmq.PULL, hwm=10000)
        self.status.connect(writer_status_address(config))
        self.images = ImageBuffer.for_config(config)
        self.stream = config.stream

    def produce(self, image_id, status=0, **meta_fields):
        pixels = np.vstack([frame_pattern(self.stream, m, image_id) for m in range(self.config.n_modules)])
        self.images.begin_image(image_id)[:pixels.nbytes] = pixels.reshape(-1).view(np.uint8)
        h, w = self.config.image_shape
        meta = ImageMetadata(**{"id": image_id, "height": h, "width": w, "status": status, "user_2": image_id,
                                **meta_fields})
        self.images.commit_image(meta)
        return meta, pixels

    def produce_bytes(self, image_id, data, **meta_fields):
        """A slot holding `data` as it is (compressed bytes, say)."""
        self.images.begin_image(image_id)[:len(data)] = np.frombuffer(data, np.uint8)
        h, w = self.config.image_shape
        meta = ImageMetadata(**{"id": image_id, "height": h, "width": w, **meta_fields})
        self.images.commit_image(meta)
        return meta

    def start(self, output_file, n_images, run_id=1, user_id=0, extra=None):
        request = {"output_file": str(output_file), "n_images": n_images, "run_id": run_id, "request_id": "r-1",
                   **(extra or {})}
        self.push.send_multipart([StoreStream(StoreOp.START, 0, n_images, user_id, run_id).encode(),
                                  json.dumps(request).encode()])

    def write(self, i, meta, n_images, run_id=1):
        self.push.send(StoreStream(StoreOp.WRITE, i, n_images, 0, run_id, meta).encode())

    def stop(self, n, n_images, run_id=1):
        self.push.send(StoreStream(StoreOp.STOP, n, n_images, 0, run_id).encode())

    def wait(self, states=(WriterState.FINISHED, WriterState.FAILED), timeout_s=10.0, run_id=None):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.status.poll(100):
                status = WriterStatus.decode(self.status.recv())
                if status.state in states and (run_id is None or status.run_id == run_id):
                    return status
        raise AssertionError(f"no writer status in {states}")

    def close(self):
        """The sockets, and the ImageBuffer it made (the test is its creator: services never unlink); once
        the writers are stopped, the socket files: the StoreStream's, bound here, and the status stream's,
        bound by an in-process writer (a writer process removes its own)."""
        self.push.close()
        self.status.close()
        self.images.close()
        self.images.unlink()
        for suffix in ("writer_agent", "writer_status"):
            remove_socket_file(ipc_file(self.config, suffix))


def write_run(agent, path, ids, run_id=1):
    agent.start(path, len(ids), run_id)
    assert agent.wait((WriterState.WRITING,)).run_id == run_id
    expected = []
    for i, image_id in enumerate(ids):
        meta, pixels = agent.produce(image_id)
        expected.append(pixels)
        agent.write(i, meta, len(ids), run_id)
    agent.stop(len(ids), len(ids), run_id)
    return expected
