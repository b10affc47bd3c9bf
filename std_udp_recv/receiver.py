"""std_udp_recv: one module's UDP stream into the FrameBuffer, a ModuleFrame per finished frame.

Per batch of datagrams (batch.py) the headers are decoded at once (packets.py); payloads of the open
frame are copied into its FrameBuffer slot at their packet number's offset, so reordered packets land in
the right place. A per-frame bitmap of arrived packets makes duplicates count once.

A frame is finished when all its packets arrived, when a packet of another frame arrives, or when no
packet came for `frame_timeout_s` (so the last frame of an acquisition is not held back). Missing packets
are zero-filled at finish and counted. A packet of one of the last few finished frames is late: counted
and dropped, never written over a finished frame. Any other id (newer, or a jump back after a detector
restart) opens a new frame.

The ModuleFrame is committed to the slot before it is pushed; the PUSH never blocks the receiver: when the
assembler is gone or its queue is full, the frame is counted as not delivered.
"""
from __future__ import annotations

import collections
import logging
import socket
import time
from typing import Mapping

import numpy as np
import zmq

from core_buffer.config import DetectorConfig
from core_buffer.errors import ConfigError
from core_buffer.formats import ModuleFrame
from core_buffer.ipc import make_socket, module_frames_address
from core_buffer.ringbuffer import FrameBuffer
from core_buffer.service import Counters
from std_udp_recv.batch import BatchReceiver
from std_udp_recv.packets import MALFORMED_KINDS, PacketDecoder

log = logging.getLogger("std_udp_recv")

DEFAULT_RCVBUF_BYTES = 256 * 2**20
DEFAULT_FRAME_TIMEOUT_S = 0.1
DEFAULT_BATCH = 64
RECENT_FRAMES = 16  # finished ids remembered to recognise late packets
PUSH_HWM = 10000
WARN_RCVBUF_BELOW = 32 * 2**20


class ReceiverSettings:
    """The "udp_recv" config section."""

    def __init__(self, config: DetectorConfig) -> None:
        section = config.section("udp_recv")
        self.bind_host = section.str("bind_host", "0.0.0.0")
        self.rcvbuf_bytes = section.int("rcvbuf_bytes", DEFAULT_RCVBUF_BYTES, min=65536)
        self.frame_timeout_s = section.float("frame_timeout_s", DEFAULT_FRAME_TIMEOUT_S, min=0.001, max=60.0)
        self.batch = section.int("batch", DEFAULT_BATCH, min=1, max=1024)
        self.use_recvmmsg = section.bool("recvmmsg", True)
        section.finish()


