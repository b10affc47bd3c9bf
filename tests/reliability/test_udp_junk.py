"""A real std_udp_recv process under a stream of random and truncated datagrams mixed with valid frames:
it stays up, every valid frame reaches the FrameBuffer bit for bit, and every bad datagram is counted."""
from __future__ import annotations

import random
import signal
import socket
import subprocess
import time

import numpy as np
import psutil
import pytest

from core_buffer.pattern import frame_bytes
from core_buffer.ringbuffer import FrameBuffer
from std_daq.launcher import console_script
from std_udp_recv.sim import ModuleSender

N_IMAGES = 20
JUNK_PER_IMAGE = 60

DETECTORS = {
    "jungfrau": dict(detector_type="jungfrau", n_modules=1),
    "gigafrost": dict(detector_type="gigafrost", n_modules=8, bit_depth=12, image_pixel_height=96,
                      image_pixel_width=192),
}


def junk(rng: random.Random, sender: ModuleSender, k: int) -> bytes:
    """One bad datagram: random bytes of a random or of a valid length, or packet k cut short."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 9100))
    if kind == 1:
        return rng.randbytes(rng.choice(sender.lengths))
    valid = bytes(sender.datagram(k))
    return valid[:rng.randrange(0, len(valid))]


def wait_bound(pid: int, port: int, timeout_s: float = 30.0) -> None:
    """Until the process `pid` has its UDP socket bound on `port` (its start-up time varies with load)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(c.laddr and c.laddr.port == port for c in psutil.Process(pid).net_connections(kind="udp")):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not bind UDP port {port}")


def final_stats(stdout: str, detector_name: str) -> dict[str, int]:
    """The counters of the last InfluxDB line the receiver printed (the existing std-daq dashboards' form)."""
    line = [ln for ln in stdout.splitlines()
            if ln.startswith(f"std_udp_recv,detector_name={detector_name},module_id=0 ")][-1]
    fields = line.split(" ")[1].split(",")
    return {k: int(v[:-1]) for k, v in (f.split("=") for f in fields) if v.endswith("i")}


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_the_receiver_outlives_junk_and_keeps_the_valid_frames_intact(kind, make_config):
    path, config = make_config(frame_buffer_slots=64, **DETECTORS[kind])
    receiver = subprocess.Popen([console_script("std_udp_recv"), str(path), "0", "--stats-interval", "1000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sender = ModuleSender(config, 0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rng = random.Random(7)
    n_junk = 0
    try:
        wait_bound(receiver.pid, config.udp_port(0))
        for image_id in range(1, N_IMAGES + 1):
            sender.build(image_id)
            n = len(sender.lengths)
            junk_after = sorted(rng.randrange(n) for _ in range(JUNK_PER_IMAGE))
            for k in range(n):
                sock.sendto(sender.datagram(k), sender.address)
                while junk_after and junk_after[0] == k:
                    junk_after.pop(0)
                    sock.sendto(junk(rng, sender, k), sender.address)
                    n_junk += 1
            time.sleep(0.01)  # one image at a time: a stock 4 MiB receive buffer never overflows
        # The frames as the receiver committed them to the FrameBuffer (the last one after its timeout).
        buffer = FrameBuffer.for_config(config, create=False)
        try:
            deadline = time.monotonic() + 10
            while buffer.slot_id(buffer.slot_of(N_IMAGES)) != N_IMAGES and time.monotonic() < deadline:
                time.sleep(0.05)
            assert receiver.poll() is None, "the receiver died"
            for image_id in range(1, N_IMAGES + 1):
                frame = buffer.read_frame_meta(image_id, 0)
                assert frame.n_recv_packets == frame.n_packets, frame
                data = buffer.module_data(buffer.slot_of(image_id), 0)[:config.stream.frame_bytes]
                assert np.array_equal(data, frame_bytes(config.stream, 0, image_id)), image_id
        finally:
            buffer.close()
    finally:
        receiver.send_signal(signal.SIGTERM)
        out, err = receiver.communicate(timeout=30)
        sock.close()
    assert receiver.returncode == 0, err[-2000:]
    stats = final_stats(out, config.detector_name)
    assert stats["malformed_packets"] == n_junk, stats
    assert stats["complete_frames"] == N_IMAGES and stats["lost_packets"] == 0, stats
    assert stats["n_missed_packets"] == stats["n_corrupted_frames"] == stats["frames_missed"] == 0, stats
