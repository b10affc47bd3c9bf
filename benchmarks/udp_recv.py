"""std_udp_recv on loopback with Jungfrau packets (8240 B).

1. drain: the socket buffer is filled with at least 100k packets while the receiver waits, then the
   receiver alone empties it into the FrameBuffer (frames checked, placed, committed, pushed); with the
   default batch (128, one Jungfrau frame per call), with 64, and on the recv_into fallback path;
2. bare: the same fill, emptied by a loop that only receives into one set of buffers (recvmmsg with
   the drain's batch of 128, and recv_into), and the ratio of 1 to it (like with like: same batch);
3. live: std_udp_sim and std_udp_recv as processes; simulator rates are tried downward, highest first,
   and the first one at which the receiver loses no packet is reported (the highest lossless rate tried), with the rate the simulator really achieved (a
   Python sender may fall short of what it was asked for). Each run sends rate x --live-seconds images,
   so the sending itself lasts at least --live-seconds (longer if the simulator falls short); the time
   the simulator took to start is not part of it.

The fill's receive buffer is forced large with SO_RCVBUFFORCE (needs root or CAP_NET_ADMIN; otherwise
the fill is capped by net.core.rmem_max and the benchmark warns). The live receiver asks for its own
buffer as configured (udp_recv.rcvbuf_bytes, 256 MiB), which it also gets only with SO_RCVBUFFORCE or a
raised net.core.rmem_max: the live figure depends on it.

Run it under the machine's benchmark lock:

    flock /tmp/std-daq-heavy.lock .venv/bin/python benchmarks/udp_recv.py [--images 800]
        [--live-rates 500,1000,2000,3000] [--live-seconds 10] [--long]

The default run takes about 35 s (--no-live: about 20 s; usually one live run, as the receiver keeps up
with the fastest the simulator sends on a 2-core machine); --long tries more rates for 30 s each.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from core_buffer.config import load_config
from core_buffer.ipc import make_socket, module_frames_address
from core_buffer.ringbuffer import FrameBuffer
from std_udp_recv.batch import BatchReceiver
from std_udp_recv.receiver import SO_RCVBUFFORCE, UdpReceiver
from std_udp_recv.sim import Simulator

PACKET_BYTES = 8240
HEADER_BYTES = 48
PACKETS_PER_IMAGE = 128
MIN_FILL = 100_000
BARE_BATCH = 128  # the drain's default batch: the ratio compares like with like
LONG_RATES = "500,1000,1500,2000,2500,3000,4000"


def make_config(workdir: Path, port: int, **udp_recv) -> Path:
    path = workdir / f"bench-udp-{len(list(workdir.iterdir()))}.json"
    path.write_text(json.dumps({
        "detector_name": f"benchudp{os.getpid()}", "detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
        "image_pixel_height": 512, "image_pixel_width": 1024, "start_udp_port": port,
        "frame_buffer_slots": 64, "image_buffer_slots": 4, "stats_interval_s": 1.0, "stats_log": "keyvalue",
        "udp_recv": udp_recv}))
    return path


def force_rcvbuf(sock: socket.socket, nbytes: int) -> int:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, nbytes)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, nbytes)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2


def fill(config, n_images: int, start_id: int) -> int:
    sim = Simulator(config)
    sim.run(0, n_images, start_id)
    sim.close()
    return sim.stats.packets


def drain_receiver(config, n_images: int, repeats: int) -> tuple[list[int], list[float], str]:
    """Fill, then drain with the receiver alone, `repeats` times: (packets held, seconds) per run."""
    receiver = UdpReceiver(config, 0)
    pull = make_socket(zmq.Context.instance(), zmq.PULL, hwm=1000000)
    pull.connect(module_frames_address(config, 0))
    force_rcvbuf(receiver.sock, 2**30)
    time.sleep(0.2)
    held, seconds = [], []
    try:
        for run in range(repeats):
            fill(config, n_images, 1 + run * n_images)
            before_run = receiver.counters.packets
            start = last = time.perf_counter()
            while True:
                before = receiver.counters.packets
                receiver.poll(0.05)
                if receiver.counters.packets == before:
                    break
                last = time.perf_counter()
            held.append(receiver.counters.packets - before_run)
            seconds.append(last - start)
            while pull.poll(0):  # what the assembler would have taken
                pull.recv()
        return held, seconds, receiver.batch.path
    finally:
        pull.close()
        receiver.close()


def drain_bare(config, n_images: int, use_recvmmsg: bool, repeats: int, batch_size: int) -> list[float]:
    """Packets/s of a loop that only receives (`batch_size` per call, all into the same buffers), per fill."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    force_rcvbuf(sock, 2**30)
    sock.bind(("127.0.0.1", config.udp_port(0)))
    batch = BatchReceiver(sock, batch_size, HEADER_BYTES, PACKET_BYTES - HEADER_BYTES, PACKET_BYTES,
                          use_recvmmsg=use_recvmmsg)
    rates = []
    try:
        for _ in range(repeats):
            fill(config, n_images, 1)
            received = 0
            start = last = time.perf_counter()
            while batch.wait(0.05):
                received += batch.receive(batch.batch)
                last = time.perf_counter()
            rates.append(received / (last - start))
        return sorted(rates)
    finally:
        sock.close()


