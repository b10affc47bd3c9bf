"""std_h5_writer throughput through the whole start/write/stop path, from a real ImageBuffer.

std_h5_writer runs as its own process (the console script); the benchmark plays the assembler and
writer_agent: it lays the images out in an ImageBuffer big enough for the whole run, then sends start,
a write per image and stop over ZMQ, and times start to final status. Prints, for 1 MiB uint16 images:
1. uncompressed images/s and GB/s, the rate of a plain sequential os.write of the same bytes to the same
   directory in the same run, and their ratio;
2. bitshuffle-LZ4 images/s and the compression ratio, on Jungfrau-like data (pedestal plus a few photons)
   and on random data.

    python benchmarks/h5_writer.py [--images 1000] [--rounds 3] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

from core_buffer.config import load_config
from core_buffer.formats import ImageMetadata, StoreOp, StoreStream, WriterState, WriterStatus
from core_buffer.ipc import make_socket, store_stream_address, writer_status_address
from core_buffer.ringbuffer import ImageBuffer

SHAPE = (512, 1024)


def make_config(workdir: str, compression: str, tag: str, slots: int) -> str:
    path = os.path.join(workdir, f"bench-{tag}.json")
    with open(path, "w") as f:
        json.dump({
            "detector_name": f"benchw-{tag}-{os.getpid()}", "detector_type": "jungfrau", "n_modules": 1,
            "bit_depth": 16, "image_pixel_height": SHAPE[0], "image_pixel_width": SHAPE[1],
            "start_udp_port": 50000, "image_buffer_slots": slots, "frame_buffer_slots": 4,
            "output_dirs": [workdir], "overwrite_files": True,
            "writer": {"compression": compression, "status_interval_s": 10.0}}, f)
    return path


def jungfrau_like(rng: np.random.Generator) -> np.ndarray:
    pedestal = rng.normal(1500, 20, SHAPE)
    photons = rng.poisson(0.05, SHAPE) * 40
    return np.clip(pedestal + photons + rng.normal(0, 3, SHAPE), 0, 0x3FFF).astype(np.uint16)


def write_through_writer(workdir: str, compression: str, data: str, n_images: int) -> tuple[float, int]:
    """(seconds from the start message to the final status, file bytes), std_h5_writer as its own process."""
    config_path = make_config(workdir, compression, f"{compression}-{data}", n_images)
    config = load_config(config_path)
    rng = np.random.default_rng(1)
    distinct = [jungfrau_like(rng) if data == "jungfrau-like" else rng.integers(0, 2**16, SHAPE, dtype=np.uint16)
                for _ in range(16)]
    images = ImageBuffer.for_config(config)
    metas = []
    for i in range(n_images):  # the whole run fits the ring: nothing is overwritten, no flow control
        pixels = distinct[i % len(distinct)]
        images.begin_image(i)[:pixels.nbytes] = pixels.reshape(-1).view(np.uint8)
        metas.append(ImageMetadata(i, *SHAPE))
        images.commit_image(metas[-1])
    ctx = zmq.Context.instance()
    push = make_socket(ctx, zmq.PUSH, hwm=100000)
    push.bind(store_stream_address(config))
    status = make_socket(ctx, zmq.PULL, hwm=100000)
    status.connect(writer_status_address(config))
    writer = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "std_h5_writer"), config_path,
                               "--log-level", "WARNING"])
    path = os.path.join(workdir, f"bench-{compression}-{data}.h5")
    try:
        time.sleep(1.5)  # the writer connects
        t0 = time.perf_counter()
        push.send_multipart([StoreStream(StoreOp.START, 0, n_images, 0, 1).encode(),
                             json.dumps({"output_file": path, "n_images": n_images}).encode()])
        for i, meta in enumerate(metas):
            push.send(StoreStream(StoreOp.WRITE, i, n_images, 0, 1, meta).encode())
        push.send(StoreStream(StoreOp.STOP, n_images, n_images, 0, 1).encode())
        while True:
            final = WriterStatus.decode(status.recv())
            if final.state != WriterState.WRITING:
                break
        seconds = time.perf_counter() - t0
        if final.state != WriterState.FINISHED or final.n_written != n_images:
            raise RuntimeError(f"writer did not finish cleanly: {final}")
        return seconds, os.path.getsize(path)
    finally:
        writer.terminate()
        writer.wait(timeout=30)
        push.close()
        status.close()
        images.close()
        images.unlink()
        if os.path.exists(path):
            os.unlink(path)


def raw_write(workdir: str, n_images: int) -> float:
    """Seconds for a plain sequential os.write of n_images x 1 MiB to a new file in workdir."""
    block = np.random.default_rng(2).integers(0, 2**16, SHAPE, dtype=np.uint16).tobytes()
    path = os.path.join(workdir, "bench-raw.bin")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(n_images):
            os.write(fd, block)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    os.unlink(path)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images per run (default 1000 = 1 GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating writer/raw rounds (default 3)")
    parser.add_argument("--compressed-images", type=int, default=600, help="images per compressed run")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="std-daq-bench-h5-", dir=args.dir)
    image_bytes = SHAPE[0] * SHAPE[1] * 2
    print(f"load average: {os.getloadavg()[0]:.2f}")
    try:
        # Page-cache writeback makes single runs noisy: alternate the two, each after a sync, and take medians.
        raw_runs, writer_runs = [], []
        for _ in range(args.rounds):
            os.sync()
            raw_runs.append(raw_write(workdir, args.images))
            os.sync()
            writer_runs.append(write_through_writer(workdir, "none", "jungfrau-like", args.images)[0])
        os.sync()
        writer_rate = args.images / float(np.median(writer_runs))
        raw_rate = args.images / float(np.median(raw_runs))
        print(f"writer uncompressed: {writer_rate:.0f} images/s ({writer_rate * image_bytes / 1e9:.2f} GB/s)")
        print(f"raw os.write: {raw_rate:.0f} images/s ({raw_rate * image_bytes / 1e9:.2f} GB/s)")
        print(f"ratio writer/raw: {writer_rate / raw_rate:.2f}")
        for data in ("jungfrau-like", "random"):
            seconds, size = write_through_writer(workdir, "bitshuffle-lz4", data, args.compressed_images)
            rate = args.compressed_images / seconds
            ratio = args.compressed_images * image_bytes / size
            print(f"writer bitshuffle-lz4 {data}: {rate:.0f} images/s ({rate * image_bytes / 1e9:.2f} GB/s "
                  f"uncompressed), compression ratio {ratio:.2f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
