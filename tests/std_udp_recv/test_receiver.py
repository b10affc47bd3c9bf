"""Simulator -> receiver over real loopback UDP, into a real FrameBuffer, frames pushed over real ZMQ."""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from core_buffer.errors import ConfigError
from core_buffer.formats import ModuleFrame
from core_buffer.ipc import make_socket, module_frames_address
from core_buffer.pattern import frame_bytes
from std_udp_recv.packets import MALFORMED_KINDS, PacketDecoder
from std_udp_recv.receiver import RECENT_FRAMES, UdpReceiver, open_udp_socket
from std_udp_recv import receiver as receiver_module
from std_udp_recv.sim import FOREIGN_ID_OFFSET, Faults, Simulator

DETECTORS = {
    "jungfrau": dict(detector_type="jungfrau", n_modules=2, image_pixel_height=1024),
    "jungfrau-2if": dict(detector_type="jungfrau", n_modules=2, jungfrau_interfaces=2, image_pixel_height=512),
    "jungfrau-pulse-id": dict(detector_type="jungfrau", n_modules=2, image_pixel_height=1024,
                              image_id_source="pulse_id"),
    "eiger16": dict(detector_type="eiger", n_modules=2, bit_depth=16, image_pixel_height=514, image_pixel_width=514,
                    module_positions={"0": [0, 0, 513, 255], "1": [0, 513, 513, 258]}),
    "eiger32": dict(detector_type="eiger", n_modules=2, bit_depth=32, image_pixel_height=514, image_pixel_width=514,
                    module_positions={"0": [0, 0, 513, 255], "1": [0, 513, 513, 258]}),
    "gigafrost": dict(detector_type="gigafrost", n_modules=8, bit_depth=12, image_pixel_height=96,
                      image_pixel_width=192),
    # streams of 24 x 409 pixels in packets of 204, 204 and 1 rows: a last packet shorter than the others
    "gigafrost-short-last": dict(detector_type="gigafrost", n_modules=8, bit_depth=12, image_pixel_height=1636,
                                 image_pixel_width=48),
    # streams of 240 x 240 pixels: 12 packets of 20 rows (7200 B)
    "gigafrost-multi": dict(detector_type="gigafrost", n_modules=8, bit_depth=12, image_pixel_height=960,
                            image_pixel_width=480),
    # streams of 240 x 256 pixels: 12 packets of 20 rows and a 13th of 16 rows (5760 B)
    "gigafrost-multi-short-last": dict(detector_type="gigafrost", n_modules=8, bit_depth=12,
                                       image_pixel_height=1024, image_pixel_width=480),
}