def live(config_path: Path, rate: float, seconds: float) -> dict:
    """One live run of rate x `seconds` images: packets sent and lost, the simulator's achieved rate and
    sending time, the receiver's CPU (over the sending time) and buffer."""
    import psutil

    recv = subprocess.Popen(["std_udp_recv", str(config_path), "0", "--stats-interval", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc = psutil.Process(recv.pid)
    cpu0 = proc.cpu_times()
    n_images = math.ceil(rate * seconds) + 1  # the first image at 0 s, the last at `seconds` or later
    # The simulator sends all of them (its start-up is not part of the sending time it reports); a
    # simulator that falls short of the rate sends for longer.
    sim = subprocess.run(["std_udp_sim", str(config_path), "--rate", str(rate), "--n-images", str(n_images)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=10 * seconds + 60)
    sim_out = sim.stdout
    time.sleep(0.5)
    cpu1 = proc.cpu_times()
    recv.terminate()
    _, err = recv.communicate(timeout=30)
    stats, rcvbuf, path = {}, "?", "?"
    for line in err.splitlines():
        if " stats " in line:
            stats = dict(kv.split("=", 1) for kv in line.split(" stats ", 1)[1].split())
        elif "UDP receive buffer" in line:
            found = re.search(r"(granted )?(\d+) MiB.*?\((SO_RCVBUF\w*)\)", line)
            rcvbuf = f"{found.group(2)} MiB via {found.group(3)}" if found else line
        elif "listening on" in line:
            found = re.search(r"\((\w+), batches of (\d+)\)", line)
            path = f"{found.group(1)}, batch {found.group(2)}" if found else "?"
    sent = re.search(r"sent \d+ images, (\d+) packets", sim_out)
    achieved = re.search(r"in ([\d.]+) s: ([\d.]+) images/s achieved", sim_out)
    if not sent or not achieved:
        raise RuntimeError(f"std_udp_sim said: {sim_out!r}")
    n_sent, sending_s = int(sent.group(1)), float(achieved.group(1))
    return {"sent": n_sent, "lost": n_sent - int(stats.get("packets", 0)), "achieved_hz": float(achieved.group(2)),
            "seconds": sending_s,
            "cpu": 100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / max(sending_s, 1e-9),
            "rcvbuf": rcvbuf, "path": path}


def gbps(packets_per_s: float) -> float:
    return packets_per_s * PACKET_BYTES / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=800, help="images (x128 packets) in the fill (default 800)")
    parser.add_argument("--live-rates", default=None, help="simulator rates to try upward, Hz "
                        "(default 500,1000,2000,3000; with --long " + LONG_RATES + ")")
    parser.add_argument("--live-seconds", type=float, default=None, help="seconds per rate (default 10; --long 30)")
    parser.add_argument("--long", action="store_true", help="more rates, longer runs")
    parser.add_argument("--repeats", type=int, default=3, help="drains per receiver setting (default 3): the "
                        "machine is shared, so the median and the best are printed")
    parser.add_argument("--no-live", action="store_true", help="only the drain and bare figures")
    args = parser.parse_args()
    live_rates = [float(r) for r in (args.live_rates or (LONG_RATES if args.long else "500,1000,2000,3000")).split(",")]
    live_seconds = args.live_seconds or (30.0 if args.long else 10.0)
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]
    workdir = Path(tempfile.mkdtemp(prefix="std-daq-bench-udp-"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    configs = {name: load_config(make_config(workdir, port, **udp))
               for name, udp in (("batch 128", {}), ("batch 64", {"batch": 64}), ("recv_into", {"recvmmsg": False}))}
    config = configs["batch 128"]
    print(f"load average: {os.getloadavg()[0]:.2f}")
    try:
        # Untimed: the first fill and drain of a run measured up to a third slower, whatever came first
        # (the kernel's first allocation of ~1.5 GB of socket buffers).
        drain_receiver(config, args.images, 1)
        drain = {}
        for name, cfg in configs.items():
            held, seconds, path = drain_receiver(cfg, args.images, args.repeats)
            runs = sorted(h / s for h, s in zip(held, seconds))
            drain[name] = median = runs[len(runs) // 2]
            label = f"{path}, batch {cfg.section('udp_recv').raw('batch', 128)}" if path == "recvmmsg" else path
            print(f"drain ({label}), median of {len(runs)}: {median:.0f} packets/s ({gbps(median):.2f} GB/s)")
            print(f"drain ({label}), best of {len(runs)}: {runs[-1]:.0f} packets/s ({gbps(runs[-1]):.2f} GB/s)")
            print(f"fill ({label}), fewest packets held: {min(held)} packets")
            if min(held) < MIN_FILL:
                print(f"WARNING: a fill held only {min(held)} packets (< {MIN_FILL}): the socket buffer is too "
                      f"small (net.core.rmem_max without root) or packets were dropped; drain figures are less "
                      f"reliable")
        for use_recvmmsg in (True, False):
            runs = drain_bare(config, args.images, use_recvmmsg, args.repeats, BARE_BATCH)
            median = runs[len(runs) // 2]
            name = f"recvmmsg, batch {BARE_BATCH}" if use_recvmmsg else "recv_into"
            print(f"bare loop ({name}), median of {len(runs)}: {median:.0f} packets/s ({gbps(median):.2f} GB/s)")
            if use_recvmmsg:
                bare = median
        best = drain["batch 128"]
        print(f"ratio drain (recvmmsg, batch 128, median) / bare loop (recvmmsg, batch {BARE_BATCH}, median): "
              f"{best / bare:.2f}")
        print(f"ratio drain (recvmmsg, batch 128, median) / target 300k packets/s: {best / 300000:.2f}")
        if args.no_live:
            return 0
        config_path = make_config(workdir, port)
        lossless, sim_bound = None, False
        for live_rate in sorted(live_rates, reverse=True):  # the first lossless one is the highest
            run = live(config_path, live_rate, live_seconds)
            print(f"live {live_rate:.0f} Hz asked, {run['achieved_hz']:.0f} Hz achieved by the simulator over "
                  f"{run['seconds']:.1f} s: {run['sent']} packets sent, {run['lost']} lost, receiver cpu {run['cpu']:.0f} % "
                  f"({run['path']}, receive buffer {run['rcvbuf']})")
            if run["lost"]:
                continue
            lossless = (live_rate, run["achieved_hz"])
            if run["achieved_hz"] < 0.9 * live_rate:
                print(f"live: the simulator tops out at about {run['achieved_hz']:.0f} Hz on this machine; higher "
                      f"rates would measure the simulator, not the receiver")
                sim_bound = True
            break
        if lossless:
            print(f"highest lossless live rate: {lossless[1]:.0f} Hz achieved ({lossless[1] * PACKETS_PER_IMAGE:.0f} "
                  f"packets/s; {lossless[0]:.0f} Hz asked) over at least {live_seconds:g} s of sending"
                  + (", limited by the simulator" if sim_bound else ""))
        else:
            print("highest lossless live rate: none of those tried")
    finally:
        FrameBuffer.for_config(config).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