def open_udp_socket(host: str, port: int, rcvbuf_bytes: int) -> tuple[socket.socket, int]:
    """A bound UDP socket with the largest receive buffer the kernel grants (returned, in bytes)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux reports double
    sock.bind((host, port))
    return sock, granted


class UdpReceiver:
    name = "std_udp_recv"
    rate_counters = ("packets", "frames", "bytes")

    def __init__(self, config: DetectorConfig, module_id: int, context: zmq.Context | None = None) -> None:
        if not 0 <= module_id < config.n_modules:
            raise ConfigError("module_id", module_id, f"a module of this detector, 0 to {config.n_modules - 1}",
                              config.source)
        settings = ReceiverSettings(config)
        self.config, self.module_id, self.settings = config, module_id, settings
        self.stats_tags = {"module": str(module_id)}
        self.stream = config.stream
        self.decoder = PacketDecoder(config, module_id)
        self.counters = Counters("packets", "bytes", "frames", "complete_frames", "incomplete_frames",
                                 "lost_packets", "duplicate_packets", "late_packets", "malformed_packets",
                                 *MALFORMED_KINDS, "frames_not_delivered", "last_frame_id")
        self.frames = FrameBuffer.for_config(config)
        port = config.udp_port(module_id)
        self.sock, granted = open_udp_socket(settings.bind_host, port, settings.rcvbuf_bytes)
        self.rcvbuf_granted = granted
        if granted < settings.rcvbuf_bytes:
            log.warning("module %d: asked for a %d MiB UDP receive buffer, the kernel granted %d MiB; raise "
                        "net.core.rmem_max (sysctl -w net.core.rmem_max=%d)%s", module_id,
                        settings.rcvbuf_bytes >> 20, granted >> 20, settings.rcvbuf_bytes,
                        "; below 32 MiB packets are lost at high rates" if granted < WARN_RCVBUF_BELOW else "")
        else:
            log.info("module %d: UDP receive buffer %d MiB", module_id, granted >> 20)
        self.batch = BatchReceiver(self.sock, settings.batch, self.decoder.max_datagram,
                                   use_recvmmsg=settings.use_recvmmsg)
        self.context = context or zmq.Context.instance()
        self.push = make_socket(self.context, zmq.PUSH, hwm=PUSH_HWM)
        self.push.bind(module_frames_address(config, module_id))
        log.info("module %d: listening on %s:%d (%s, batches of %d), frames to %s", module_id,
                 settings.bind_host, port, self.batch.path, settings.batch, module_frames_address(config, module_id))
        # The open frame.
        self.n_packets = self.stream.packets_per_frame
        self.data_bytes = self.stream.packet_data_bytes
        self.n_full = self.stream.frame_bytes // self.data_bytes  # packets that carry data_bytes
        self.current_id: int | None = None
        self.current_data: np.ndarray | None = None
        self.current_fields: dict[str, int] = {}
        self.arrived = np.zeros(self.n_packets, dtype=bool)
        self.n_arrived = 0
        self.last_packet_at = 0.0
        self.recent = collections.deque(maxlen=RECENT_FRAMES)
        self.recent_set: set[int] = set()

    # --- the hot path -------------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> None:
        wait_s = timeout_s
        if self.current_id is not None:
            wait_s = min(wait_s, max(0.0, self.last_packet_at + self.settings.frame_timeout_s - time.monotonic()))
        if not self.batch.wait(wait_s):
            if self.current_id is not None and time.monotonic() - self.last_packet_at >= self.settings.frame_timeout_s:
                self._finish()
            return
        while True:
            n = self.batch.receive()
            if n == 0:
                return
            self._handle(n)
            if n < self.batch.batch:
                return

    def _handle(self, n: int) -> None:
        c = self.counters
        c.packets += n
        c.bytes += int(self.batch.lengths[:n].sum())
        self.last_packet_at = time.monotonic()
        d = self.decoder.decode(self.batch.buffer, self.batch.lengths, n)
        bad = n - int(d.valid.sum())
        if bad:
            c.malformed_packets += bad
            for kind, count in d.malformed.items():
                setattr(c, kind, getattr(c, kind) + count)
        valid_rows = np.flatnonzero(d.valid)
        if valid_rows.size == 0:
            return
        ids = d.image_id[valid_rows]
        first_id = int(ids[0])
        if (ids == first_id).all():  # the usual case: the whole batch belongs to one frame
            self._place(first_id, valid_rows, d)
            return
        # Split into runs of equal id, in arrival order.
        boundaries = np.flatnonzero(ids[1:] != ids[:-1]) + 1
        for rows in np.split(valid_rows, boundaries):
            self._place(int(d.image_id[rows[0]]), rows, d)

    def _place(self, image_id: int, rows: np.ndarray, d) -> None:
        if image_id != self.current_id:
            if image_id in self.recent_set:
                self.counters.late_packets += rows.size
                return
            if self.current_id is not None:
                self._finish()
            self._open(image_id, d.headers[rows[0]])
        packets = d.packet[rows]
        new = ~self.arrived[packets]
        if not new.all():
            self.counters.duplicate_packets += int((~new).sum())
            rows, packets = rows[new], packets[new]
            if packets.size == 0:  # every packet of this batch was a duplicate
                return
        if packets.size > 1:  # duplicates within the batch
            packets, first = np.unique(packets, return_index=True)
            if first.size != rows.size:
                self.counters.duplicate_packets += rows.size - first.size
            rows = rows[first]
        self.arrived[packets] = True
        self.n_arrived += packets.size
        hdr, data_bytes = self.decoder.header_bytes, self.data_bytes
        full = packets < self.n_full
        frame = self.current_data
        if full.all():
            k = packets.size
            p0, r0 = int(packets[0]), int(rows[0])
            if (int(packets[-1]) - p0 == k - 1 and int(rows[-1]) - r0 == k - 1
                    and (k < 3 or (np.diff(packets) == 1).all())):
                # In order (the usual case): one strided copy, no temporary.
                frame[p0 * data_bytes:(p0 + k) * data_bytes].reshape(k, data_bytes)[:] = \
                    self.batch.buffer[r0:r0 + k, hdr:hdr + data_bytes]
            else:
                frame[:self.n_full * data_bytes].reshape(self.n_full, data_bytes)[packets] = \
                    self.batch.buffer[rows, hdr:hdr + data_bytes]
        else:
            for row, packet in zip(rows, packets):
                size = self.stream.packet_payload_bytes(int(packet))
                offset = int(packet) * data_bytes
                frame[offset:offset + size] = self.batch.buffer[row, hdr:hdr + size]
        if self.n_arrived == self.n_packets:
            self._finish()

    def _open(self, image_id: int, header: np.void) -> None:
        self.current_id = image_id
        self.current_data = self.frames.begin_frame(image_id, self.module_id)
        self.current_fields = self.decoder.frame_fields(header)
        self.arrived[:] = False
        self.n_arrived = 0

    def _finish(self) -> None:
        image_id, c = self.current_id, self.counters
        missing = self.n_packets - self.n_arrived
        if missing:
            c.incomplete_frames += 1
            c.lost_packets += missing
            for packet in np.flatnonzero(~self.arrived):
                offset = int(packet) * self.data_bytes
                self.current_data[offset:offset + self.stream.packet_payload_bytes(int(packet))] = 0
        else:
            c.complete_frames += 1
        frame = ModuleFrame(id=image_id, n_recv_packets=self.n_arrived, n_packets=self.n_packets,
                            module_id=self.module_id, bit_depth=self.stream.bit_depth, **self.current_fields)
        self.frames.commit_frame(frame)
        try:
            self.push.send(frame.encode(), zmq.NOBLOCK)
        except zmq.Again:
            c.frames_not_delivered += 1
        c.frames += 1
        c.last_frame_id = image_id
        if len(self.recent) == self.recent.maxlen:
            self.recent_set.discard(self.recent[0])
        self.recent.append(image_id)
        self.recent_set.add(image_id)
        self.current_id = None
        self.current_data = None

    # --- Service --------------------------------------------------------------------------------------

    def stop(self) -> None:
        # Whatever is already queued in the socket belongs to frames the detector finished sending.
        while True:
            n = self.batch.receive()
            if n == 0:
                break
            self._handle(n)
        if self.current_id is not None:
            self._finish()

    def close(self) -> None:
        self.sock.close()
        self.push.close()
        self.frames.close()

    def stats(self) -> Mapping[str, int]:
        return self.counters.snapshot()