class Rig:
    """Receivers of every module in this process, a PULL per module, and a simulator."""

    def __init__(self, config, faults=None, modules=None):
        self.config = config
        self.receivers = [UdpReceiver(config, m) for m in range(config.n_modules)]
        ctx = zmq.Context.instance()
        self.pulls = []
        for m in range(config.n_modules):
            pull = make_socket(ctx, zmq.PULL, hwm=1000)
            pull.connect(module_frames_address(config, m))
            self.pulls.append(pull)
        time.sleep(0.2)  # let the PULLs connect, so no frame is counted as not delivered
        self.sim = Simulator(config, modules, faults=faults)

    def send(self, *image_ids: int) -> None:
        """Send images one by one, reading the sockets in between, so a kernel-capped receive buffer
        (net.core.rmem_max is 4 MiB on a stock host) never overflows in a test."""
        for image_id in image_ids:
            self.sim.send_image(image_id)
            deadline = time.monotonic() + 0.05
            while time.monotonic() < deadline:
                for r in self.receivers:
                    r.poll(0.001)

    def send_promptly(self, *image_ids: int) -> None:
        """Send images one by one, each as soon as the receivers took the last one's packets (frames
        follow each other well within a frame timeout; no fault injection)."""
        for image_id in image_ids:
            before = [r.counters.packets for r in self.receivers]
            self.sim.send_image(image_id)
            n = self.config.stream.packets_per_frame
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(
                    r.counters.packets < b + n for r, b in zip(self.receivers, before)):
                for r in self.receivers:
                    r.poll(0.001)

    def drain(self, until_frames: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for r in self.receivers:
                r.poll(0.01)
            if all(r.counters.frames >= until_frames for r in self.receivers):
                return
        raise AssertionError(f"frames: {[r.counters.frames for r in self.receivers]}")

    def pushed(self, module: int) -> list[ModuleFrame]:
        """The ModuleFrames the module's receiver pushed so far: as many as it finished and delivered (then
        anything beyond that, which would be a bug, shows up in the caller's comparison)."""
        c = self.receivers[module].counters
        expected = c.frames - c.frames_not_delivered
        out = []
        while self.pulls[module].poll(5000 if len(out) < expected else 20):
            out.append(ModuleFrame.decode(self.pulls[module].recv()))
        return out

    def close(self):
        self.sim.close()
        for p in self.pulls:
            p.close()
        for r in self.receivers:
            r.close()


@pytest.fixture
def rig(make_config):
    made = []

    def factory(detector="jungfrau", faults=None, modules=None, **overrides):
        _, config = make_config(**{**DETECTORS[detector], **overrides})
        made.append(Rig(config, faults, modules))
        return made[-1]

    yield factory
    for r in made:
        r.close()


@pytest.mark.parametrize("detector", sorted(DETECTORS))
def test_frames_equal_the_simulated_pattern_bit_for_bit(rig, detector):
    r = rig(detector)
    r.send(1, 2, 3)
    r.drain(3)
    stream = r.config.stream
    for m, receiver in enumerate(r.receivers):
        assert receiver.counters.complete_frames == 3
        assert receiver.counters.lost_packets == receiver.counters.malformed_packets == 0
        frames = r.pushed(m)
        assert [f.id for f in frames] == [1, 2, 3]
        for f in frames:
            assert (f.module_id, f.n_recv_packets, f.n_packets) == (m, stream.packets_per_frame, stream.packets_per_frame)
            assert f.frame_index == f.id
            assert r.receivers[0].frames.read_frame_meta(f.id, m) == f
            assert np.array_equal(r.receivers[0].frames.frame_data(f.id, m), frame_bytes(stream, m, f.id))


def test_lost_packets_are_zero_filled_and_counted_reordered_and_duplicates_land_once(rig):
    r = rig("jungfrau", Faults(drop_every=2, reorder=True, duplicate_fraction=0.2, seed=3))
    r.send(1, 2, 3, 4)
    r.drain(3)
    time.sleep(0.15)  # the last frame is finished by the timeout
    r.drain(4)
    stream = r.config.stream
    for m, receiver in enumerate(r.receivers):
        c = receiver.counters
        assert c.lost_packets == 2 and c.incomplete_frames == 2 and c.complete_frames == 2
        assert c.duplicate_packets > 0
        frames = {f.id: f for f in r.pushed(m)}
        for image_id in (1, 2, 3, 4):
            expected = frame_bytes(stream, m, image_id).copy()
            if image_id % 2 == 0:
                k = image_id % stream.packets_per_frame
                expected[k * stream.packet_data_bytes:(k + 1) * stream.packet_data_bytes] = 0
                assert frames[image_id].n_recv_packets == stream.packets_per_frame - 1
            assert np.array_equal(receiver.frames.frame_data(image_id, m), expected), image_id
    # A copy that arrives after its frame finished complete is a late packet; every copy is counted once.
    assert sum(r.counters.duplicate_packets + r.counters.late_packets for r in r.receivers) == r.sim.stats.duplicated


@pytest.mark.parametrize("detector", ["jungfrau", "eiger16", "gigafrost"])
@pytest.mark.parametrize("recvmmsg", [True, False], ids=["recvmmsg", "recv_into"])
def test_malformed_datagrams_mid_frame_are_counted_by_kind_and_frames_stay_intact(rig, detector, recvmmsg):
    # One datagram of each kind per frame, sent after half the frame: on the recvmmsg path they land in
    # the slot positions the receiver aimed at for the packets that follow.
    r = rig(detector, Faults(malformed_per_frame=6), udp_recv={"recvmmsg": recvmmsg, "frame_timeout_s": 0.05})
    r.send(7, 8, 9)
    r.drain(3)
    time.sleep(0.06)  # the last frame's foreign id is held until the timeout, then counted
    for receiver in r.receivers:
        receiver.poll(0.01)
    stream = r.config.stream
    for m, receiver in enumerate(r.receivers):
        c = receiver.counters
        assert (c.bad_length_packets, c.bad_header_packets, c.bad_packet_number_packets, c.stray_packets) == (6, 6, 3, 3)
        assert c.malformed_packets == 18
        assert c.complete_frames == 3 and c.frames == 3 and c.lost_packets == 0 and c.restarts == 0
        assert [f.id for f in r.pushed(m)] == [7, 8, 9]
        for image_id in (7, 8, 9):
            assert np.array_equal(receiver.frames.frame_data(image_id, m), frame_bytes(stream, m, image_id))


@pytest.mark.parametrize("detector,batch", [("jungfrau", 128), ("jungfrau", 64), ("eiger16", 128), ("eiger32", 16),
                                            ("gigafrost-short-last", 128)])
@pytest.mark.parametrize("recvmmsg", [True, False], ids=["recvmmsg", "recv_into"])
def test_swapped_neighbours_land_at_their_own_offsets(rig, detector, batch, recvmmsg):
    # Packets arrive 0, 2, 1, 4, 3, ...: a batch whose first and last packets are in order but whose
    # middle is not (the case a first/last check would take for "in order").
    r = rig(detector, Faults(reorder="swap"), udp_recv={"batch": batch, "recvmmsg": recvmmsg})
    r.send(1, 2)
    r.drain(2)
    for m, receiver in enumerate(r.receivers):
        c = receiver.counters
        assert (c.complete_frames, c.lost_packets, c.duplicate_packets, c.malformed_packets) == (2, 0, 0, 0)
        for image_id in (1, 2):
            assert np.array_equal(receiver.frames.frame_data(image_id, m), frame_bytes(r.config.stream, m, image_id))


def _zero_packets(stream, expected, packets):
    for k in packets:
        offset = stream.packet_offset(k)
        expected[offset:offset + stream.packet_payload_bytes(k)] = 0
    return expected


@pytest.mark.parametrize("detector,dropped", [
    ("jungfrau", (0, 64, 127)),
    ("eiger16", (0, 32, 63)),
    ("eiger32", (0, 64, 127)),
    ("gigafrost-short-last", (1, 2)),  # the middle packet and the short last one
    ("gigafrost-multi", (0, 6, 11)),
    ("gigafrost-multi-short-last", (0, 6, 12)),  # 12: the short last packet
])
@pytest.mark.parametrize("recvmmsg", [True, False], ids=["recvmmsg", "recv_into"])
def test_first_middle_and_last_packets_dropped_are_zero_filled(rig, detector, dropped, recvmmsg):
    r = rig(detector, Faults(drop_packets=dropped), udp_recv={"frame_timeout_s": 0.05, "recvmmsg": recvmmsg})
    stream = r.config.stream
    assert max(dropped) == stream.packets_per_frame - 1
    r.send(3, 4, 5)
    time.sleep(0.06)
    r.drain(3)
    for m, receiver in enumerate(r.receivers):
        c = receiver.counters
        assert (c.incomplete_frames, c.lost_packets, c.malformed_packets) == (3, 3 * len(dropped), 0)
        assert [f.n_recv_packets for f in r.pushed(m)] == [stream.packets_per_frame - len(dropped)] * 3
        for image_id in (3, 4, 5):
            expected = _zero_packets(stream, frame_bytes(stream, m, image_id).copy(), dropped)
            assert np.array_equal(receiver.frames.frame_data(image_id, m), expected)


@pytest.mark.parametrize("detector", ["jungfrau", "gigafrost-multi"])
def test_frames_missing_from_the_stream_are_counted_with_their_packets(rig, detector):
    # Module 1's stream loses whole frames 3, 4, 5 (a link down, a receiver that fell behind); frame 7
    # misses one packet. Module 0 gets everything.
    faults = Faults(drop_images=(3, 4, 5), drop_images_modules=(1,), drop_every=7)
    r = rig(detector, faults, udp_recv={"frame_timeout_s": 0.05})
    n = r.config.stream.packets_per_frame
    r.send(*range(1, 9))
    time.sleep(0.06)
    r.drain(5)
    full, gappy = r.receivers[0].counters, r.receivers[1].counters
    assert (full.frames, full.frames_missed, full.lost_packets, full.incomplete_frames) == (8, 0, 1, 1)
    assert (gappy.frames, gappy.frames_missed, gappy.lost_packets, gappy.incomplete_frames) == (5, 3, 3 * n + 1, 1)
    assert [f.id for f in r.pushed(1)] == [1, 2, 6, 7, 8]
    # The legacy InfluxDB fields count the missed frames' packets too (incomplete frames stay 1).
    assert UdpReceiver.interval_fields(r.receivers[1].stats(), {}, 1.0)["n_missed_packets"] == 3 * n + 1
    assert UdpReceiver.interval_fields(r.receivers[1].stats(), {}, 1.0)["n_corrupted_frames"] == 1


def _datagram(r, image_id: int, packet: int, module: int = 0) -> bytes:
    sender = r.sim.senders[module]
    sender.build(image_id)
    return bytes(sender.datagram(packet))


def _send_frame_around(r, image_id: int, inserted: list[bytes], module: int = 0) -> None:
    """Frame `image_id` of one module with `inserted` datagrams sent after its first half."""
    sender = r.sim.senders[module]
    n = r.config.stream.packets_per_frame
    sender.build(image_id)
    for k in range(n):
        if k == n // 2:
            for datagram in inserted:
                r.sim.sock.sendto(datagram, sender.address)
        r.sim.sock.sendto(sender.datagram(k), sender.address)


def _poll_until(receiver, frames: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while receiver.counters.frames < frames and time.monotonic() < deadline:
        receiver.poll(0.01)


def test_a_stray_packet_of_a_foreign_id_neither_closes_nor_damages_the_open_frame(rig):
    r = rig("jungfrau", modules=[0], udp_recv={"frame_timeout_s": 0.05})
    receiver = r.receivers[0]
    r.sim.send_image(1)
    _send_frame_around(r, 2, [_datagram(r, 2 + FOREIGN_ID_OFFSET, 3)])  # valid in all but its id
    r.sim.send_image(3)
    _poll_until(receiver, 3)
    c = receiver.counters
    assert (c.complete_frames, c.incomplete_frames, c.stray_packets, c.malformed_packets) == (3, 0, 1, 1)
    assert [f.id for f in r.pushed(0)] == [1, 2, 3]
    assert np.array_equal(receiver.frames.frame_data(2, 0), frame_bytes(r.config.stream, 0, 2))


def test_a_small_jump_back_is_late_and_a_repeated_one_is_a_restart(rig):
    r = rig("eiger16", modules=[0], udp_recv={"frame_timeout_s": 0.05})
    receiver = r.receivers[0]
    first = RECENT_FRAMES + 10
    r.send(*range(1, first))  # ids 1 .. first - 1; the oldest are no longer among the recent ones
    _poll_until(receiver, first - 1)
    # One old packet (older than the recent frames) in the middle of the next frame: late, not a restart.
    _send_frame_around(r, first, [_datagram(r, 2, 5)])
    _poll_until(receiver, first)
    time.sleep(0.06)  # the old id is held until the timeout, then counted
    receiver.poll(0.01)
    c = receiver.counters
    assert (c.late_packets, c.restarts, c.complete_frames) == (1, 0, first)
    # The detector restarts at id 1: the jump back repeats, so it is followed, and no packet of it is lost.
    r.send(1, 2)
    _poll_until(receiver, first + 2)
    assert (c.restarts, c.complete_frames, c.lost_packets) == (1, first + 2, 0)
    pushed = r.pushed(0)
    assert [f.id for f in pushed][-3:] == [first, 1, 2]
    # The restart is a new acquisition for the assembler: a new token from the first frame of it on.
    assert len({f.acquisition for f in pushed[:-2]}) == 1 and {f.acquisition for f in pushed[-2:]} == \
        {(pushed[0].acquisition + 1) & 0xFFFF_FFFF}
    assert np.array_equal(receiver.frames.frame_data(1, 0), frame_bytes(r.config.stream, 0, 1))


def test_a_packet_of_the_other_half_module_is_rejected_in_two_interface_mode(rig):
    r = rig("jungfrau-2if")
    receiver = r.receivers[0]
    other_half = _datagram(r, 6, 10, module=1)  # row 1: belongs to module 1's port
    _send_frame_around(r, 6, [other_half], module=0)
    _poll_until(receiver, 1)
    c = receiver.counters
    assert (c.bad_header_packets, c.complete_frames) == (1, 1)
    assert np.array_equal(receiver.frames.frame_data(6, 0), frame_bytes(r.config.stream, 0, 6))


def test_datagrams_that_are_not_its_packets_do_not_keep_a_frame_open(rig):
    r = rig("jungfrau", modules=[0], faults=Faults(drop_packets=(100,)), udp_recv={"frame_timeout_s": 0.05})
    receiver = r.receivers[0]
    r.sim.send_image(1)  # open: packet 100 never comes
    duplicate, short = _datagram(r, 1, 5), _datagram(r, 2, 5)[:100]
    sender = r.sim.senders[0]
    # Keep sending a duplicate of one of its packets and short datagrams, far longer than the timeout.
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        r.sim.sock.sendto(duplicate, sender.address)
        r.sim.sock.sendto(short, sender.address)
        receiver.poll(0.005)
    assert receiver.counters.frames == 1  # finished by its timeout while the traffic went on
    assert receiver.counters.duplicate_packets > 0 and receiver.counters.bad_length_packets > 0


def test_poll_returns_after_its_time_budget_with_datagrams_still_queued(rig):
    r = rig("jungfrau", modules=[0])
    receiver = r.receivers[0]
    r.sim.run(0, 3, start_id=1)  # 384 datagrams queued
    receiver.poll(0.0)  # no time at all: one receive call
    assert 0 < receiver.counters.packets <= receiver.settings.batch
    _poll_until(receiver, 3)
    assert receiver.counters.complete_frames == 3


def test_stop_takes_what_was_queued_but_not_more(rig):
    r = rig("jungfrau")
    r.sim.run(0, 3, start_id=1)  # 384 datagrams queued for each module
    whole, bounded = r.receivers
    whole.stop()
    assert (whole.counters.packets, whole.counters.complete_frames) == (384, 3)
    bounded._queued_bytes = lambda: 10 * r.config.stream.packet_bytes  # as if 10 had been queued at the stop
    bounded.stop()
    assert 10 <= bounded.counters.packets <= bounded.settings.batch


def test_a_capped_receive_buffer_is_warned_about_naming_rmem_max(make_config, monkeypatch, caplog):
    # As for a service without CAP_NET_ADMIN: SO_RCVBUFFORCE is refused, SO_RCVBUF is capped (here at 1 MiB,
    # whatever this host's net.core.rmem_max is).
    real = socket.socket.setsockopt

    def setsockopt(sock, level, option, value, *rest):
        if level == socket.SOL_SOCKET and option == receiver_module.SO_RCVBUFFORCE:
            raise PermissionError(1, "Operation not permitted")
        if level == socket.SOL_SOCKET and option == socket.SO_RCVBUF:
            value = min(value, 2**20)
        return real(sock, level, option, value, *rest)

    _, config = make_config(udp_recv={"rcvbuf_bytes": 64 * 2**20})
    monkeypatch.setattr(socket.socket, "setsockopt", setsockopt)
    with caplog.at_level(logging.WARNING, logger="std_udp_recv"):
        receiver = UdpReceiver(config, 0)
    monkeypatch.undo()
    try:
        assert receiver.rcvbuf_option == "SO_RCVBUF" and receiver.rcvbuf_granted < 64 * 2**20
    finally:
        receiver.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "net.core.rmem_max" in warnings[0] and "SO_RCVBUF" in warnings[0]
    assert "asked for a 64 MiB UDP receive buffer" in warnings[0] and "below 32 MiB" in warnings[0]


def test_receive_buffer_is_forced_past_rmem_max_where_allowed(make_config):
    sock, granted, option = open_udp_socket("127.0.0.1", 0, 64 * 2**20)
    sock.close()
    if os.geteuid() == 0:  # CAP_NET_ADMIN: net.core.rmem_max does not apply
        assert (option, granted) == ("SO_RCVBUFFORCE", 64 * 2**20)
    else:
        assert option == "SO_RCVBUF"


def test_last_frame_is_finished_by_the_timeout(rig):
    r = rig("jungfrau", Faults(drop_every=5), udp_recv={"frame_timeout_s": 0.05})
    r.sim.send_image(5)  # one packet missing: only the timeout can finish it
    for receiver in r.receivers:
        receiver.poll(0.01)
        assert receiver.counters.frames == 0
    time.sleep(0.06)
    r.drain(1)
    assert [f.n_recv_packets for f in r.pushed(0)] == [127]


def test_late_packets_of_a_finished_frame_are_dropped_and_a_restart_is_followed(rig):
    r = rig("jungfrau", modules=[0])
    r.sim.send_image(10)
    r.sim.send_image(11)
    sender = r.sim.senders[0]
    sender.build(10)
    r.sim.sock.sendto(sender.datagram(5), sender.address)  # late: frame 10 is finished
    r.sim.send_image(1)  # the detector restarted
    receiver = r.receivers[0]
    deadline = time.monotonic() + 5
    while receiver.counters.frames < 3 and time.monotonic() < deadline:
        receiver.poll(0.01)
    assert receiver.counters.late_packets == 1
    assert [f.id for f in r.pushed(0)] == [10, 11, 1]
    assert np.array_equal(receiver.frames.frame_data(10, 0), frame_bytes(r.config.stream, 0, 10))


@pytest.mark.parametrize("detector", ["jungfrau", "eiger16", "gigafrost", "gigafrost-short-last"])
def test_an_acquisition_that_reuses_recent_ids_at_once_is_followed_as_a_restart(rig, detector):
    # A detector that numbers every acquisition from 1, started again straight away (no idle gap): ids
    # 1-5 are among the recent ones, but whole frames of them are a new acquisition, not late packets.
    r = rig(detector, udp_recv={"frame_timeout_s": 0.05})
    r.send(1, 2, 3, 4, 5)
    r.drain(5)
    r.send_promptly(1, 2, 3, 4, 5)
    r.drain(10)
    stream = r.config.stream
    for m, receiver in enumerate(r.receivers):
        c = receiver.counters
        assert (c.frames, c.complete_frames, c.restarts) == (10, 10, 1)
        assert (c.lost_packets, c.late_packets, c.frames_missed, c.malformed_packets) == (0, 0, 0, 0)
        pushed = r.pushed(m)
        assert [f.id for f in pushed] == [1, 2, 3, 4, 5] * 2
        assert len({f.acquisition for f in pushed[:5]}) == 1 and len({f.acquisition for f in pushed[5:]}) == 1
        assert pushed[5].acquisition != pushed[0].acquisition
        # Every write of a slot has its own generation, and the slot holds the last one.
        generations = [f.generation for f in pushed]
        assert generations == sorted(set(generations))
        for frame in pushed[5:]:
            assert receiver.frames.holds(frame.id, m, frame.generation)
            assert not receiver.frames.holds(frame.id, m, pushed[frame.id - 1].generation)
        for image_id in range(1, 6):
            assert np.array_equal(receiver.frames.frame_data(image_id, m), frame_bytes(stream, m, image_id))


def test_a_burst_of_late_copies_of_a_finished_frame_is_not_a_restart(rig):
    r = rig("jungfrau", modules=[0], udp_recv={"frame_timeout_s": 0.05})
    receiver = r.receivers[0]
    r.send(1, 2)
    sender = r.sim.senders[0]
    sender.build(2)
    for k in range(0, 120, 2):  # 60 distinct packets of frame 2, which finished complete: under half a frame
        r.sim.sock.sendto(sender.datagram(k), sender.address)
    r.send(3)
    _poll_until(receiver, 3)
    c = receiver.counters
    assert (c.frames, c.complete_frames, c.restarts, c.late_packets) == (3, 3, 0, 60)
    assert [f.id for f in r.pushed(0)] == [1, 2, 3]
    assert np.array_equal(receiver.frames.frame_data(2, 0), frame_bytes(r.config.stream, 0, 2))


def test_after_an_idle_gap_recent_ids_open_frames_at_once(rig):
    r = rig("eiger16", modules=[0], udp_recv={"frame_timeout_s": 0.05})
    receiver = r.receivers[0]
    receiver._forget_after_s = 0.3  # (default: 1 s, or 3 frame timeouts if longer)
    r.send(1, 2, 3)
    _poll_until(receiver, 3)
    deadline = time.monotonic() + 5
    while receiver.newest is not None and time.monotonic() < deadline:  # idle: the ids are forgotten
        receiver.poll(0.05)
    assert receiver.newest is None
    r.send(1, 2, 3)
    _poll_until(receiver, 6)
    c = receiver.counters
    assert (c.frames, c.complete_frames, c.restarts, c.late_packets, c.lost_packets) == (6, 6, 0, 0, 0)
    pushed = r.pushed(0)
    assert [f.id for f in pushed] == [1, 2, 3, 1, 2, 3]
    assert [f.acquisition - pushed[0].acquisition for f in pushed] == [0, 0, 0, 1, 1, 1]  # ids started again


def test_after_an_idle_gap_rising_ids_keep_the_acquisition_token(rig):
    # A Jungfrau's frame numbers go on across acquisitions: nothing starts again, nothing to restart.
    r = rig("eiger16", modules=[0], udp_recv={"frame_timeout_s": 0.05})
    receiver = r.receivers[0]
    receiver._forget_after_s = 0.3
    r.send(1, 2, 3)
    _poll_until(receiver, 3)
    deadline = time.monotonic() + 5
    while receiver.newest is not None and time.monotonic() < deadline:
        receiver.poll(0.05)
    r.send(4, 5)
    _poll_until(receiver, 5)
    assert len({f.acquisition for f in r.pushed(0)}) == 1


def test_recv_into_fallback_gives_the_same_frames(rig):
    r = rig("eiger16", udp_recv={"recvmmsg": False})
    assert r.receivers[0].batch.path == "recv_into"
    r.sim.send_image(4)
    r.drain(1)
    assert np.array_equal(r.receivers[1].frames.frame_data(4, 1), frame_bytes(r.config.stream, 1, 4))


def test_bad_config_key_is_named(make_config):
    _, config = make_config(udp_recv={"rcvbuf_bytes": "big"})
    with pytest.raises(ConfigError, match="udp_recv.rcvbuf_bytes"):
        UdpReceiver(config, 0)
    _, config = make_config(udp_recv={"frame_timout_s": 1})
    with pytest.raises(ConfigError, match="frame_timout_s"):
        UdpReceiver(config, 0)


def test_cli_refuses_a_module_the_detector_does_not_have(make_config):
    path, _ = make_config()
    result = subprocess.run(["std_udp_recv", str(path), "3"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "module_id" in result.stderr


def _wait_until_listening(recv: subprocess.Popen, timeout_s: float = 30.0) -> str:
    """The receiver's log up to its "listening on" line (packets sent before it binds would be lost)."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = recv.stderr.readline()
        if not line:
            break  # it exited
        seen.append(line)
        if "listening on" in line:
            return "".join(seen)
    raise AssertionError("std_udp_recv did not start listening:\n" + "".join(seen))


def _pull_of_a_started_receiver(config, recv: subprocess.Popen):
    """A PULL on module 0's frames, returned once the receiver listens and the PULL is connected to its PUSH
    (a frame pushed before that is not delivered: counted, not queued)."""
    pull = make_socket(zmq.Context.instance(), zmq.PULL, hwm=1000)
    monitor = pull.get_monitor_socket(zmq.EVENT_CONNECTED)
    pull.connect(module_frames_address(config, 0))
    try:
        _wait_until_listening(recv)
        assert monitor.poll(10000), "the PULL did not connect to the receiver's PUSH"
    finally:
        pull.disable_monitor()
        monitor.close()
    return pull


def test_sim_and_receiver_processes_end_to_end(make_config):
    """The console scripts as the launcher runs them: frames arrive and the receiver stops on SIGTERM."""
    path, config = make_config(stats_log="keyvalue")  # the final statistics as a log line, on stderr
    recv = subprocess.Popen(["std_udp_recv", str(path), "0"], stderr=subprocess.PIPE, text=True)
    pull = None
    try:
        pull = _pull_of_a_started_receiver(config, recv)
        sim = subprocess.run(["std_udp_sim", str(path), "--rate", "100", "--n-images", "5", "--start-id", "20"],
                             capture_output=True, text=True, timeout=30)
        assert "sent 5 images" in sim.stdout
        ids = []
        while len(ids) < 5 and pull.poll(5000):
            ids.append(ModuleFrame.decode(pull.recv()).id)
        assert ids == [20, 21, 22, 23, 24]
    finally:
        recv.terminate()
        _, err = recv.communicate(timeout=15)
        if pull is not None:
            pull.close()
    assert recv.returncode == 0
    assert "complete_frames=5" in err


def _influx_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("std_udp_recv,")]


def test_two_acquisitions_from_the_cli_numbered_alike_both_arrive(make_config):
    """`std_udp_sim CONFIG --n-images 5` run twice against a std_udp_recv process (the detector numbers
    each acquisition from 1), sent to --host localhost; the receiver's InfluxDB line is the legacy one."""
    path, config = make_config()
    recv = subprocess.Popen(["std_udp_recv", str(path), "0", "--stats-interval", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pull = None
    try:
        pull = _pull_of_a_started_receiver(config, recv)
        for _ in range(2):
            sim = subprocess.run(["std_udp_sim", str(path), "--rate", "100", "--n-images", "5", "--host", "localhost"],
                                 capture_output=True, text=True, timeout=30)
            assert "sent 5 images" in sim.stdout, sim.stderr
        ids = []
        while len(ids) < 10 and pull.poll(5000):
            ids.append(ModuleFrame.decode(pull.recv()).id)
        assert ids == [1, 2, 3, 4, 5] * 2
    finally:
        recv.send_signal(signal.SIGTERM)
        out, err = recv.communicate(timeout=15)
        if pull is not None:
            pull.close()
    assert recv.returncode == 0, err[-2000:]
    last = _influx_lines(out)[-1]
    assert re.fullmatch(rf"std_udp_recv,detector_name={config.detector_name},module_id=0 "
                        r"n_missed_packets=0i,n_corrupted_frames=0i,repetition_rate=\d+i,packets=1280i,.*"
                        r",frames=10i,complete_frames=10i,.* \d{19}", last), last


def test_simulator_cli_fault_options_reach_the_receiver(rig):
    r = rig("jungfrau", udp_recv={"frame_timeout_s": 0.05})
    path = r.config.source
    sim = subprocess.Popen(["std_udp_sim", str(path), "--rate", "50", "--n-images", "3", "--start-id", "5",
                            "--drop-packets", "0,127", "--reorder", "swap", "--malformed", "2",
                            "--malformed-kinds", "wrong_type,foreign_id"], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while sim.poll() is None and time.monotonic() < deadline:
        for receiver in r.receivers:
            receiver.poll(0.005)
    out, _ = sim.communicate(timeout=10)
    assert "sent 3 images, 756 packets to 2 modules (12 dropped, 0 duplicated, 12 malformed on purpose)" in out
    assert "images/s achieved" in out
    time.sleep(0.06)
    r.drain(3)
    stream = r.config.stream
    for m, receiver in enumerate(r.receivers):
        c = receiver.counters
        assert (c.frames, c.lost_packets, c.bad_header_packets, c.stray_packets, c.duplicate_packets) == (3, 6, 3, 3, 0)
        for image_id in (5, 6, 7):
            expected = frame_bytes(stream, m, image_id).copy()
            expected[:stream.packet_data_bytes] = 0
            expected[127 * stream.packet_data_bytes:] = 0
            assert np.array_equal(receiver.frames.frame_data(image_id, m), expected)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=8300), min_size=1, max_size=16))
def test_decoder_survives_any_datagram(datagrams):
    from core_buffer.config import parse_config

    config = parse_config({"detector_name": "fuzz", "detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
                           "image_pixel_height": 512, "image_pixel_width": 1024, "start_udp_port": 50000,
                           "image_id_source": "pulse_id"})
    decoder = PacketDecoder(config, 0)
    buffer = np.zeros((len(datagrams), decoder.max_datagram + 1), np.uint8)
    lengths = np.zeros(len(datagrams), np.int64)
    for i, d in enumerate(datagrams):
        d = d[:decoder.max_datagram + 1]
        buffer[i, :len(d)] = np.frombuffer(d, np.uint8)
        lengths[i] = len(d)
    decoded = decoder.decode(buffer, lengths, len(datagrams))
    assert int(decoded.valid.sum()) + sum(decoded.malformed.values()) == len(datagrams)
    assert not decoded.valid[lengths != decoder.max_datagram].any()
