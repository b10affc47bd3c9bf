"""The highest frame rate at which a 1-module Jungfrau pipeline on this machine writes every image.

Simulator -> std_udp_recv -> std_assembler -> std_h5_writer -> HDF5 file on disk, all real processes
started by the launcher (the write goes straight to std_h5_writer, as `std-daq demo` does without a
broker, so RabbitMQ's share is not part of the figure). A rate passes when, over the whole step, every
requested image is written with status 0 and no packet is lost. The search doubles the rate from
--start until a step fails, then bisects between the last pass and the first failure.

    python benchmarks/pipeline.py              # steps of 4 s (about a minute in all)
    python benchmarks/pipeline.py --full       # steps of 20 s, the figure to quote

Prints one figure per line: each step's outcome, the highest passing rate, and each process's CPU share
(percent of one core) during that step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import psutil

from core_buffer.config import load_config
from std_daq import status
from std_daq.direct_write import DirectWriteError, write_direct
from std_daq.launcher import Launcher, console_script, pipeline_services, remove_buffers

READY_TIMEOUT_S = 30.0


def free_tcp_base(n: int) -> int:
    import socket

    for base in range(39000, 60000, 50):
        socks = []
        try:
            for k in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + k))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free TCP ports for metrics")


def make_config(workdir: Path) -> Path:
    raw = {
        "detector_name": f"bench{os.getpid()}",
        "detector_type": "jungfrau",
        "n_modules": 1,
        "bit_depth": 16,
        "image_pixel_height": 512,
        "image_pixel_width": 1024,
        "start_udp_port": 52100,
        "frame_buffer_slots": 1000,
        "image_buffer_slots": 2000,
        "stats_interval_s": 5.0,
        "output_dirs": [str(workdir)],
        "metrics": {"host": "127.0.0.1", "base_port": free_tcp_base(12)},
    }
    path = workdir / "bench-jungfrau.json"
    path.write_text(json.dumps(raw))
    return path


def counter(metrics: list[status.ServiceMetrics], label: str, name: str) -> float:
    for m in metrics:
        if m.label == label and m.values:
            return m.values.get(name, 0.0)
    return 0.0


def run_step(config, config_path: Path, launcher: Launcher, rate: float, seconds: float,
             workdir: Path) -> tuple[bool, str, dict[str, float]]:
    n_images = max(1, int(rate * seconds))
    output_file = str(workdir / f"step-{rate:.0f}.h5")
    procs = {c.spec.label: psutil.Process(c.process.pid) for c in launcher.children}
    before_metrics = status.scrape(config)
    sim = subprocess.Popen([console_script("std_udp_sim"), str(config_path), "--rate", str(rate),
                            "--n-images", "forever"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs["std_udp_sim"] = psutil.Process(sim.pid)
    cpu_before = {label: p.cpu_times() for label, p in procs.items()}
    started = time.monotonic()
    try:
        final = write_direct(config, output_file, n_images, timeout_s=seconds * 3 + 20)
        error = final.error or ""
        written = final.n_written
    except DirectWriteError as exc:
        error, written = str(exc), 0
    elapsed = time.monotonic() - started
    cpu = {}
    for label, p in procs.items():
        try:
            t = p.cpu_times()
            cpu[label] = 100.0 * ((t.user + t.system) - (cpu_before[label].user + cpu_before[label].system)) / elapsed
        except psutil.NoSuchProcess:
            cpu[label] = float("nan")
    sim.terminate()
    sim.wait(timeout=10)
    after_metrics = status.scrape(config)
    lost = counter(after_metrics, "std_udp_recv-0", "lost_packets") - counter(before_metrics, "std_udp_recv-0", "lost_packets")
    bad_status = -1
    if os.path.exists(output_file):
        with h5py.File(output_file, "r") as f:
            bad_status = int(np.count_nonzero(f[f"{config.detector_name}/status"][:]))
        os.unlink(output_file)
    ok = not error and written == n_images and lost == 0 and bad_status == 0
    detail = (f"{written}/{n_images} images written, {lost:.0f} packets lost, {bad_status} images with a "
              f"bad status" + (f", error: {error}" if error else ""))
    return ok, detail, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="20 s per step instead of 4 s")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per step (overrides --full)")
    parser.add_argument("--start", type=float, default=100.0, help="first rate in Hz (default 100)")
    parser.add_argument("--max-rate", type=float, default=4000.0, help="stop doubling here (default 4000)")
    parser.add_argument("--bisect", type=int, default=2, help="bisection steps after the first failure")
    parser.add_argument("--dir", default=None, help="directory for the files (default: a temp dir on /tmp's disk)")
    args = parser.parse_args()
    seconds = args.seconds or (20.0 if args.full else 4.0)
    workdir = Path(tempfile.mkdtemp(prefix="std-daq-bench-", dir=args.dir))
    config_path = make_config(workdir)
    config = load_config(config_path)
    specs = [s for s in pipeline_services(str(config_path), config) if s.label != "writer_agent"]
    log = open(workdir / "services.log", "w", buffering=1)
    launcher = Launcher(specs, output=log, cleanup=lambda: remove_buffers(config))
    launcher.start()
    print(f"pipeline benchmark: 1-module Jungfrau, files in {workdir}, load average {os.getloadavg()[0]:.2f}",
          file=sys.stderr)
    print(f"step length: {seconds:g} s" + ("" if seconds >= 20 else
                                          " (a quick run; --full gives 20 s steps, the figure to quote)"))
    best: tuple[float, dict[str, float]] | None = None
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while any(m.values is None for m in status.scrape(config)
                  if m.label in ("std_udp_recv-0", "std_assembler", "std_h5_writer")):
            if time.monotonic() > deadline:
                print(f"services did not come up; see {workdir / 'services.log'}", file=sys.stderr)
                return 1
            time.sleep(0.3)
        passed, failed = 0.0, None
        rate = args.start
        while rate <= args.max_rate:
            ok, detail, cpu = run_step(config, config_path, launcher, rate, seconds, workdir)
            print(f"step {rate:.0f} Hz over {seconds:g} s: {'pass' if ok else 'FAIL'} ({detail})")
            if not ok:
                failed = rate
                break
            passed, best = rate, (rate, cpu)
            rate *= 2
        if failed is not None and passed:
            for _ in range(args.bisect):
                rate = (passed + failed) / 2
                ok, detail, cpu = run_step(config, config_path, launcher, rate, seconds, workdir)
                print(f"step {rate:.0f} Hz over {seconds:g} s: {'pass' if ok else 'FAIL'} ({detail})")
                if ok:
                    passed, best = rate, (rate, cpu)
                else:
                    failed = rate
    finally:
        launcher.stop()
        log.close()
    if best is None:
        print(f"highest lossless rate: none (even {args.start:g} Hz lost images); see {workdir / 'services.log'}")
        return 1
    rate, cpu = best
    print(f"highest lossless rate: {rate:.0f} Hz ({rate * config.image_bytes / 1e9:.2f} GB/s) over {seconds:g} s steps"
          + (" (the doubling reached --max-rate)" if failed is None else ""))
    for label, share in sorted(cpu.items()):
        print(f"cpu {label}: {share:.0f} % of one core")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
