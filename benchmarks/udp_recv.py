"""std_udp_recv on loopback with Jungfrau packets (8240 B).

1. drain: the socket buffer is filled with at least 100k packets while the receiver waits, then the
   receiver alone empties it into the FrameBuffer (frames decoded, placed, committed, pushed);
2. bare: the same fill, emptied by a loop that only receives into one buffer (recvmmsg, and recv_into),
   and the ratio of 1 to it;
3. live: std_udp_sim and std_udp_recv as processes; the highest simulator rate (of those tried) at which
   the receiver loses no packet over --live-seconds (default 10 s per rate).

The receive buffer is forced large enough for the fill with SO_RCVBUFFORCE (needs root; otherwise the
fill is limited by net.core.rmem_max and the figure says how many packets it held).

    python benchmarks/udp_recv.py [--images 800] [--live-rates 500,1000,2000] [--live-seconds 10]
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
from pathlib import Path

import zmq

from core_buffer.config import load_config
from core_buffer.ipc import make_socket, module_frames_address
from core_buffer.ringbuffer import FrameBuffer
from std_udp_recv.batch import BatchReceiver
from std_udp_recv.receiver import UdpReceiver
from std_udp_recv.sim import Simulator

SO_RCVBUFFORCE = 33
PACKET_BYTES = 8240


def make_config(workdir: Path, port: int) -> Path:
    path = workdir / "bench-udp.json"
    path.write_text(json.dumps({
        "detector_name": f"benchudp{os.getpid()}", "detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
        "image_pixel_height": 512, "image_pixel_width": 1024, "start_udp_port": port,
        "frame_buffer_slots": 64, "image_buffer_slots": 4, "stats_interval_s": 1.0}))
    return path


def force_rcvbuf(sock: socket.socket, nbytes: int) -> int:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, nbytes)
    except PermissionError:
        pass
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2


def fill(config, n_images: int, start_id: int) -> int:
    sim = Simulator(config)
    sim.run(0, n_images, start_id)
    sim.close()
    return sim.stats.packets


def drain_receiver(config, n_images: int) -> tuple[int, float, str]:
    receiver = UdpReceiver(config, 0)
    pull = make_socket(zmq.Context.instance(), zmq.PULL, hwm=100000)
    pull.connect(module_frames_address(config, 0))
    force_rcvbuf(receiver.sock, 2**31 - 1)
    time.sleep(0.2)
    try:
        fill(config, n_images, 1)
        start = time.perf_counter()
        last = start
        while True:
            before = receiver.counters.packets
            receiver.poll(0.05)
            if receiver.counters.packets == before:
                break
            last = time.perf_counter()
        return receiver.counters.packets, last - start, receiver.batch.path
    finally:
        pull.close()
        receiver.close()


def drain_bare(config, n_images: int, use_recvmmsg: bool) -> tuple[int, float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    force_rcvbuf(sock, 2**31 - 1)
    sock.bind(("127.0.0.1", config.udp_port(0)))
    batch = BatchReceiver(sock, 64, PACKET_BYTES, use_recvmmsg=use_recvmmsg)
    try:
        fill(config, n_images, 1)
        received = 0
        start = time.perf_counter()
        last = start
        while batch.wait(0.05):
            n = batch.receive()
            received += n
            last = time.perf_counter()
        return received, last - start
    finally:
        sock.close()


def live(config_path: Path, rate: float, seconds: float) -> tuple[int, int, float]:
    """(packets sent, packets lost, receiver CPU %) of one live run."""
    import psutil

    recv = subprocess.Popen(["std_udp_recv", str(config_path), "0", "--stats-interval", "1000"],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc = psutil.Process(recv.pid)
    cpu0 = proc.cpu_times()
    n = int(rate * seconds)
    t0 = time.monotonic()
    sim = subprocess.run(["std_udp_sim", str(config_path), "--rate", str(rate), "--n-images", str(n)],
                         capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    cpu1 = proc.cpu_times()
    recv.terminate()
    _, err = recv.communicate(timeout=30)
    stats = {}
    for line in err.splitlines():
        if " stats " in line:
            stats = dict(kv.split("=") for kv in line.split(" stats ", 1)[1].split())
    sent = n * 128
    lost = sent - int(stats.get("packets", 0))
    cpu = 100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / elapsed
    return sent, lost, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=800, help="images (x128 packets) in the fill (default 800)")
    parser.add_argument("--live-rates", default="500,1000,2000", help="simulator rates to try, Hz")
    parser.add_argument("--live-seconds", type=float, default=10.0)
    args = parser.parse_args()
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]
    workdir = Path(tempfile.mkdtemp(prefix="std-daq-bench-udp-"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config_path = make_config(workdir, port)
    config = load_config(config_path)
    print(f"load average: {os.getloadavg()[0]:.2f}")
    try:
        received, seconds, path = drain_receiver(config, args.images)
        rate = received / seconds
        print(f"fill: {received} packets held ({args.images * 128} sent)")
        print(f"drain ({path}): {rate:.0f} packets/s ({rate * PACKET_BYTES / 1e9:.2f} GB/s)")
        bare_received, bare_seconds = drain_bare(config, args.images, True)
        bare = bare_received / bare_seconds
        print(f"bare recvmmsg loop: {bare:.0f} packets/s ({bare * PACKET_BYTES / 1e9:.2f} GB/s)")
        plain_received, plain_seconds = drain_bare(config, args.images, False)
        plain = plain_received / plain_seconds
        print(f"bare recv_into loop: {plain:.0f} packets/s ({plain * PACKET_BYTES / 1e9:.2f} GB/s)")
        print(f"ratio drain/bare recvmmsg: {rate / bare:.2f}")
        print(f"ratio drain/target 300k: {rate / 300000:.2f}")
        best = 0.0
        for live_rate in (float(r) for r in args.live_rates.split(",")):
            sent, lost, cpu = live(config_path, live_rate, args.live_seconds)
            print(f"live {live_rate:.0f} Hz: {sent} packets sent, {lost} lost, receiver cpu {cpu:.0f} %")
            if lost:
                break
            best = live_rate
        print(f"highest lossless simulator rate: {best:.0f} Hz ({best * 128:.0f} packets/s) over "
              f"{args.live_seconds:g} s" if best else "highest lossless simulator rate: none of those tried")
    finally:
        FrameBuffer.for_config(config).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
