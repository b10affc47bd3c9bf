"""Replication throughput: std_stream_send -> ZMQ TCP loopback -> std_stream_recv -> replica ImageBuffer,
against bare ZMQ moving the same bytes, for 1 MiB and 4 MiB uint16 images:

    flock /tmp/std-daq-heavy.lock python benchmarks/stream.py [--rounds 5] [--round-seconds 1] [--window 32]

Both services run as their own processes (the console scripts). The benchmark plays std_assembler: the
images sit in a real ImageBuffer, and it publishes their ImageMetadata, keeping at most --window images
between "published" and "seen on the replica's metadata stream", so nothing is dropped.

Bare ZMQ, in the same run: a PUSH in this process sends zero-copy to a PULL in another process, which
receives with recv_into. Everything around the bytes that is not the services' own work is set as the
services set it, so the reference is the best bare ZMQ does, not a handicapped one: the receiver tunes
glibc's malloc exactly as std_stream_recv does (the sender service tunes nothing, nor does the bare
sender), both sockets have the services' queue of QUEUE images as high-water mark, neither sets kernel
buffer sizes (neither service does), the header goes as a copy and the image zero-copy (untracked: the
tracker is the services' work), and the image is received into a preallocated buffer. Two references:
- "bare zmq same bytes" (the headline ratio): the bytes the services move, minus the services: the header
  and the image from the source ImageBuffer's slots in turn, received into as many slots as the replica
  has. This is the issue's "bare ZMQ sends of the same bytes", and the fair reference: the services, too,
  stream 128 slots (128 MiB at 1 MiB, 512 MiB at 4 MiB) through memory on each side, so every image is
  read from and written to memory that is cold in the CPU caches.
- "bare zmq same bytes from slot frames" (secondary): the same, but the image frames are made once per
  slot and sent again (as std_stream_send sends all but its marker images) instead of a new zero-copy
  frame per message, which pyzmq makes known to its garbage-collector thread (a wake of that Python
  thread per message). It shows what that pyzmq cost is worth to bare ZMQ itself.
- "bare zmq one hot buffer" (secondary): one 1-frame buffer sent again and again and received into one
  buffer. Both buffers stay in the caches, which a stream through ring buffers of that size never has;
  it shows what TCP loopback itself can do on this machine, and is not the target's reference.
The machine is shared, so the measurements alternate in short rounds (replication, one hot buffer, same
bytes, same bytes from slot frames, again) and each figure is the median over the rounds. Alongside: CPU time per image (or message)
of each process, and the load other processes put on the machine meanwhile (figures taken under load are
noise). One figure per line: name, size, value, unit.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import zmq

from core_buffer.config import DetectorConfig, load_config
from core_buffer.formats import ImageMetadata
from core_buffer.ipc import image_metadata_address, ipc_path, make_socket
from core_buffer.ringbuffer import ImageBuffer, unlink

BIN = os.path.dirname(sys.executable)
SIZES = {"1 MiB": 1, "4 MiB": 4}  # Jungfrau modules of 512x1024 uint16
SLOTS = 128
QUEUE = 64  # send and receive queues, in images (above --window, so nothing is dropped)
# Both bare sockets queue as many images as the services may (sender: queue_images; receiver: the same
# in images, its HWM of 2 * queue_images counting a verdict per image). 16, 64 and the services' exact
# figures (4160 / 128 messages) gave the same rates within noise.
BARE_HWM = QUEUE
START_S = 1.5  # for the services to create their buffers, bind and connect
TICK = os.sysconf("SC_CLK_TCK")
ROUND = struct.Struct("<qq")  # bare receiver control message: messages in the round, same-slots flag
# What each line of the output is about.
REPLICATION = "replication"
SAME_BYTES = "bare zmq same bytes"  # the headline reference: header + image from the source slots in turn
SLOT_FRAMES = "bare zmq same bytes from slot frames"  # secondary: the same, from frames made once per slot
ONE_HOT_BUFFER = "bare zmq one hot buffer"  # secondary: one buffer, in the caches

BARE_RECEIVER = """
import ctypes, ctypes.util, struct, sys, time, zmq, numpy as np
# std_stream_recv's malloc tuning, the same calls (std_stream_recv.receiver.keep_message_buffers, which its
# daemon runs before it creates a socket): glibc keeps freed ZMQ message buffers instead of handing every
# one back to the kernel, so each message is not received into freshly faulted pages. Without it this
# receiver spent ~25 % more CPU per 1 MiB message than the service and the reference was a weak one.
# Unlike the service, a failure here stops the benchmark: an untuned reference would go unnoticed.
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
if libc.mallopt(m_mmap_threshold, 32 << 20) != 1 or libc.mallopt(m_trim_threshold, 1 << 30) != 1:
    sys.exit("mallopt failed: the bare receiver would not be tuned as std_stream_recv is")
