"""The highest frame rate at which a 1-module Jungfrau pipeline on this machine writes every image, against
the simulator's own maximum measured in the same run.

First the simulator alone: std_udp_sim sends as fast as it can for --sim-seconds into a receiver that only
drains (a socket in this process that reads every packet into one buffer and drops it); its images per
second are the ceiling. Then the whole pipeline: std_udp_sim -> std_udp_recv -> std_assembler ->
writer_agent (the write requested over RabbitMQ, as `std-daq write` does) -> std_h5_writer -> HDF5 file
on disk, all real processes started by the launcher, and `ratio pipeline/simulator` is the confirmed
lossless rate over the simulator's maximum (target 0.9). With --compressed the same again with
bitshuffle-LZ4 and --compression-threads threads in the writer. Needs RabbitMQ ($STD_DAQ_BROKER_URL, by
default the local one).

A step at rate R passes when, over the whole step:
- the simulator really sent at R: its own count of images over its running time is at least
  ACHIEVED_FRACTION x R. std_udp_sim sends back to back when it falls behind, so without this check a
  step it could not drive would "pass" at a lower rate. A step it could not drive is "limited by the
  simulator": not a pass, and no rate at or above it is tried;
- the writer kept up: images written per second, from writer_agent's request_progress (one after each
  writer status, every 50 ms) over the second half of the step, is at least ACHIEVED_FRACTION x R. The ring buffers hold seconds of images,
  so a pipeline a little too slow would otherwise still write every image of a short step;
- every requested image is written, with status 0, and the receiver lost no packet.

The search runs short probe steps (doubling from --start up to the simulator's maximum, then bisecting between the highest pass and
the lowest failure), then confirms the highest passing probe with one step of --confirm-seconds (20 s:
the figure to quote; only a long step shows what the disk, not the page cache, sustains). A confirmation
that fails is lowered and run again while the --budget allows it.

    python benchmarks/pipeline.py              # about a minute: probes of 1.5 s, one 20 s confirmation
    python benchmarks/pipeline.py --budget 180 # room for re-confirmations at lower rates
    python benchmarks/pipeline.py --compressed # also bitshuffle-LZ4 (about two minutes)

Prints one figure per line, with its name and unit: the simulator's maximum, each step's outcome, the
confirmed rate with its step length and the search's resolution, its ratio to the simulator's maximum,
and each process's CPU share (percent of one core) over the confirmation step.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import psutil

from core_buffer import broker
from core_buffer.config import load_config
from std_daq import status
from std_daq.client import DaqClient, DaqClientError, progress_of
from std_daq.launcher import Launcher, console_script, pipeline_services, remove_buffers

READY_TIMEOUT_S = 30.0
ACHIEVED_FRACTION = 0.97  # of the asked rate, for the simulator and for the writer
STATUS_INTERVAL_S = 0.05  # the writer's statuses (writer_agent's request_progress follows each one)
STEP_OVERHEAD_S = 2.0  # per step beyond its length: simulator start, write hand-shake, file check
LOWER_FACTOR = 0.85  # a failed confirmation is run again at most at this fraction of its rate
SIM_SUMMARY = re.compile(r"sent (\d+) images, .* in ([\d.]+) s:")
TARGET_RATIO = 0.9  # of the simulator's maximum (the target)


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


def make_config(workdir: Path, compression: str = "none", threads: int = 1) -> Path:
    raw = {
        "detector_name": f"bench{os.getpid()}{'' if compression == 'none' else 'c'}",
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
        "writer": {"status_interval_s": STATUS_INTERVAL_S, "compression": compression,
                   "compression_threads": threads},
        "metrics": {"host": "127.0.0.1", "base_port": free_tcp_base(12)},
    }
    path = workdir / f"bench-jungfrau-{compression}.json"
    path.write_text(json.dumps(raw))
    return path


def counter(metrics: list[status.ServiceMetrics], label: str, name: str) -> float:
    for m in metrics:
        if m.label == label and m.values:
            return m.values.get(name, 0.0)
    return 0.0


PASS, FAIL, SIM_LIMITED = "pass", "FAIL", "limited by the simulator"


@dataclass
class Step:
    rate: float
    seconds: float
    outcome: str = FAIL
    sim_hz: float = 0.0  # what the simulator achieved
    written_hz: float = 0.0  # what the writer achieved between its first and last image
    detail: str = ""
    cpu: dict[str, float] = field(default_factory=dict)  # percent of one core, per process

    def line(self, kind: str) -> str:
        return (f"{kind} {self.rate:.0f} Hz over {self.seconds:g} s: {self.outcome} (simulator "
                f"{self.sim_hz:.0f} Hz achieved, writer {self.written_hz:.0f} Hz, {self.detail})")


def written_rate(records: list[tuple[float, int]]) -> float:
    """Images per second the writer wrote over the second half of the step: the slope of a line through
    its writing statuses from the middle of the step on (the last status, the final one, comes after the
    file is closed and is left out). Not from the first status on: the writer starts behind (it opens the
    file while the first images arrive) and catches up in a burst, which would count as speed."""
    writing = [(t, n) for t, n in records[:-1] if n > 0]
    if len(writing) < 2:
        return 0.0
    middle = (writing[0][0] + writing[-1][0]) / 2
    late = [(t, n) for t, n in writing if t >= middle]
    if len(late) < 2:
        late = writing[-2:]
    times, counts = np.array(late).T
    if times[-1] <= times[0]:
        return 0.0
    return float(np.polyfit(times - times[0], counts, 1)[0])


def simulator_maximum(config_path: Path, config, seconds: float) -> tuple[float, float]:
    """(images/s, CPU share in % of one core) of std_udp_sim sending as fast as it can for `seconds` into
    a receiver that only drains: a socket of this process on the module's port that reads every packet
    into one buffer and drops it (and counts them, so the simulator is seen to reach it)."""
    drain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    drain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)
    drain.bind(("127.0.0.1", config.udp_port(0)))
    drain.settimeout(0.2)
    stopping, received = threading.Event(), [0]

    def drain_packets() -> None:
        buffer = bytearray(65536)
        while not stopping.is_set():
            try:
                drain.recv_into(buffer)
                received[0] += 1
            except TimeoutError:
                pass

    thread = threading.Thread(target=drain_packets, daemon=True)
    thread.start()
    sim = subprocess.Popen([console_script("std_udp_sim"), str(config_path), "--rate", "0", "--n-images",
                            "forever"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        process = psutil.Process(sim.pid)
        time.sleep(seconds)
        times = process.cpu_times()
        cpu = 100.0 * (times.user + times.system) / (time.time() - process.create_time())
    finally:
        sim.terminate()
        output, _ = sim.communicate(timeout=10)
        stopping.set()
        thread.join(timeout=5)
        drain.close()
    match = SIM_SUMMARY.search(output)
    if not match or float(match.group(2)) <= 0 or received[0] == 0:
        raise RuntimeError(f"no simulator maximum: {output.strip()[-300:]!r}, {received[0]} packets drained")
    return int(match.group(1)) / float(match.group(2)), cpu


def run_step(config, config_path: Path, launcher: Launcher, client: DaqClient, rate: float, seconds: float,
             workdir: Path) -> Step:
    step = Step(rate, seconds)
    n_images = max(2, int(rate * seconds))
    output_file = str(workdir / f"step-{rate:.0f}.h5")
    procs = {c.spec.label: psutil.Process(c.process.pid) for c in launcher.children}
    before_metrics = status.scrape(config)
    sim = subprocess.Popen([console_script("std_udp_sim"), str(config_path), "--rate", str(rate),
                            "--n-images", "forever"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    procs["std_udp_sim"] = psutil.Process(sim.pid)
    procs["the benchmark (requests over RabbitMQ)"] = psutil.Process()
    cpu_before = {label: p.cpu_times() for label, p in procs.items()}
    records: list[tuple[float, int]] = []

    def on_status(message) -> None:
        if message.action == broker.REQUEST_PROGRESS:
            records.append((time.monotonic(), progress_of(message)[0]))

    started = time.monotonic()
    written = 0
    try:
        result = client.write(output_file, n_images, tag=config.detector_name, timeout_s=seconds * 3 + 20,
                              on_status=on_status)
        error = "" if result.ok else result.message
        written = result.n_written
        records.append((time.monotonic(), written))  # the final one (left out of the rate)
    except DaqClientError as exc:
        error = str(exc)
    elapsed = time.monotonic() - started
    for label, p in procs.items():
        try:
            t = p.cpu_times()
            step.cpu[label] = 100.0 * ((t.user + t.system) - (cpu_before[label].user + cpu_before[label].system)) / elapsed
        except psutil.NoSuchProcess:
            step.cpu[label] = float("nan")
    sim.terminate()
    sim_output, _ = sim.communicate(timeout=10)
    match = SIM_SUMMARY.search(sim_output)
    if match and float(match.group(2)) > 0:
        step.sim_hz = int(match.group(1)) / float(match.group(2))
    else:  # not a simulator limit: we cannot tell what it sent
        error = error or f"no summary line from std_udp_sim: {sim_output.strip()[-300:]!r}"
    step.written_hz = written_rate(records)
    after_metrics = status.scrape(config)
    lost = counter(after_metrics, "std_udp_recv-0", "lost_packets") - counter(before_metrics, "std_udp_recv-0", "lost_packets")
    bad_status = -1
    if os.path.exists(output_file):
        with h5py.File(output_file, "r") as f:
            bad_status = int(np.count_nonzero(f[f"{config.detector_name}/status"][:]))
        os.unlink(output_file)
    step.detail = (f"{written}/{n_images} images written, {lost:.0f} packets lost, {bad_status} images with a "
                   f"bad status" + (f", error: {error}" if error else ""))
    if match and step.sim_hz < ACHIEVED_FRACTION * rate:
        step.outcome = SIM_LIMITED
    elif (not error and written == n_images and lost == 0 and bad_status == 0
          and step.written_hz >= ACHIEVED_FRACTION * rate):
        step.outcome = PASS
    return step


def search(run, args, cap: float) -> tuple[float | None, float | None, str]:
    """Probes, doubling from --start, then at `cap` (the simulator's maximum: no higher rate can pass),
    then bisecting: (highest pass, lowest non-pass, and what that non-pass was)."""
    passed, above, above_outcome = None, None, ""
    rate = min(args.start, cap)
    while True:
        step = run(rate, args.probe_seconds, "probe")
        if step.outcome != PASS:
            above, above_outcome = rate, step.outcome
            break
        passed = rate
        if rate >= cap:
            break
        rate = min(rate * 2, cap)
    low = passed if passed is not None else 0.0
    if above is not None:
        for _ in range(args.bisect):
            rate = (low + above) / 2
            if rate < 1:
                break
            step = run(rate, args.probe_seconds, "probe")
            if step.outcome == PASS:
                passed = low = rate
            else:
                above, above_outcome = rate, step.outcome
    return passed, above, above_outcome


def benchmark_pipeline(args, workdir: Path, compression: str, sim_max: float) -> bool:
    """Search and confirm the highest lossless rate of one configuration; prints its lines. Whether a rate
    was confirmed. The budget counts from here (services' start and stop included)."""
    began = time.monotonic()
    threads = args.compression_threads if compression != "none" else 1
    config_path = make_config(workdir, compression, threads)
    config = load_config(config_path)
    name = "" if compression == "none" else f" {compression} ({threads} compression threads)"
    specs = pipeline_services(str(config_path), config)
    log = open(workdir / f"services-{compression}.log", "w", buffering=1)
    launcher = Launcher(specs, output=log, cleanup=lambda: remove_buffers(config))
    launcher.start()
    client: DaqClient | None = None
    print(f"pipeline{name}: 1-module Jungfrau, files in {workdir}, load average {os.getloadavg()[0]:.2f}",
          file=sys.stderr)

    def run(rate: float, seconds: float, kind: str) -> Step:
        step = run_step(config, config_path, launcher, client, rate, seconds, workdir)
        print(step.line(f"{kind}{name}"), flush=True)
        return step

    confirmed: Step | None = None
    tried: list[Step] = []
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while any(m.values is None for m in status.scrape(config)):
            if time.monotonic() > deadline:
                print(f"services did not come up; see {workdir / log.name}", file=sys.stderr)
                return False
            time.sleep(0.3)
        client = DaqClient()
        print(f"services up after {time.monotonic() - began:.1f} s", file=sys.stderr)
        passed, above, above_outcome = search(run, args, sim_max)
        if passed is None:
            print(f"highest passing probe{name}: none ({min(args.start, sim_max):.0f} Hz: {above_outcome}); "
                  f"see {workdir / log.name}")
            return False
        print(f"highest passing probe{name}: {passed:.0f} Hz")
        if above is None:
            print(f"search resolution{name}: none (every probe passed, up to the simulator's maximum)")
        else:
            print(f"search resolution{name}: {above - passed:.0f} Hz (next probe up, {above:.0f} Hz: {above_outcome})")
        rate = passed
        while True:
            step = run(rate, args.confirm_seconds, "confirm")
            tried.append(step)
            if step.outcome == PASS:
                confirmed = step
                break
            lowered = LOWER_FACTOR * rate
            if step.outcome == FAIL and step.written_hz > 0:
                lowered = min(lowered, ACHIEVED_FRACTION * step.written_hz)  # what the writer did sustain
            left = args.budget - (time.monotonic() - began)
            if left < args.confirm_seconds + STEP_OVERHEAD_S:
                print(f"re-confirmation{name} at {lowered:.0f} Hz: not run, {left:.0f} s of the {args.budget:g} s "
                      "budget left (--budget for more)")
                break
            rate = lowered
    finally:
        stopping = time.monotonic()
        if client is not None:
            client.close()
        launcher.stop()
        log.close()
        print(f"services stopped in {time.monotonic() - stopping:.1f} s", file=sys.stderr)
    if confirmed is None:
        print(f"confirmed lossless rate{name}: none (confirmation failed at "
              f"{', '.join(f'{s.rate:.0f}' for s in tried)} Hz)")
        print(f"ratio pipeline/simulator{name}: 0.00 (target {TARGET_RATIO})")
        for label, share in sorted(tried[-1].cpu.items() if tried else ()):
            print(f"cpu{name} {label} over the failed confirmation step: {share:.0f} % of one core")
        return False
    print(f"confirmed lossless rate{name}: {confirmed.rate:.0f} Hz over a {confirmed.seconds:g} s step "
          f"({confirmed.rate * config.image_bytes / 1e9:.2f} GB/s)")
    ratio = confirmed.rate / sim_max
    print(f"ratio pipeline/simulator{name}: {ratio:.2f} ({confirmed.rate:.0f} Hz of {sim_max:.0f} Hz; "
          f"target {TARGET_RATIO}: {ratio / TARGET_RATIO:.2f} of it)")
    for label, share in sorted(confirmed.cpu.items()):
        print(f"cpu{name} {label} over the confirmation step: {share:.0f} % of one core")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe-seconds", type=float, default=1.5, help="length of a search step (default 1.5)")
    parser.add_argument("--confirm-seconds", type=float, default=20.0,
                        help="length of the confirmation step (default 20, what the figure needs)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds for each configuration, services' start and stop included; a failed "
                             "confirmation is re-run at a lower rate only while they allow it (default 60)")
    parser.add_argument("--start", type=float, default=500.0, help="first rate in Hz (default 500)")
    parser.add_argument("--bisect", type=int, default=3, help="bisection steps after the first failure (default 3)")
    parser.add_argument("--sim-seconds", type=float, default=3.0,
                        help="how long the simulator alone sends as fast as it can (default 3)")
    parser.add_argument("--compressed", action="store_true", help="also the pipeline with bitshuffle-LZ4")
    parser.add_argument("--compression-threads", type=int, default=2,
                        help="the writer's compression threads with --compressed (default 2)")
    parser.add_argument("--dir", default=None, help="directory for the files (default: a temp dir on /tmp's disk)")
    args = parser.parse_args()
    began = time.monotonic() - (time.time() - psutil.Process().create_time())
    workdir = Path(tempfile.mkdtemp(prefix="std-daq-bench-", dir=args.dir))
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(f"probe step length: {args.probe_seconds:g} s")
    print(f"confirmation step length: {args.confirm_seconds:g} s"
          + ("" if args.confirm_seconds >= 20 else " (under 20 s: not the figure to quote)"))
    ok = False
    try:
        sim_path = make_config(workdir)
        sim_max, sim_cpu = simulator_maximum(sim_path, load_config(sim_path), args.sim_seconds)
        print(f"simulator maximum (into a receiver that only drains, {args.sim_seconds:g} s): {sim_max:.0f} Hz "
              f"({sim_max * load_config(sim_path).image_bytes / 1e9:.2f} GB/s), std_udp_sim at {sim_cpu:.0f} % "
              "of one core")
        ok = True
        for compression in ("none", "bitshuffle-lz4") if args.compressed else ("none",):
            ok = benchmark_pipeline(args, workdir, compression, sim_max) and ok
    except BaseException:
        ok = False
        raise
    finally:
        for leftover in workdir.glob("step-*.h5"):
            leftover.unlink()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"the services' logs and configs are kept in {workdir}", file=sys.stderr)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"benchmark duration: {time.monotonic() - began:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
