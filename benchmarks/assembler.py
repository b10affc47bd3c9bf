"""std_assembler throughput and latency, per detector, through the real Assembler.poll path.

The benchmark plays the receivers: the FrameBuffer holds frames, and for each image id it commits the
frames' metas and PUSHes their ModuleFrames; only the time spent in the assembler's poll counts (ZMQ
receive, synchronisation, conversion or placement, corrections, commit and PUBlish). For each
configuration it prints images/s and GB/s (of image bytes written), the rate of a plain numpy copy of
the same bytes measured in the same run, their ratio, for Jungfrau conversion the module-frames/s, and
the latency from the last module frame's arrival to the ImageMetadata being published, as seen from
outside: the other modules' ModuleFrames are sent and taken in by the assembler first, then the clock
starts as the last module's ModuleFrame is sent, and stops when the ImageMetadata is received (p50,
p99; images paced at 200 Hz).

Data. Raw and geometry cases use the simulator's pattern. Converted Jungfrau cases use realistic frames:
G0 pedestal plus noise for ~98 % of the pixels, 1.5 % G1, 0.4 % G2, 0.05 % the invalid gain value,
scattered at random (clustered hits, as in real data, only make it faster), and 0.1 % masked pixels.
The `worstcase` line converts the simulator's pattern instead, whose gain bits cycle G0/G1/G2/invalid
(44 % non-G0 pixels): a bound, not an operating point.

Workers. "N workers" are N numba threads inside the one assembler process (nogil kernels,
`assembler.conversion_threads` = N): Jungfrau conversion splits an image's rows among them, Gigafrost
unpacking its 8 streams; everything else stays on the assembler's thread. "1 worker" is the one-core
figure. On this 2-core machine a 2-worker figure is only meaningful while nothing else runs.

    python benchmarks/assembler.py                  # every configuration, about 30 s
    python benchmarks/assembler.py --long           # 4 s per throughput figure, 400 latency samples
    python benchmarks/assembler.py --only jungfrau-4m-converted,gigafrost-2016x2016

Run it alone on the machine (the team's lock: flock /tmp/std-daq-heavy.lock python benchmarks/...).
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

SLOTS = 32  # FrameBuffer and ImageBuffer slots: 256 MiB + 512 MiB of shm for the 4M converted case
DISTINCT_FRAMES = 4  # realistic frames generated per module, repeated over the slots
P_G1, P_G2, P_INVALID, P_MASKED = 0.015, 0.004, 0.0005, 0.001


def jungfrau(n_modules: int, converted: bool = False, calibration: str = "", workers: int = 1) -> dict:
    raw = {"detector_type": "jungfrau", "n_modules": n_modules, "bit_depth": 16,
           "image_pixel_height": 512 * n_modules, "image_pixel_width": 1024,
           "assembler": {"conversion_threads": workers}}
    if converted:
        raw.update(conversion="converted", calibration_file=calibration)
    return raw


def calibration_file(directory: str, n_modules: int) -> str:
    path = os.path.join(directory, f"cal{n_modules}.h5")
    if not os.path.exists(path):
        rng = np.random.default_rng(n_modules)
        rows = 512 * n_modules
        pedestal = np.empty((3, rows, 1024), np.float32)
        pedestal[0] = rng.uniform(1000, 3000, (rows, 1024))
        pedestal[1:] = rng.uniform(12000, 15000, (2, rows, 1024))
        gain = np.empty((3, rows, 1024), np.float32)
        gain[0], gain[1], gain[2] = (rng.uniform(lo, hi, (rows, 1024)) for lo, hi in ((38, 44), (-1.6, -1.4),
                                                                                      (-0.12, -0.1)))
        with h5py.File(path, "w") as f:
            f["pedestal"], f["gain"] = pedestal, gain
            f["pixel_mask"] = (rng.random((rows, 1024)) < P_MASKED).astype(np.uint8)
    return path


def realistic_frames(calibration: str, module: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Raw Jungfrau frames of a dark-ish exposure: G0 pedestal + noise (a few photons), some G1/G2."""
    with h5py.File(calibration, "r") as f:
        pedestal_g0 = f["pedestal"][0, module * 512:(module + 1) * 512]
    frames = []
    for _ in range(DISTINCT_FRAMES):
        adc = np.clip(pedestal_g0 + rng.normal(0, 4, pedestal_g0.shape) + 40 * rng.poisson(0.05, pedestal_g0.shape),
                      0, 0x3FFF).astype(np.uint16)
        u = rng.random(pedestal_g0.shape)
        gain = np.where(u < P_G1, 1, np.where(u < P_G1 + P_G2, 3, np.where(u < P_G1 + P_G2 + P_INVALID, 2, 0)))
        other = rng.integers(0, 0x4000, pedestal_g0.shape, dtype=np.uint16)
        frames.append(np.where(gain == 0, adc, other).astype(np.uint16) | (gain.astype(np.uint16) << 14))
    return frames


