"""std_h5_writer throughput through the whole start/write/stop path, from a real ImageBuffer.

std_h5_writer runs as its own process (the console script); the benchmark plays the assembler and
writer_agent: it lays the images out once in an ImageBuffer big enough for a whole run, then, per run,
sends start, a write per image and stop over ZMQ and times start to final status. Prints, for 1 MiB
uint16 images:
1. uncompressed images/s and GB/s, a plain sequential os.write of the same bytes (straight from the
   same ImageBuffer slots) to the same directory, and the ratio writer/raw;
2. bitshuffle-LZ4 images/s, the writer's images per CPU-second of its own process (= per core) and
   the compression ratio, on Jungfrau-like data (pedestal plus a few photons) and on random data, for
   1 and 2 compression threads (the scaling).

Why the runs are arranged as they are (measured on the 2-core VM this project develops on):
- Memory freed by the guest goes back to the host about 2 s later (virtio-balloon free page
  reporting), and the next touch of such a page costs a host fault: a first write of 1 GiB into the
  page cache then runs at ~0.35 GB/s instead of ~4 GB/s. Which of the two a run sees depends only on
  how long ago memory was freed, not on the writer, so before every timed run, raw or writer, the
  benchmark writes and deletes a file of the run's size ("warm": the run reuses those pages, as on a
  host without this) or, with --cold, waits 3 s ("cold": both pay the host faults).
- Runs alternate raw/writer (which one goes first alternates too), each after a sync, and the figures
  are medians over the rounds; the spread is printed next to them.
- The writer is started once per configuration and kept; the ring is filled once, so the timed part
  is the writer's work only.

    flock /tmp/std-daq-heavy.lock python benchmarks/h5_writer.py [--images 1000] [--rounds 5] [--cold]
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
IMAGE_BYTES = SHAPE[0] * SHAPE[1] * 2
COLD_PAUSE_S = 3.0  # longer than the ~2 s after which freed guest memory is handed back to the host


def jungfrau_like(rng: np.random.Generator) -> np.ndarray:
    pedestal = rng.normal(1500, 20, SHAPE)
    photons = rng.poisson(0.05, SHAPE) * 40
    return np.clip(pedestal + photons + rng.normal(0, 3, SHAPE), 0, 0x3FFF).astype(np.uint16)


def fill(images: ImageBuffer, n_images: int, data: str) -> list[ImageMetadata]:
    rng = np.random.default_rng(1)
    distinct = [jungfrau_like(rng) if data == "jungfrau-like" else rng.integers(0, 2**16, SHAPE, dtype=np.uint16)
                for _ in range(16)]
    metas = []
    for i in range(n_images):  # the whole run fits the ring: nothing is overwritten, no flow control
        pixels = distinct[i % len(distinct)]
        images.begin_image(i)[:IMAGE_BYTES] = pixels.reshape(-1).view(np.uint8)
        metas.append(ImageMetadata(i, *SHAPE))
        images.commit_image(metas[-1])
    return metas


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class WriterProcess:
    """A std_h5_writer process for one config, and the sockets writer_agent would hold."""

    def __init__(self, config_path: str) -> None:
        self.config = load_config(config_path)
        ctx = zmq.Context.instance()
        self.push = make_socket(ctx, zmq.PUSH, hwm=100000)
        self.push.bind(store_stream_address(self.config))
        self.status = make_socket(ctx, zmq.PULL, hwm=100000)
        self.status.connect(writer_status_address(self.config))
        self.proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "std_h5_writer"),
                                      config_path, "--log-level", "WARNING"], stdout=subprocess.DEVNULL)
        self.run_id = 0

    def write(self, path: str, metas: list[ImageMetadata]) -> tuple[float, float]:
        """(seconds from the start message to the final status, CPU seconds of the writer process)."""
        self.run_id += 1
        n, run_id = len(metas), self.run_id
        cpu0, t0 = cpu_seconds(self.proc.pid), time.perf_counter()
        self.push.send_multipart([StoreStream(StoreOp.START, 0, n, 0, run_id).encode(),
                                  json.dumps({"output_file": path, "n_images": n}).encode()])
        for i, meta in enumerate(metas):
            self.push.send(StoreStream(StoreOp.WRITE, i, n, 0, run_id, meta).encode())
        self.push.send(StoreStream(StoreOp.STOP, n, n, 0, run_id).encode())
        while True:
            if not self.status.poll(60000):
                raise RuntimeError("the writer sent no final status within 60 s")
            final = WriterStatus.decode(self.status.recv())
            if final.run_id == run_id and final.state != WriterState.WRITING:
                break
        seconds, cpu = time.perf_counter() - t0, cpu_seconds(self.proc.pid) - cpu0
        if final.state != WriterState.FINISHED or final.n_written != n:
            raise RuntimeError(f"writer did not finish cleanly: {final}")
        return seconds, cpu

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.push.close()
        self.status.close()


class Bench:
    def __init__(self, workdir: str, n_slots: int, cold: bool) -> None:
        self.workdir, self.cold = workdir, cold
        self.name = f"benchw-{os.getpid()}"
        self.images = ImageBuffer.for_config(load_config(self.config("none", 1, n_slots)))

    def config(self, compression: str, threads: int, n_slots: int) -> str:
        path = os.path.join(self.workdir, f"bench-{compression}-{threads}.json")
        with open(path, "w") as f:
            json.dump({
                "detector_name": self.name, "detector_type": "jungfrau", "n_modules": 1,
                "bit_depth": 16, "image_pixel_height": SHAPE[0], "image_pixel_width": SHAPE[1],
                "start_udp_port": 50000, "image_buffer_slots": n_slots, "frame_buffer_slots": 4,
                "output_dirs": [self.workdir], "overwrite_files": True,
                "writer": {"compression": compression, "compression_threads": threads,
                           "status_interval_s": 10.0}}, f)
        return path

    def prepare(self, n_images: int) -> None:
        """The same memory state before every timed run (see the module docstring)."""
        os.sync()
        if self.cold:
            time.sleep(COLD_PAUSE_S)
            return
        path = os.path.join(self.workdir, "warm.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(n_images + 16):
                os.write(fd, self.images.raw_bytes(i % n_images, IMAGE_BYTES))
        finally:
            os.close(fd)
        os.unlink(path)

    def raw_write(self, n_images: int) -> float:
        """Seconds for a plain sequential os.write of the ring's first n_images slots to a new file."""
        path = os.path.join(self.workdir, "bench-raw.bin")
        self.prepare(n_images)
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(n_images):
                os.write(fd, self.images.raw_bytes(i, IMAGE_BYTES))
        finally:
            os.close(fd)
        seconds = time.perf_counter() - t0
        os.unlink(path)
        return seconds

    def writer_run(self, writer: WriterProcess, metas: list[ImageMetadata]) -> tuple[float, float, int]:
        """(seconds, writer CPU seconds, file bytes) of one run through the writer."""
        path = os.path.join(self.workdir, "bench.h5")
        self.prepare(len(metas))
        seconds, cpu = writer.write(path, metas)
        size = os.path.getsize(path)
        os.unlink(path)
        return seconds, cpu, size

    def close(self) -> None:
        self.images.close()
        self.images.unlink()


