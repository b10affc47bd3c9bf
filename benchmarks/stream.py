"""Replication throughput: std_stream_send -> ZMQ TCP loopback -> std_stream_recv -> replica ImageBuffer.

Both services run as their own processes (the console scripts). The benchmark plays std_assembler: the
images sit in a real ImageBuffer, and it publishes their ImageMetadata, keeping at most --window images
between "published" and "seen on the replica's metadata stream" so nothing is dropped. In the same run
it measures bare ZMQ: a PUSH sending the same bytes zero-copy to a PULL in another process that receives
them into one buffer, and prints the ratio. For 1 MiB and 4 MiB uint16 images:

    python benchmarks/stream.py [--seconds 5] [--window 32]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

from core_buffer.config import load_config
from core_buffer.formats import ImageMetadata
from core_buffer.ipc import image_metadata_address, ipc_path, make_socket
from core_buffer.ringbuffer import ImageBuffer, unlink

BIN = os.path.dirname(sys.executable)
SIZES = {"1 MiB": 1, "4 MiB": 4}  # Jungfrau modules of 512x1024 uint16
SLOTS = 128
QUEUE = 64  # send and receive queues, in images (above --window, so nothing is dropped)

BARE_RECEIVER = """
import sys, time, zmq, numpy as np
ctx = zmq.Context()
pull = ctx.socket(zmq.PULL); pull.setsockopt(zmq.RCVHWM, 16); pull.bind(sys.argv[1])
n, size = int(sys.argv[2]), int(sys.argv[3])
buf = np.empty(size, np.uint8)
pull.recv_into(buf); t0 = time.perf_counter()
for _ in range(n - 1):
    pull.recv_into(buf)
print(time.perf_counter() - t0, flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(workdir: str, name: str, modules: int, **extra) -> str:
    path = os.path.join(workdir, f"{name}-{extra.get('namespace', 'std-daq')}.json")
    with open(path, "w") as f:
        json.dump({"detector_name": name, "detector_type": "jungfrau", "n_modules": modules, "bit_depth": 16,
                   "image_pixel_height": 512 * modules, "image_pixel_width": 1024, "start_udp_port": 50000,
                   "image_buffer_slots": SLOTS, "frame_buffer_slots": 4, "stats_interval_s": 3600, **extra}, f)
    return path


def replicate(workdir: str, modules: int, seconds: float, window: int) -> tuple[float, int, int]:
    """(images/s on the replica, images, images the sender dropped per the replica's sequence)."""
    name = f"benchs-{modules}-{os.getpid()}"
    port = free_port()
    source_path = write_config(workdir, name, modules, stream_send={"to": f"tcp://127.0.0.1:{port}",
                                                                    "queue_images": QUEUE})
    replica_path = write_config(workdir, name, modules, namespace="bench-replica",
                                stream_recv={"bind": f"tcp://127.0.0.1:{port}", "queue_images": QUEUE})
    source, replica = load_config(source_path), load_config(replica_path)
    images = ImageBuffer.for_config(source)
    rng = np.random.default_rng(0)
    for slot in range(SLOTS):
        images.slot_data(slot)[:] = rng.integers(0, 255, images.slot_data(slot).size, dtype=np.uint8)
    ctx = zmq.Context.instance()
    pub = make_socket(ctx, zmq.PUB, hwm=100000)
    pub.bind(image_metadata_address(source))
    procs = [subprocess.Popen([os.path.join(BIN, script), path, "--log-level", "WARNING"],
                              stdout=subprocess.DEVNULL)
             for script, path in (("std_stream_recv", replica_path), ("std_stream_send", source_path))]
    seen = make_socket(ctx, zmq.SUB, hwm=100000)
    try:
        time.sleep(1.5)  # the replica creates its buffer and binds before we subscribe
        seen.connect(image_metadata_address(replica))
        time.sleep(1.0)
        next_id, received, last_seq_gap = 1, 0, 0
        shape = source.image_shape
        start = None
        deadline = None
        while deadline is None or time.perf_counter() < deadline:
            while next_id - 1 - received < window:
                meta = ImageMetadata(next_id, *shape, user_1=next_id)
                images.commit_image(meta)
                pub.send(meta.encode())
                next_id += 1
            if seen.poll(2000):
                got = ImageMetadata.decode(seen.recv())
                received += 1
                last_seq_gap = next_id - 1 - received
                if received == window and start is None:  # warmed up
                    start, start_count = time.perf_counter(), received
                    deadline = start + seconds
            else:
                raise RuntimeError(f"the replica stopped receiving after {received} images (last {got.id})")
        elapsed = time.perf_counter() - start
        return (received - start_count) / elapsed, received, last_seq_gap
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        seen.close()
        pub.close()
        images.close()
        for cfg in (source, replica):
            unlink(f"{cfg.namespace}-{cfg.detector_name}-images")
            path = ipc_path(image_metadata_address(cfg))
            if path and os.path.exists(path):
                os.unlink(path)


def bare_zmq(nbytes: int, n: int) -> float:
    """Messages/s of bare zero-copy PUSH -> PULL over TCP loopback, in two processes."""
    address = f"tcp://127.0.0.1:{free_port()}"
    receiver = subprocess.Popen([sys.executable, "-c", BARE_RECEIVER, address, str(n), str(nbytes)],
                                stdout=subprocess.PIPE, text=True)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 16)
    push.setsockopt(zmq.LINGER, 5000)
    push.connect(address)
    payload = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    for _ in range(n):
        push.send(payload, copy=False)
    out, _ = receiver.communicate(timeout=120)
    push.close()
    return (n - 1) / float(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per image size")
    parser.add_argument("--window", type=int, default=32, help="images in flight at most")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        for label, modules in SIZES.items():
            nbytes = modules * 512 * 1024 * 2
            rate, n, gaps = replicate(workdir, modules, args.seconds, args.window)
            bare = bare_zmq(nbytes, max(200, int(rate * 3)))
            print(f"replication {label}: {rate:.0f} images/s ({rate * nbytes / 1e9:.2f} GB/s), {n} images")
            print(f"bare zmq {label}: {bare:.0f} messages/s ({bare * nbytes / 1e9:.2f} GB/s)")
            print(f"ratio replication/bare {label}: {rate / bare:.2f}")


if __name__ == "__main__":
    main()
