"""The highest frame rate at which a 1-module Jungfrau pipeline on this machine writes every image.

Simulator -> std_udp_recv -> std_assembler -> std_h5_writer -> HDF5 file on disk, all real processes
started by the launcher. The benchmark itself plays writer_agent: the write goes straight to
std_h5_writer over the StoreStream (as `std-daq demo` does without a broker), so RabbitMQ's share is not
part of the figure, but the forwarding of every image is, in this process.

A step at rate R passes when, over the whole step:
- the simulator really sent at R: its own count of images over its running time is at least
  ACHIEVED_FRACTION x R. std_udp_sim sends back to back when it falls behind, so without this check a
  step it could not drive would "pass" at a lower rate. A step it could not drive is "limited by the
  simulator": not a pass, and no rate at or above it is tried;
- the writer kept up: images written per second, from the writer's statuses (every 50 ms) over the
  second half of the step, is at least ACHIEVED_FRACTION x R. The ring buffers hold seconds of images,
  so a pipeline a little too slow would otherwise still write every image of a short step;
- every requested image is written, with status 0, and the receiver lost no packet.

The search runs short probe steps (doubling from --start, then bisecting between the highest pass and
the lowest failure), then confirms the highest passing probe with one step of --confirm-seconds (20 s:
the figure to quote; only a long step shows what the disk, not the page cache, sustains). A confirmation
that fails is lowered and run again while the --budget allows it.

    python benchmarks/pipeline.py              # about a minute: probes of 1.5 s, one 20 s confirmation
    python benchmarks/pipeline.py --budget 180 # room for re-confirmations at lower rates

Prints one figure per line, with its name and unit: each step's outcome, the confirmed rate with its
step length and the search's resolution, and each process's CPU share (percent of one core) over the
confirmation step.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import psutil

from core_buffer.config import load_config
from std_daq import status
from std_daq.direct_write import DirectWriteError, write_direct
from std_daq.launcher import Launcher, console_script, pipeline_services, remove_buffers

READY_TIMEOUT_S = 30.0
ACHIEVED_FRACTION = 0.97  # of the asked rate, for the simulator and for the writer
STATUS_INTERVAL_S = 0.05  # the writer's statuses, from which its rate is measured
STEP_OVERHEAD_S = 2.0  # per step beyond its length: simulator start, write hand-shake, file check
LOWER_FACTOR = 0.85  # a failed confirmation is run again at most at this fraction of its rate
SIM_SUMMARY = re.compile(r"sent (\d+) images, .* in ([\d.]+) s:")


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
        "writer": {"status_interval_s": STATUS_INTERVAL_S},
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


def run_step(config, config_path: Path, launcher: Launcher, rate: float, seconds: float,
             workdir: Path) -> Step:
    step = Step(rate, seconds)
    n_images = max(2, int(rate * seconds))
    output_file = str(workdir / f"step-{rate:.0f}.h5")
    procs = {c.spec.label: psutil.Process(c.process.pid) for c in launcher.children}
    procs["writer_agent (this benchmark, direct write)"] = psutil.Process()
    before_metrics = status.scrape(config)
    sim = subprocess.Popen([console_script("std_udp_sim"), str(config_path), "--rate", str(rate),
                            "--n-images", "forever"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    procs["std_udp_sim"] = psutil.Process(sim.pid)
    cpu_before = {label: p.cpu_times() for label, p in procs.items()}
    records: list[tuple[float, int]] = []
    started = time.monotonic()
    try:
        final = write_direct(config, output_file, n_images, timeout_s=seconds * 3 + 20,
                             progress=lambda done, _total: records.append((time.monotonic(), done)))
        error = final.error or ""
        written = final.n_written
    except DirectWriteError as exc:
        error, written = str(exc), 0
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


def search(run, args) -> tuple[float | None, float | None, str]:
    """Probes: (highest pass, lowest non-pass, and what that non-pass was)."""
    passed, above, above_outcome = None, None, ""
    rate = args.start
    while rate <= args.max_rate:
        step = run(rate, args.probe_seconds, "probe")
        if step.outcome != PASS:
            above, above_outcome = rate, step.outcome
            break
        passed = rate
        rate *= 2
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe-seconds", type=float, default=1.5, help="length of a search step (default 1.5)")
    parser.add_argument("--confirm-seconds", type=float, default=20.0,
                        help="length of the confirmation step (default 20, what the figure needs)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds for the whole run; a failed confirmation is re-run at a lower rate only "
                             "while they allow it (default 60)")
    parser.add_argument("--start", type=float, default=250.0, help="first rate in Hz (default 250)")
    parser.add_argument("--max-rate", type=float, default=4000.0, help="stop doubling here (default 4000)")
    parser.add_argument("--bisect", type=int, default=3, help="bisection steps after the first failure (default 3)")
    parser.add_argument("--dir", default=None, help="directory for the files (default: a temp dir on /tmp's disk)")
    args = parser.parse_args()
    # The budget counts from the process's start (imports, services' start-up and stop included).
    began = time.monotonic() - (time.time() - psutil.Process().create_time())
    workdir = Path(tempfile.mkdtemp(prefix="std-daq-bench-", dir=args.dir))
    config_path = make_config(workdir)
    config = load_config(config_path)
    specs = [s for s in pipeline_services(str(config_path), config) if s.label != "writer_agent"]
    log = open(workdir / "services.log", "w", buffering=1)
    launcher = Launcher(specs, output=log, cleanup=lambda: remove_buffers(config))
    launcher.start()
    print(f"pipeline benchmark: 1-module Jungfrau, files in {workdir}, load average {os.getloadavg()[0]:.2f}",
          file=sys.stderr)
    print(f"probe step length: {args.probe_seconds:g} s")
    print(f"confirmation step length: {args.confirm_seconds:g} s"
          + ("" if args.confirm_seconds >= 20 else " (under 20 s: not the figure to quote)"))

    def run(rate: float, seconds: float, kind: str) -> Step:
        step = run_step(config, config_path, launcher, rate, seconds, workdir)
        print(step.line(kind), flush=True)
        return step

    confirmed: Step | None = None
    tried: list[Step] = []
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while any(m.values is None for m in status.scrape(config)
                  if m.label in ("std_udp_recv-0", "std_assembler", "std_h5_writer")):
            if time.monotonic() > deadline:
                print(f"services did not come up; see {workdir / 'services.log'}", file=sys.stderr)
                return 1
            time.sleep(0.3)
        print(f"services up after {time.monotonic() - began:.1f} s", file=sys.stderr)
        passed, above, above_outcome = search(run, args)
        print(f"search done after {time.monotonic() - began:.1f} s", file=sys.stderr)
        if passed is None:
            print(f"highest passing probe: none ({args.start:g} Hz: {above_outcome}); see {workdir / 'services.log'}")
            return 1
        print(f"highest passing probe: {passed:.0f} Hz")
        if above is None:
            print(f"search resolution: none (every probe passed up to --max-rate {args.max_rate:g} Hz)")
        else:
            print(f"search resolution: {above - passed:.0f} Hz (next probe up, {above:.0f} Hz: {above_outcome})")
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
                print(f"re-confirmation at {lowered:.0f} Hz: not run, {left:.0f} s of the {args.budget:g} s "
                      "budget left (--budget for more)")
                break
            rate = lowered
    finally:
        stopping = time.monotonic()
        launcher.stop()
        log.close()
        print(f"services stopped in {time.monotonic() - stopping:.1f} s", file=sys.stderr)
    if confirmed is None:
        print(f"confirmed lossless rate: none (confirmation failed at {', '.join(f'{s.rate:.0f}' for s in tried)} Hz)")
        print(f"benchmark duration: {time.monotonic() - began:.0f} s")
        return 1
    print(f"confirmed lossless rate: {confirmed.rate:.0f} Hz over a {confirmed.seconds:g} s step "
          f"({confirmed.rate * config.image_bytes / 1e9:.2f} GB/s)")
    for label, share in sorted(confirmed.cpu.items()):
        print(f"cpu {label} over the confirmation step: {share:.0f} % of one core")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    print(f"benchmark duration: {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
