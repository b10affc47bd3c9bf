"""std_assembler throughput and latency, per detector, on one core (plus 2 conversion threads for Jungfrau).

The benchmark plays the receivers: the FrameBuffer holds pattern frames, and for each image id it
commits the frames' metas and PUSHes their ModuleFrames; only the time spent in the assembler's poll
counts. For each configuration it prints images/s and GB/s (of image bytes written), the rate of a plain
numpy copy of the same bytes measured in the same run, their ratio, and for Jungfrau conversion the
module-frames/s. Latency: images paced at 100 Hz, from the last ModuleFrame sent to the ImageMetadata
received (p50, p99).

    python benchmarks/assembler.py [--seconds 3] [--only jungfrau-1m-raw,...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import h5py
import numpy as np
import zmq

from core_buffer.config import parse_config
from core_buffer.formats import ModuleFrame
from core_buffer.ipc import image_metadata_address, make_socket, module_frames_address
from core_buffer.pattern import frame_bytes
from core_buffer.ringbuffer import FrameBuffer, ImageBuffer
from std_assembler.assembler import Assembler

SLOTS = 64


def jungfrau(n_modules: int, converted: bool, calibration: str, threads: int = 1) -> dict:
    raw = {"detector_type": "jungfrau", "n_modules": n_modules, "bit_depth": 16,
           "image_pixel_height": 512 * n_modules, "image_pixel_width": 1024,
           "assembler": {"conversion_threads": threads}}
    if converted:
        raw.update(conversion="converted", calibration_file=calibration)
    return raw


def configs(calibration_dir: str) -> dict[str, dict]:
    def cal(n):
        path = os.path.join(calibration_dir, f"cal{n}.h5")
        if not os.path.exists(path):
            rng = np.random.default_rng(n)
            with h5py.File(path, "w") as f:
                f["pedestal"] = rng.uniform(1000, 3000, (3, 512 * n, 1024)).astype(np.float32)
                f["gain"] = rng.uniform(10, 50, (3, 512 * n, 1024)).astype(np.float32)
        return path

    eiger_positions = {"0": [0, 0, 513, 255], "1": [516, 0, 1029, 255], "2": [0, 513, 513, 258],
                       "3": [516, 513, 1029, 258]}
    return {
        "jungfrau-1m-raw": jungfrau(1, False, ""),
        "jungfrau-1m-converted": jungfrau(1, True, cal(1)),
        "jungfrau-1m-converted-2threads": jungfrau(1, True, cal(1), 2),
        "jungfrau-4m-raw": jungfrau(8, False, ""),
        "jungfrau-4m-converted": jungfrau(8, True, cal(8)),
        "jungfrau-4m-converted-2threads": jungfrau(8, True, cal(8), 2),
        "eiger-500k-16bit": {"detector_type": "eiger", "n_modules": 4, "bit_depth": 16, "image_pixel_height": 514,
                             "image_pixel_width": 1030, "module_positions": eiger_positions},
        "gigafrost-2016x2016": {"detector_type": "gigafrost", "n_modules": 8, "bit_depth": 12,
                                "image_pixel_height": 2016, "image_pixel_width": 2016},
    }


class Bench:
    def __init__(self, name: str, raw: dict) -> None:
        raw = {"detector_name": f"bench-{name}-{os.getpid()}", "start_udp_port": 50000,
               "frame_buffer_slots": SLOTS, "image_buffer_slots": SLOTS, **raw}
        self.config = parse_config(raw)
        ctx = zmq.Context.instance()
        self.pushes = []
        for m in range(self.config.n_modules):
            push = make_socket(ctx, zmq.PUSH, hwm=100000)
            push.bind(module_frames_address(self.config, m))
            self.pushes.append(push)
        self.frames = FrameBuffer.for_config(self.config)
        self.assembler = Assembler(self.config)
        self.sub = make_socket(ctx, zmq.SUB, hwm=100000)
        self.sub.connect(image_metadata_address(self.config))
        stream = self.config.stream
        for image_id in range(SLOTS):
            for m in range(self.config.n_modules):
                self.frames.begin_frame(image_id, m)[:] = frame_bytes(stream, m, image_id)
        self.n_packets = stream.packets_per_frame
        time.sleep(0.3)

    def push(self, image_id: int) -> None:
        for m, push in enumerate(self.pushes):
            frame = ModuleFrame(id=image_id, frame_index=image_id, n_recv_packets=self.n_packets,
                                n_packets=self.n_packets, module_id=m)
            self.frames.commit_frame(frame)
            push.send(frame.encode())

    def throughput(self, seconds: float) -> float:
        busy, done, image_id = 0.0, 0, SLOTS
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            batch = SLOTS // 4
            for _ in range(batch):
                image_id += 1
                self.push(image_id)
            target = self.assembler.counters.images + batch
            while self.assembler.counters.images < target:
                t0 = time.perf_counter()
                self.assembler.poll(0.01)
                busy += time.perf_counter() - t0
            done += batch
            while self.sub.poll(0):
                self.sub.recv()
        return done / busy

    def latency(self, n: int = 200, rate_hz: float = 100.0) -> tuple[float, float]:
        out = []
        image_id = 10**6
        for _ in range(n):
            image_id += 1
            t0 = time.perf_counter()
            self.push(image_id)
            while not self.sub.poll(0):
                self.assembler.poll(0.001)
            self.sub.recv()
            out.append(time.perf_counter() - t0)
            time.sleep(max(0.0, 1 / rate_hz - out[-1]))
        return float(np.percentile(out, 50)), float(np.percentile(out, 99))

    def copy_rate(self, seconds: float = 1.0) -> float:
        """A plain numpy copy of an image's bytes from the FrameBuffer into the ImageBuffer."""
        images = self.assembler.images
        n_bytes = min(self.config.image_bytes, self.frames.layout.data_bytes * self.config.n_modules)
        src = self.frames.slot_data(1)[:n_bytes]
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            np.copyto(images.begin_image(count)[:n_bytes], src)
            count += 1
        return count / (time.perf_counter() - t0)

    def close(self) -> None:
        self.assembler.close()
        self.sub.close()
        for p in self.pushes:
            p.close()
        self.frames.close()
        self.frames.unlink()
        ImageBuffer.for_config(self.config).unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of throughput per configuration")
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, raw in configs(tmp).items():
            if args.only and name not in args.only.split(","):
                continue
            bench = Bench(name, raw)
            try:
                rate = bench.throughput(args.seconds)
                copy = bench.copy_rate()
                gb = rate * bench.config.image_bytes / 1e9
                line = f"{name}: {rate:.0f} images/s ({gb:.2f} GB/s)"
                if bench.config.conversion == "converted":
                    line += f", {rate * bench.config.n_modules:.0f} module-frames/s"
                print(line)
                print(f"{name} plain copy: {copy:.0f} images/s")
                print(f"ratio {name}/copy: {rate / copy:.2f}")
                p50, p99 = bench.latency()
                print(f"{name} latency: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms")
            finally:
                bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