def spread(rates: list[float]) -> str:
    return f"[{min(rates):.0f}..{max(rates):.0f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images per uncompressed run (default 1000 = 1 GiB)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating writer/raw rounds (default 5)")
    parser.add_argument("--compressed-images", type=int, default=600, help="images per compressed run")
    parser.add_argument("--compressed-rounds", type=int, default=2, help="runs per compressed case (default 2)")
    parser.add_argument("--threads", default="1,2", help="compression thread counts to show (default 1,2)")
    parser.add_argument("--cold", action="store_true",
                        help=f"pause {COLD_PAUSE_S:.0f} s before each run instead of warming the page pool")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="std-daq-bench-h5-", dir=args.dir)
    n_slots = max(args.images, args.compressed_images)
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(f"memory state before each run: {'cold (3 s pause)' if args.cold else 'warm (pages reused)'}")
    bench = Bench(workdir, n_slots, args.cold)
    try:
        metas = fill(bench.images, n_slots, "jungfrau-like")
        writer = WriterProcess(bench.config("none", 1, n_slots))
        try:
            writer.write(os.path.join(workdir, "connect.h5"), metas[:1])  # connects and loads the code
            raw_rates, writer_rates, writer_cpu, ratios = [], [], [], []
            for r in range(args.rounds):
                if r % 2:
                    w, cpu, _ = bench.writer_run(writer, metas[:args.images])
                    raw = bench.raw_write(args.images)
                else:
                    raw = bench.raw_write(args.images)
                    w, cpu, _ = bench.writer_run(writer, metas[:args.images])
                raw_rates.append(args.images / raw)
                writer_rates.append(args.images / w)
                writer_cpu.append(args.images / cpu)
                ratios.append(raw / w)
            # What a file costs whatever its size (creating the layout, closing it, the statuses): the
            # part of the gap to the raw loop that shrinks with longer runs.
            one = [writer.write(os.path.join(workdir, "one.h5"), metas[:1])[0] for _ in range(9)]
        finally:
            writer.close()
        writer_rate, raw_rate = float(np.median(writer_rates)), float(np.median(raw_rates))
        print(f"writer uncompressed: {writer_rate:.0f} images/s {spread(writer_rates)}")
        print(f"writer uncompressed: {writer_rate * IMAGE_BYTES / 1e9:.2f} GB/s")
        print(f"writer uncompressed: {float(np.median(writer_cpu)):.0f} images per CPU-second of the writer")
        print(f"raw os.write: {raw_rate:.0f} images/s {spread(raw_rates)}")
        print(f"raw os.write: {raw_rate * IMAGE_BYTES / 1e9:.2f} GB/s")
        print(f"ratio writer/raw (median of rounds): {float(np.median(ratios)):.2f} "
              f"[{min(ratios):.2f}..{max(ratios):.2f}]")
        print(f"writer per-file cost (a 1-image run, start to final status): {float(np.median(one)) * 1e3:.1f} ms")

        n = args.compressed_images
        for data in ("jungfrau-like", "random"):
            metas = fill(bench.images, n, data)
            for threads in (int(t) for t in args.threads.split(",")):
                writer = WriterProcess(bench.config("bitshuffle-lz4", threads, n_slots))
                try:
                    writer.write(os.path.join(workdir, "connect.h5"), metas[:1])
                    runs = [bench.writer_run(writer, metas) for _ in range(args.compressed_rounds)]
                finally:
                    writer.close()
                seconds = float(np.median([s for s, _, _ in runs]))
                cpu = float(np.median([c for _, c, _ in runs]))
                print(f"writer bitshuffle-lz4 {data} {threads} thread(s): {n / seconds:.0f} images/s")
                print(f"writer bitshuffle-lz4 {data} {threads} thread(s): {n / cpu:.0f} images per CPU-second")
            print(f"bitshuffle-lz4 {data} compression ratio: {n * IMAGE_BYTES / runs[0][2]:.2f}")
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
