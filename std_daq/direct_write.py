"""A write sent straight to std_h5_writer, without RabbitMQ or writer_agent.

`std-daq demo` uses it when no broker is reachable, so a newcomer still sees the data path end in a
file. It plays writer_agent's part of the StoreStream contract (DESIGN.md §4) for exactly one request:
SUBscribe to the ImageMetadata stream, send start, one write per image, stop, and wait for the writer's
final status. Production writes go through writer_agent, which also handles kills, timeouts and the
broker protocol.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Callable

import zmq

from core_buffer.config import DetectorConfig
from core_buffer.formats import ImageMetadata, StoreOp, StoreStream, WriterState, WriterStatus
from core_buffer.ipc import image_metadata_address, make_socket, store_stream_address, writer_status_address

HWM = 10000


class DirectWriteError(RuntimeError):
    pass


def write_direct(config: DetectorConfig, output_file: str, n_images: int, *, timeout_s: float = 60.0,
                 progress: Callable[[int, int], None] | None = None) -> WriterStatus:
    """Write the next `n_images` images into `output_file`; returns the writer's final status."""
    context = zmq.Context.instance()
    images = make_socket(context, zmq.SUB, hwm=HWM)
    store = make_socket(context, zmq.PUSH, hwm=HWM)
    status = make_socket(context, zmq.PULL, hwm=HWM)
    try:
        images.connect(image_metadata_address(config))
        store.bind(store_stream_address(config))
        status.connect(writer_status_address(config))
        time.sleep(0.3)  # let the writer's PULL connect to our PUSH before the start goes out
        run_id = int(time.time())
        request = {"output_file": output_file, "n_images": n_images, "run_id": run_id, "user_id": 0,
                   "request_id": str(uuid.uuid4()), "source": "std-daq demo (direct)"}
        start = StoreStream(StoreOp.START, 0, n_images, 0, run_id)
        store.send_multipart([start.encode(), json.dumps(request).encode()])
        deadline = time.monotonic() + timeout_s
        sent = 0
        final: WriterStatus | None = None
        poller = zmq.Poller()
        poller.register(images, zmq.POLLIN)
        poller.register(status, zmq.POLLIN)
        while final is None:
            if time.monotonic() > deadline:
                raise DirectWriteError(f"no final status from std_h5_writer within {timeout_s:.0f} s "
                                       f"({sent} of {n_images} images sent)")
            events = dict(poller.poll(100))
            if images in events and sent < n_images:
                meta = ImageMetadata.decode(images.recv())
                store.send(StoreStream(StoreOp.WRITE, sent, n_images, 0, run_id, meta).encode())
                sent += 1
                if sent == n_images:
                    store.send(StoreStream(StoreOp.STOP, sent, n_images, 0, run_id).encode())
            elif images in events:
                images.recv()  # images after the last one are not ours
            if status in events:
                update = WriterStatus.decode(status.recv())
                if update.run_id != run_id:
                    continue
                if progress is not None:
                    progress(update.n_written, n_images)
                if update.state in (WriterState.FINISHED, WriterState.FAILED):
                    final = update
        return final
    finally:
        for sock in (images, store, status):
            sock.close(linger=1000)