def configs(calibration_dir: str) -> dict[str, tuple[dict, str]]:
    """name -> (config, data): data is "pattern" (the simulator's) or "realistic" (converted Jungfrau)."""
    cal1, cal8 = calibration_file(calibration_dir, 1), calibration_file(calibration_dir, 8)
    eiger_positions = {"0": [0, 0, 513, 255], "1": [516, 0, 1029, 255], "2": [0, 513, 513, 258],
                       "3": [516, 513, 1029, 258]}
    gigafrost = {"detector_type": "gigafrost", "n_modules": 8, "bit_depth": 12, "image_pixel_height": 2016,
                 "image_pixel_width": 2016}
    return {
        "jungfrau-1m-raw": (jungfrau(1), "pattern"),
        "jungfrau-1m-converted": (jungfrau(1, True, cal1), "realistic"),
        "jungfrau-1m-converted-2workers": (jungfrau(1, True, cal1, 2), "realistic"),
        "jungfrau-1m-converted-worstcase": (jungfrau(1, True, cal1), "pattern"),
        "jungfrau-4m-raw": (jungfrau(8), "pattern"),
        "jungfrau-4m-converted": (jungfrau(8, True, cal8), "realistic"),
        "jungfrau-4m-converted-2workers": (jungfrau(8, True, cal8, 2), "realistic"),
        "eiger-500k-16bit": ({"detector_type": "eiger", "n_modules": 4, "bit_depth": 16, "image_pixel_height": 514,
                              "image_pixel_width": 1030, "module_positions": eiger_positions}, "pattern"),
        "gigafrost-2016x2016": (gigafrost, "pattern"),
        "gigafrost-2016x2016-2workers": ({**gigafrost, "assembler": {"conversion_threads": 2}}, "pattern"),
    }


class Bench:
    def __init__(self, name: str, raw: dict, data: str) -> None:
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
        rng = np.random.default_rng(7)
        for m in range(self.config.n_modules):
            frames = realistic_frames(self.config.calibration_file, m, rng) if data == "realistic" else None
            for image_id in range(SLOTS):
                self.frames.begin_frame(image_id, m)[:] = frame_bytes(stream, m, image_id) if frames is None \
                    else frames[image_id % len(frames)].reshape(-1).view(np.uint8)
        images = self.assembler.images
        for slot in range(SLOTS):  # touch the ImageBuffer once, as a running pipeline has
            images.begin_image(slot)[:] = 0
        self.n_packets = stream.packets_per_frame
        time.sleep(0.3)

    def module_frame(self, image_id: int, module: int) -> bytes:
        """Commit a module's frame meta in the FrameBuffer (as its receiver does) and return its ModuleFrame."""
        frame = ModuleFrame(id=image_id, frame_index=image_id, n_recv_packets=self.n_packets,
                            n_packets=self.n_packets, module_id=module)
        self.frames.commit_frame(frame)
        return frame.encode()

    def push(self, image_id: int) -> None:
        for m, push in enumerate(self.pushes):
            push.send(self.module_frame(image_id, m))

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

    def latency(self, n: int, rate_hz: float = 200.0) -> tuple[float, float]:
        out = []
        image_id = 10**6
        *first, last = self.pushes
        for _ in range(n):
            image_id += 1
            taken = self.assembler.counters.frames + len(first)
            for m, push in enumerate(first):
                push.send(self.module_frame(image_id, m))
            while self.assembler.counters.frames < taken:  # the other modules' frames have arrived
                self.assembler.poll(0.001)
            message = self.module_frame(image_id, len(first))
            t0 = time.perf_counter()  # the last module's frame arrives
            last.send(message)
            while not self.sub.poll(0):
                self.assembler.poll(0.001)
            self.sub.recv()
            out.append(time.perf_counter() - t0)
            time.sleep(max(0.0, 1 / rate_hz - out[-1]))
        return float(np.percentile(out, 50)), float(np.percentile(out, 99))

    def copy_rate(self, seconds: float) -> float:
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
    parser.add_argument("--seconds", type=float, default=None, help="seconds of throughput per configuration "
                        "(default 1, 4 with --long)")
    parser.add_argument("--long", action="store_true", help="longer runs: steadier figures, a few minutes")
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    args = parser.parse_args()
    seconds = args.seconds or (4.0 if args.long else 1.0)
    n_latency = 400 if args.long else 100
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print("workers: numba threads of the one assembler process (assembler.conversion_threads); "
          "1 worker = one core")
    with tempfile.TemporaryDirectory() as tmp:
        chosen = configs(tmp)
        unknown = set(filter(None, args.only.split(","))) - set(chosen)
        if unknown:
            parser.error(f"unknown configuration(s) {', '.join(sorted(unknown))}; known: {', '.join(chosen)}")
        for name, (raw, data) in chosen.items():
            if args.only and name not in args.only.split(","):
                continue
            bench = Bench(name, raw, data)
            try:
                rate = bench.throughput(seconds)
                copy = bench.copy_rate(min(seconds, 0.5))
                gb = rate * bench.config.image_bytes / 1e9
                print(f"{name}: {rate:.0f} images/s")
                print(f"{name}: {gb:.2f} GB/s")
                if bench.config.conversion == "converted":
                    print(f"{name}: {rate * bench.config.n_modules:.0f} module-frames/s")
                print(f"{name} plain copy: {copy:.0f} images/s")
                print(f"{name} ratio to copy: {rate / copy:.2f}")
                p50, p99 = bench.latency(n_latency)
                print(f"{name} latency p50: {p50 * 1e3:.2f} ms")
                print(f"{name} latency p99: {p99 * 1e3:.2f} ms")
            finally:
                bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