pull = zmq.Context().socket(zmq.PULL)
pull.setsockopt(zmq.RCVHWM, int(sys.argv[4]))
pull.bind(sys.argv[1])
size, slots = int(sys.argv[2]), int(sys.argv[3])
one = np.ones(size, np.uint8)
ring = np.ones((slots, size), np.uint8)  # as large as the replica's ImageBuffer, pages faulted in
while True:
    n, same_slots = struct.unpack("<qq", pull.recv())
    if n == 0:
        break
    for i in range(n):
        if same_slots:
            pull.recv()
            pull.recv_into(ring[i % slots])
        else:
            pull.recv_into(one)
        if i == 0:
            t0 = time.perf_counter()
    print(time.perf_counter() - t0, flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / TICK


class CpuMeter:
    """CPU seconds of named processes over the rounds, and what every other process used meanwhile."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.used: dict[str, float] = defaultdict(float)
        self.others = self.wall = 0.0

    def __enter__(self) -> CpuMeter:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._busy, self._t = busy_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        ours = 0.0
        for name, pid in self.pids.items():
            used = cpu_seconds(pid) - self._start[name]
            self.used[name] += used
            ours += used
        self.others += busy_seconds() - self._busy - ours
        self.wall += time.monotonic() - self._t


def write_config(workdir: str, name: str, modules: int, **extra) -> str:
    path = os.path.join(workdir, f"{name}-{extra.get('namespace', 'std-daq')}.json")
    with open(path, "w") as f:
        json.dump({"detector_name": name, "detector_type": "jungfrau", "n_modules": modules, "bit_depth": 16,
                   "image_pixel_height": 512 * modules, "image_pixel_width": 1024, "start_udp_port": 50000,
                   "image_buffer_slots": SLOTS, "frame_buffer_slots": 4, "stats_interval_s": 3600, **extra}, f)
    return path


class Replication:
    """The two services between two ImageBuffers, and this process as their std_assembler."""

    def __init__(self, workdir: str, modules: int, window: int) -> None:
        name = f"benchs-{modules}-{os.getpid()}"
        port = free_port()
        source_path = write_config(workdir, name, modules, stream_send={"to": f"tcp://127.0.0.1:{port}",
                                                                        "queue_images": QUEUE})
        replica_path = write_config(workdir, name, modules, namespace="bench-replica",
                                    stream_recv={"bind": f"tcp://127.0.0.1:{port}", "queue_images": QUEUE})
        self.configs = (load_config(source_path), load_config(replica_path))
        self.window = window
        self.images = ImageBuffer.for_config(self.configs[0])
        first = self.images.slot_data(0)
        first[:] = np.random.default_rng(0).integers(0, 255, first.size, dtype=np.uint8)
        for slot in range(1, SLOTS):
            self.images.slot_data(slot)[:] = np.roll(first, slot)  # different bytes, made quickly
        ctx = zmq.Context.instance()
        self.pub = make_socket(ctx, zmq.PUB, hwm=100000)
        self.pub.bind(image_metadata_address(self.configs[0]))
        self.procs = {script: subprocess.Popen([os.path.join(BIN, script), path, "--log-level", "WARNING"],
                                               stdout=subprocess.DEVNULL)
                      for script, path in (("std_stream_recv", replica_path), ("std_stream_send", source_path))}
        self.seen = make_socket(ctx, zmq.SUB, hwm=100000)
        time.sleep(START_S)  # the replica creates its buffer and binds before we subscribe
        self.seen.connect(image_metadata_address(self.configs[1]))
        time.sleep(0.5)
        self.next_id = 1
        self.n_seen = 0
        self.last_seen_id = 0

    def _publish(self) -> None:
        """Fill the window again once a quarter of it is free: in bursts, as a detector's images come in
        bursts to a busy machine, rather than waking every process for every image."""
        if self.next_id - 1 - self.last_seen_id > self.window * 3 // 4:
            return
        shape = self.configs[0].image_shape
        while self.next_id - 1 - self.last_seen_id < self.window:
            meta = ImageMetadata(self.next_id, *shape, user_1=self.next_id)
            self.images.commit_image(meta)
            self.pub.send(meta.encode())
            self.next_id += 1

    def _receive(self) -> int:
        """Take what the replica has published; the number of images."""
        if not self.seen.poll(5000):
            raise RuntimeError(f"the replica stopped publishing after image {self.last_seen_id}")
        n = 0
        while True:
            try:
                message = self.seen.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.last_seen_id = ImageMetadata.STRUCT.unpack(message)[1]  # any image lost counts as done
            n += 1
        self.n_seen += n
        return n

    def round(self, seconds: float) -> float:
        """Images per second on the replica, from the first image seen to the last."""
        self._publish()
        self._receive()
        t_first, n = time.perf_counter(), 0
        t_last = t_first
        while t_last - t_first < seconds:
            self._publish()
            n += self._receive()
            t_last = time.perf_counter()
        while self.last_seen_id < self.next_id - 1:  # drain, so that the bare rounds have the machine
            self._receive()
        return n / (t_last - t_first)

    @property
    def lost(self) -> int:
        return self.last_seen_id - self.n_seen

    def close(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            p.wait(10)
        self.seen.close()
        self.pub.close()
        self.images.close()
        for cfg in self.configs:
            unlink(f"{cfg.namespace}-{cfg.detector_name}-images")
            path = ipc_path(image_metadata_address(cfg))
            if path and os.path.exists(path):
                os.unlink(path)


class BareZmq:
    """PUSH here, PULL with recv_into in another process, over TCP loopback."""

    def __init__(self, source: ImageBuffer, config: DetectorConfig) -> None:
        self.source, self.nbytes = source, config.image_bytes
        address = f"tcp://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen([sys.executable, "-c", BARE_RECEIVER, address, str(self.nbytes), str(SLOTS),
                                      str(BARE_HWM)], stdout=subprocess.PIPE, text=True)
        self.push = zmq.Context.instance().socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, BARE_HWM)
        self.push.setsockopt(zmq.LINGER, 5000)
        self.push.connect(address)
        self.one = np.random.default_rng(0).integers(0, 255, self.nbytes, dtype=np.uint8)
        self.header = ImageMetadata(1, *config.image_shape).encode()
        self.slot_frames = [zmq.Frame(source.slot_data(slot)[:self.nbytes], copy=False) for slot in range(SLOTS)]

    def round(self, n: int, kind: str) -> float:
        """Messages per second, from the first one received to the last."""
        self.push.send(ROUND.pack(n, kind != ONE_HOT_BUFFER))
        for i in range(n):
            if kind == SAME_BYTES:
                self.push.send(self.header, zmq.SNDMORE)
                self.push.send(self.source.slot_data(i % SLOTS)[:self.nbytes], copy=False)
            elif kind == SLOT_FRAMES:
                self.push.send(self.header, zmq.SNDMORE)
                self.push.send(self.slot_frames[i % SLOTS], copy=False)
            else:
                self.push.send(self.one, copy=False)
        return (n - 1) / float(self.proc.stdout.readline())

    def close(self) -> None:
        self.push.send(ROUND.pack(0, 0))
        self.proc.wait(10)
        self.push.close()
        self.slot_frames.clear()


def measure(workdir: str, label: str, modules: int, args: argparse.Namespace) -> None:
    nbytes = modules * 512 * 1024 * 2
    replication = Replication(workdir, modules, args.window)
    bare = None
    try:
        bare = BareZmq(replication.images, replication.configs[0])
        replication.round(0.3)  # warm up: connections, first touches
        estimate = bare.round(200, ONE_HOT_BUFFER)
        rates: dict[str, list[float]] = defaultdict(list)
        pids = {"std_stream_send": replication.procs["std_stream_send"].pid,
                "std_stream_recv": replication.procs["std_stream_recv"].pid,
                "this process": os.getpid(), "bare receiver": bare.proc.pid}
        meters = {kind: CpuMeter(pids) for kind in (REPLICATION, SAME_BYTES, SLOT_FRAMES, ONE_HOT_BUFFER)}
        counts: dict[str, int] = defaultdict(int)  # images or messages moved while the meters ran
        for _ in range(args.rounds):
            with meters[REPLICATION]:
                before = replication.n_seen
                rates[REPLICATION].append(replication.round(args.round_seconds))
            counts[REPLICATION] += replication.n_seen - before
            for kind in (ONE_HOT_BUFFER, SAME_BYTES, SLOT_FRAMES):
                n = max(100, int(estimate * args.round_seconds))
                with meters[kind]:
                    rate = bare.round(n, kind)
                rates[kind].append(rate)
                counts[kind] += n
                estimate = rate
    finally:
        if bare is not None:
            bare.close()
        replication.close()

    median = {kind: statistics.median(values) for kind, values in rates.items()}
    print(f"{REPLICATION} {label}: {median[REPLICATION]:.0f} images/s")
    print(f"{REPLICATION} {label}: {median[REPLICATION] * nbytes / 1e9:.2f} GB/s")
    for kind in (SAME_BYTES, SLOT_FRAMES, ONE_HOT_BUFFER):  # the headline reference first
        print(f"{kind} {label}: {median[kind]:.0f} messages/s")
        print(f"{kind} {label}: {median[kind] * nbytes / 1e9:.2f} GB/s")
        print(f"ratio {REPLICATION}/{kind} {label}: {median[REPLICATION] / median[kind]:.2f}")
    print(f"images lost on the way {label}: {replication.lost} images")
    roles = {REPLICATION: {"std_stream_send": "std_stream_send", "std_stream_recv": "std_stream_recv",
                           "this process": "std_assembler stand-in"},
             SAME_BYTES: {"this process": "bare sender", "bare receiver": "bare receiver"},
             SLOT_FRAMES: {"this process": "bare sender", "bare receiver": "bare receiver"},
             ONE_HOT_BUFFER: {"this process": "bare sender", "bare receiver": "bare receiver"}}
    for kind, names in roles.items():
        unit = "image" if kind == REPLICATION else "message"
        for name, role in names.items():
            print(f"cpu per {unit} {kind} {label} {role}: {meters[kind].used[name] / counts[kind] * 1e6:.0f} us")
    # Clamped at 0: the estimate (machine CPU time minus ours) can come out a hair below on an idle machine.
    others = max(0.0, sum(m.others for m in meters.values()) / sum(m.wall for m in meters.values()))
    print(f"other processes' load during {label}: {others * 100:.0f} % of one core")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per measurement (the median is printed)")
    parser.add_argument("--round-seconds", type=float, default=1.0, help="seconds per round")
    parser.add_argument("--window", type=int, default=32, help="images in flight at most")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated, of: " + ", ".join(SIZES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        for label in args.sizes.split(","):
            measure(workdir, label.strip(), SIZES[label.strip()], args)


if __name__ == "__main__":
    main()
