"""std_udp_recv: one module's UDP stream into the FrameBuffer, a ModuleFrame per finished frame.

The hot path (docs/std_udp_recv.md has the whole story and the numbers):

- *Aim*: before each recvmmsg, the payload iovec of message i is pointed at the slot position of packet
  `next + i` of the open frame (`next` = highest packet number arrived + 1, so every target is a position
  that has not received its packet). One numpy assignment aims the batch; a call takes at most the
  packets left in the frame. Positions whose payload is shorter than a full packet (Gigafrost's last)
  are never aimed at: their message goes to a scratch row.
- *Check*: in the usual case one vectorised test says that every datagram is the packet it was aimed at
  (valid, this frame, that packet number, full length): then nothing is copied and the batch costs a
  few numpy operations.
- *Repair* otherwise: every datagram is decoded; packets that landed at their own position count;
  valid packets that landed elsewhere (reordered, duplicated, or of another frame) are first gathered
  out of the slot into scratch rows (before anything can overwrite them) and then placed from there.
  A position that received a datagram that was not its packet, and never gets its own, is zero-filled
  when the frame finishes, exactly like a lost packet.
- *Peek*: when no frame is open, or no unreceived position is left after `next`, the header of the
  next datagram is read with MSG_PEEK (one small syscall per frame). A packet that opens a frame (or
  belongs to the open one) is then received straight into place; anything else goes to a scratch row.
  Why peek rather than guess (speculatively begin_frame(id + 1)): a wrong guess would mark a slot
  invalid and write into it; the peek costs ~2 us per frame and never touches a slot it is unsure of.

Which frame a valid packet belongs to, in order:
1. the open frame's id: placed (duplicates counted once);
2. the first id after start (or after an idle gap, below), or an id at most JUMP_WINDOW ahead of the
   newest frame: opens a new frame (the open one is finished first);
3. anything else (a jump back, or far ahead) is held back (not placed, not lost) until enough distinct
   packets of it (or of the ids just after it) arrived: CONFIRM_PACKETS, or, when the id is one of the
   last RECENT_FRAMES finished ones, more than half a frame (so a burst of late duplicates of a finished
   frame cannot pass for a restart). Then it is a detector restart or a new acquisition that reuses ids:
   the open frame is finished and the held packets are placed. A held id that is not confirmed before
   another frame opens, or while no new packet of it arrives for frame_timeout_s, is dropped and counted: a jump back as late packets,
   a jump ahead as stray packets (malformed). So one stray datagram of a plausible size never closes or
   damages the open frame.
After an idle gap (no datagram for forget_after_s: max(FORGET_AFTER_S, 3 frame timeouts)) the receiver
forgets the ids it has seen, so a new acquisition that numbers its frames from 1 again opens at once.

Every ModuleFrame carries the receiver's *acquisition* token, which changes whenever the ids start again
(a confirmed restart, or ids not above the last ones after an idle gap) and at every start of the
receiver: the assembler restarts its run when its receivers do, however short the acquisitions. It also
carries a *generation* unique to this write of the slot (start time in ns + frames written), so the
assembler can prove the slot still holds that very frame and not one of the same id written later.

Frames skipped in the stream (a frame opens with a frame index more than one above the previous frame's,
by at most JUMP_WINDOW) are counted in `frames_missed`, and their packets in `lost_packets`.

A frame is finished when all its packets arrived, when another frame opens, or when no packet of it was
placed for `frame_timeout_s` (datagrams that are not its packets do not keep it open). Missing packets
are zero-filled at finish and counted.

The ModuleFrame is committed to the slot before it is pushed; the PUSH never blocks the receiver: when the
assembler is gone or its queue is full, the frame is counted as not delivered.
"""
from __future__ import annotations

import collections
import logging
import socket
import struct
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
DEFAULT_BATCH = 128
RECENT_FRAMES = 16  # finished ids remembered to recognise late packets
JUMP_WINDOW = 1000  # ids at most this far ahead of the newest frame open a frame at once
CONFIRM_PACKETS = 4  # distinct packets that confirm any other new id (a restart)
FORGET_AFTER_S = 1.0  # no datagram for this long (or 3 frame timeouts, if longer): forget the ids seen
STOP_DRAIN_S = 1.0  # stop() takes what was queued, but for at most this long
PUSH_HWM = 10000
WARN_RCVBUF_BELOW = 32 * 2**20
_DONTWAIT = int(zmq.DONTWAIT)  # a plain int: the enum's __or__ showed up in profiles
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; Python does not name it
SO_MEMINFO = 55  # Linux: getsockopt gives the socket's memory counters; [0] is the receive queue's bytes


class ReceiverSettings:
    """The "udp_recv" config section (docs/std_udp_recv.md)."""

    def __init__(self, config: DetectorConfig) -> None:
        section = config.section("udp_recv")
        self.bind_host = section.str("bind_host", "0.0.0.0")
        self.rcvbuf_bytes = section.int("rcvbuf_bytes", DEFAULT_RCVBUF_BYTES, min=65536, max=2**30)
        self.frame_timeout_s = section.float("frame_timeout_s", DEFAULT_FRAME_TIMEOUT_S, min=0.001, max=60.0)
        self.batch = section.int("batch", DEFAULT_BATCH, min=1, max=1024)
        self.use_recvmmsg = section.bool("recvmmsg", True)
        self.strict_sls_header = section.bool("strict_sls_header", True)
        section.finish()


def open_udp_socket(host: str, port: int, rcvbuf_bytes: int) -> tuple[socket.socket, int, str]:
    """A bound UDP socket with the largest receive buffer the kernel grants: (socket, bytes granted, the
    option that set it). SO_RCVBUFFORCE ignores net.core.rmem_max but needs CAP_NET_ADMIN; without it,
    SO_RCVBUF is capped at net.core.rmem_max."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf_bytes)
        option = "SO_RCVBUFFORCE"
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        option = "SO_RCVBUF"
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux reports double
    sock.bind((host, port))
    return sock, granted, option


class UdpReceiver:
    name = "std_udp_recv"
    rate_counters = ("packets", "frames", "bytes")

    def __init__(self, config: DetectorConfig, module_id: int, context: zmq.Context | None = None) -> None:
        if not 0 <= module_id < config.n_modules:
            raise ConfigError("module_id", module_id, f"a module of this detector, 0 to {config.n_modules - 1}",
                              config.source)
        settings = ReceiverSettings(config)
        self.config, self.module_id, self.settings = config, module_id, settings
        self.stats_tags = {"module": str(module_id)}  # Prometheus labels (std-daq status reads them)
        self.influx_tags = {"module_id": str(module_id)}  # the existing std-daq dashboards' InfluxDB tag
        self.stream = config.stream
        self.decoder = PacketDecoder(config, module_id, strict_sls_header=settings.strict_sls_header)
        self.counters = Counters("packets", "bytes", "frames", "complete_frames", "incomplete_frames",
                                 "frames_missed", "lost_packets", "duplicate_packets", "late_packets", "malformed_packets",
                                 *MALFORMED_KINDS, "stray_packets", "restarts", "frames_not_delivered",
                                 "last_frame_id")
        self.frames = FrameBuffer.for_config(config)
        port = config.udp_port(module_id)
        self.sock, granted, option = open_udp_socket(settings.bind_host, port, settings.rcvbuf_bytes)
        self.rcvbuf_granted, self.rcvbuf_option = granted, option
        if granted < settings.rcvbuf_bytes:
            log.warning("module %d: asked for a %d MiB UDP receive buffer, the kernel granted %d MiB (%s); "
                        "raise net.core.rmem_max (sysctl -w net.core.rmem_max=%d) or give the service "
                        "CAP_NET_ADMIN%s", module_id, settings.rcvbuf_bytes >> 20, granted >> 20, option,
                        settings.rcvbuf_bytes,
                        "; below 32 MiB packets are lost at high rates" if granted < WARN_RCVBUF_BELOW else "")
        else:
            log.info("module %d: UDP receive buffer %d MiB (%s)", module_id, granted >> 20, option)
        stream = self.stream
        self.n_packets = stream.packets_per_frame
        self.data_bytes = stream.packet_data_bytes
        self.n_full = stream.frame_bytes // self.data_bytes  # packets that carry data_bytes: aimable
        self.batch = BatchReceiver(self.sock, settings.batch, self.decoder.header_bytes, self.data_bytes,
                                   self.decoder.max_datagram, use_recvmmsg=settings.use_recvmmsg)
        self.decoder.bind(self.batch.headers)
        self.context = context or zmq.Context.instance()
        self.push = make_socket(self.context, zmq.PUSH, hwm=PUSH_HWM)
        self.push.bind(module_frames_address(config, module_id))
        log.info("module %d: listening on %s:%d (%s, batches of %d), frames to %s", module_id,
                 settings.bind_host, port, self.batch.path, settings.batch, module_frames_address(config, module_id))
        self._offsets = np.arange(self.n_packets, dtype=np.uint64) * np.uint64(self.data_bytes)
        self._slot_rows: dict[int, tuple[np.ndarray, int]] = {}  # per slot: full-packet rows, data address
        self._positions = np.arange(self.n_packets, dtype=np.int64)
        # The open frame.
        self.current_id: int | None = None
        self.current_data: np.ndarray | None = None
        self._current_rows: np.ndarray | None = None  # its full-packet positions, (n_full, data_bytes)
        self._current_base = np.uint64(0)  # address of its data
        self.current_fields: dict[str, int] = {}
        self.arrived = np.zeros(self.n_packets, dtype=bool)
        self.n_arrived = 0
        self.next_packet = 0  # highest packet number arrived + 1
        self.last_placed_at = 0.0
        self.newest: int | None = None  # highest id opened since start, the last restart or idle gap
        self.recent = collections.deque(maxlen=RECENT_FRAMES)
        self.recent_set: set[int] = set()
        self.last_index: int | None = None  # frame index of the last frame opened: gaps are missed frames
        self.last_datagram_at = 0.0  # (about) when the last datagram was taken
        self._forget_after_s = max(FORGET_AFTER_S, 3 * settings.frame_timeout_s)
        self._forgotten: int | None = None  # the newest id when an idle gap made the receiver forget
        # What the last receive aimed at: messages 0..aim_direct-1 at positions aim_start.., the rest scratch.
        self.aim_start = 0
        self.aim_direct = 0
        # Held packets of an unconfirmed new id: copies of their headers and payloads, one row per distinct
        # (id, packet); a recent id needs more than half a frame of them.
        self._recent_confirm = max(CONFIRM_PACKETS, self.n_packets // 2 + 1)
        self._held_headers = np.zeros(self._recent_confirm, dtype=self.decoder.header_dtype)
        self._held_data = np.zeros((self._recent_confirm, self.data_bytes), dtype=np.uint8)
        self._held: list[tuple[int, int]] = []  # (image id, packet) per held row
        self._held_keys: set[tuple[int, int]] = set()
        self._held_repeats = 0  # datagrams of an (id, packet) already held: not stored
        self._held_need = CONFIRM_PACKETS
        self._held_since = 0.0
        self._timeout_s = settings.frame_timeout_s
        # ModuleFrame.acquisition and .generation (core_buffer/formats.py). Both start from the clock, so a
        # restarted receiver neither repeats a generation nor (but for a 1 in 2^32 chance) a token.
        start_ns = time.time_ns()
        self.acquisition = (start_ns // 1000) & 0xFFFF_FFFF
        self._generation = start_ns

    # --- the hot path -------------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> None:
        """Receive for at most about `timeout_s`: wait for data, then take batches until the socket is empty
        or the time is up (so under overload the run loop still gets to statistics and signals)."""
        now = time.monotonic()
        deadline = now + timeout_s
        wait_s = timeout_s
        if self.current_id is not None:
            wait_s = min(wait_s, max(0.0, self.last_placed_at + self._timeout_s - now))
        if self.batch.wait(wait_s):
            while True:
                n, asked = self._receive()
                if n < asked or time.monotonic() >= deadline:
                    break
            self.last_datagram_at = time.monotonic()
        self._check_timeouts()

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        if self.current_id is not None and now - self.last_placed_at >= self._timeout_s:
            self._finish()
        if self._held and now - self._held_since >= self._timeout_s:
            self._drop_held()
        if (self.newest is not None and self.current_id is None and not self._held
                and now - self.last_datagram_at >= self._forget_after_s):
            self._forget_ids()

    def _forget_ids(self) -> None:
        """An idle gap: the acquisition is over. The next one may number its frames from 1 again (Eiger,
        Gigafrost, a detector restarted per acquisition), so recent ids are no longer late packets. The
        frame index of the last frame stays: a stream interrupted for longer still counts its gap."""
        self._forgotten = self.newest
        self.newest = None
        self.recent.clear()
        self.recent_set.clear()

    def _receive(self) -> tuple[int, int]:
        """One receive call: (datagrams received, datagrams asked for)."""
        b = self.batch
        if not b.direct:
            self.aim_direct = 0
            n = b.receive(b.batch)
            if n:
                self._handle(n)
            return n, b.batch
        asked = self._aim()
        if asked == 0:
            return 0, 1
        n = b.receive(asked)
        if n:
            self._handle(n)
        return n, asked

    def _aim(self) -> int:
        """Point the payload iovecs at where the next datagrams belong; returns how many to take."""
        if self.current_id is not None and self.next_packet < self.n_full:
            start, stop = self.next_packet, self.n_full  # all positions after the highest arrived are free
        else:
            peeked = self._peek()
            if peeked is None:
                return 0
            start, stop = peeked
        b = self.batch
        if start < 0:  # not a packet we can place before seeing it: one message into a scratch row
            self.aim_direct = 0
            b.data_base[0] = b.scratch_addresses[0]
            return 1
        stop = min(stop, start + b.batch)
        k = stop - start
        np.add(self._offsets[start:stop], self._current_base, out=b.data_base[:k])
        self.aim_start, self.aim_direct = start, k
        if stop == self.n_full < self.n_packets and k < b.batch:
            b.data_base[k] = b.scratch_addresses[k]  # the short last packet
            k += 1
        return k

    def _peek(self) -> tuple[int, int] | None:
        """Look at the next datagram: (start, stop) positions to aim at, (-1, -1) for a scratch row, None
        if nothing is waiting. May finish the open frame and open the peeked one."""
        peeked = self.batch.peek()
        if peeked is None:
            return None
        header, length = peeked
        found = self.decoder.check_one(header, length)
        if found is None:
            return -1, -1
        image_id, packet = found
        if image_id != self.current_id:
            if not self._opens_at_once(image_id):
                return -1, -1
            if self.current_id is not None:
                self._finish()
            self._open(image_id, header)
            if packet < self.n_full:  # a fresh frame: every position from packet on is free
                return packet, self.n_full
        if packet >= self.n_full or self.arrived[packet]:
            return -1, -1
        free = np.flatnonzero(self.arrived[packet:self.n_full])  # the run of free positions from packet
        return packet, packet + int(free[0]) if free.size else self.n_full

    def _handle(self, n: int) -> None:
        c = self.counters
        c.packets += n
        direct = min(n, self.aim_direct)
        if direct and self.decoder.all_in_place(self.batch.lengths, direct, self.current_id, self.aim_start):
            if direct == n:
                self._count_in_place(n)  # the usual case: every datagram is already where it belongs
                return
            if n == direct + 1 and self._short_last_in_place(direct):
                self._count_in_place(direct)
                return
        self._repair(n)

    def _count_in_place(self, n: int) -> None:
        self.counters.bytes += n * self.decoder.full_length
        start = self.aim_start
        self.arrived[start:start + n] = True
        self.n_arrived += n
        if start + n > self.next_packet:  # (a peeked straggler fills a gap below next_packet)
            self.next_packet = start + n
        self.last_placed_at = time.monotonic()
        if self.n_arrived == self.n_packets:
            self._finish()

    def _short_last_in_place(self, i: int) -> bool:
        """Message i, received into a scratch row, is the open frame's short last packet (Gigafrost):
        copy it into place (a deliberate copy of a few KiB per frame: it cannot be aimed at directly)."""
        last = self.n_packets - 1
        length = int(self.batch.lengths[i])
        if self.arrived[last] or self.decoder.check_one(self.batch.headers[i], length) != (self.current_id, last):
            return False
        size = self.stream.packet_payload_bytes(last)
        offset = last * self.data_bytes
        self.current_data[offset:offset + size] = self.batch.scratch[i, :size]
        self.arrived[last] = True
        self.n_arrived += 1
        self.next_packet = self.n_packets
        self.counters.bytes += length
        return True

    def _repair(self, n: int) -> None:
        """Everything but the usual case: decode each datagram and put each valid packet in its place."""
        c, b = self.counters, self.batch
        c.bytes += int(b.lengths[:n].sum())
        d = self.decoder.decode(b.headers, b.lengths, n)
        bad = n - int(d.valid.sum())
        if bad:
            c.malformed_packets += bad
            for kind, count in d.malformed.items():
                setattr(c, kind, getattr(c, kind) + count)
        targets = np.full(n, -1, dtype=np.int64)  # the position each datagram was received into, -1: scratch
        k = min(n, self.aim_direct)
        targets[:k] = self._positions[self.aim_start:self.aim_start + k]
        if self.current_id is not None:
            in_place = d.valid & (targets >= 0) & (d.packet == targets) & (d.image_id == self.current_id)
        else:
            in_place = np.zeros(n, dtype=bool)
        moved = d.valid & ~in_place
        from_slot = np.flatnonzero(moved & (targets >= 0))
        if from_slot.size:
            # Deliberate copy: a valid packet that landed at another packet's position is gathered into
            # its scratch row before anything (its rightful packet, a zero fill) overwrites it there.
            b.scratch[from_slot] = self._current_rows[targets[from_slot]]
        placed = d.packet[in_place]
        if placed.size:
            self.arrived[placed] = True
            self.n_arrived += placed.size
            self.last_placed_at = time.monotonic()
        rows = np.flatnonzero(moved)
        if rows.size:
            ids = d.image_id[rows]
            if ids.size == 1 or (ids == ids[0]).all():
                runs = [rows]
            else:  # runs of equal id, in arrival order
                runs = np.split(rows, np.flatnonzero(ids[1:] != ids[:-1]) + 1)
            for run in runs:
                self._route(int(d.image_id[run[0]]), run, d.packet, d.headers, b.scratch)
        if self.current_id is not None:
            arrived_from_end = np.flatnonzero(self.arrived[::-1])
            self.next_packet = self.n_packets - int(arrived_from_end[0]) if arrived_from_end.size else 0
            if self.n_arrived == self.n_packets:
                self._finish()

    def _route(self, image_id: int, rows: np.ndarray, packets: np.ndarray, headers: np.ndarray,
               source: np.ndarray) -> None:
        """Valid packets `rows` of `image_id` (numbers `packets[rows]`, payloads `source[rows]`)."""
        if image_id != self.current_id:
            if not self._opens_at_once(image_id):
                self._hold(image_id, rows, packets, headers, source)
                return
            if self.current_id is not None:
                self._finish()
            self._open(image_id, headers[rows[0]])
        self._place(packets[rows], rows, source)

    def _opens_at_once(self, image_id: int) -> bool:
        return self.newest is None or self.newest < image_id <= self.newest + JUMP_WINDOW

    def _place(self, packets: np.ndarray, rows: np.ndarray, source: np.ndarray) -> None:
        """Copy payloads `source[rows]` of packets `packets` of the open frame into its slot."""
        new = ~self.arrived[packets]
        if not new.all():
            self.counters.duplicate_packets += int((~new).sum())
            packets, rows = packets[new], rows[new]
            if packets.size == 0:
                return
        if packets.size > 1:  # duplicates among these: keep the first copy of each
            packets, first = np.unique(packets, return_index=True)
            self.counters.duplicate_packets += rows.size - first.size
            rows = rows[first]  # the same permutation as packets: row i still carries packets[i]
        self.arrived[packets] = True
        self.n_arrived += packets.size
        self.last_placed_at = time.monotonic()
        full = packets < self.n_full
        if full.all():
            self._current_rows[packets] = source[rows]
        else:
            self._current_rows[packets[full]] = source[rows[full]]
            for packet, row in zip(packets[~full], rows[~full]):
                size = self.stream.packet_payload_bytes(int(packet))
                offset = int(packet) * self.data_bytes
                self.current_data[offset:offset + size] = source[row, :size]

    # --- ids that need confirming -----------------------------------------------------------------------

    def _hold(self, image_id: int, rows: np.ndarray, packets: np.ndarray, headers: np.ndarray,
              source: np.ndarray) -> None:
        """Keep packets of an unconfirmed new id until enough distinct ones of it (or of the ids just after
        it) arrived: CONFIRM_PACKETS, or more than half a frame when the first is a recent id (a burst of
        late duplicates of a finished frame is not a restart); then treat it as a restart."""
        for i, row in enumerate(rows):
            if self._held:
                first = self._held[0][0]
                if not first <= image_id <= first + JUMP_WINDOW:
                    self._drop_held()
            if not self._held:
                self._held_need = self._recent_confirm if image_id in self.recent_set else CONFIRM_PACKETS
            key = (image_id, int(packets[row]))
            if key in self._held_keys:
                self._held_repeats += 1
                continue
            self._held_since = time.monotonic()  # the timeout runs from the last new held packet
            k = len(self._held)
            self._held.append(key)
            self._held_keys.add(key)
            self._held_headers[k] = headers[row]
            self._held_data[k] = source[row]
            if len(self._held) >= self._held_need:
                self._confirm_held()
                rest = rows[i + 1:]
                if rest.size:
                    self._route(image_id, rest, packets, headers, source)
                return

    def _confirm_held(self) -> None:
        held, repeats = self._held, self._held_repeats
        self._held, self._held_keys, self._held_repeats = [], set(), 0
        log.warning("module %d: image id went from %s to %d (detector restart or new acquisition), confirmed "
                    "by %d packets", self.module_id, self.newest, held[0][0], len(held))
        self.counters.restarts += 1
        self.counters.duplicate_packets += repeats  # copies of packets that are now placed
        self._new_acquisition()
        if self.current_id is not None:
            self._finish()
        self.newest = None
        self.recent.clear()
        self.recent_set.clear()
        packets = np.array([p for _, p in held], dtype=np.int64)
        for i, (image_id, _) in enumerate(held):
            self._route(image_id, np.array([i]), packets, self._held_headers, self._held_data)

    def _drop_held(self) -> None:
        if not self._held:
            return
        n, first = len(self._held) + self._held_repeats, self._held[0][0]
        self._held, self._held_keys, self._held_repeats = [], set(), 0
        if self.newest is not None and first <= self.newest:
            self.counters.late_packets += n
        else:
            self.counters.stray_packets += n
            self.counters.malformed_packets += n

    # --- frames --------------------------------------------------------------------------------------

    def _open(self, image_id: int, header: bytes | bytearray | np.void) -> None:
        if self._held:
            self._drop_held()  # another frame opened: the held id was not a restart
        self.current_id = image_id
        self.current_data = self.frames.begin_frame(image_id, self.module_id)
        slot = self.frames.slot_of(image_id)
        if slot not in self._slot_rows:
            rows = self.current_data[:self.n_full * self.data_bytes].reshape(self.n_full, self.data_bytes)
            self._slot_rows[slot] = rows, np.uint64(self.current_data.ctypes.data)
        self._current_rows, self._current_base = self._slot_rows[slot]
        self.current_fields = fields = self.decoder.frame_fields(header)
        self.arrived[:] = False
        self.n_arrived = 0
        self.next_packet = 0
        self.last_placed_at = time.monotonic()
        if self.newest is None and self._forgotten is not None:
            if image_id <= self._forgotten:
                log.info("module %d: image ids start again at %d after an idle gap (new acquisition)",
                         self.module_id, image_id)
                self._new_acquisition()
            self._forgotten = None
        if self.newest is None or image_id > self.newest:
            self.newest = image_id
        # Frames the stream skipped (the receiver fell behind, the link was down, the detector dropped
        # them): counted by the frame index, which counts frames also where the id is a pulse id.
        index, last = fields["frame_index"], self.last_index
        if last is not None and last + 1 < index <= last + 1 + JUMP_WINDOW:
            missed = index - last - 1
            self.counters.frames_missed += missed
            self.counters.lost_packets += missed * self.n_packets
        self.last_index = index

    def _new_acquisition(self) -> None:
        """The ids start again: the frames from here on belong to a new acquisition (the assembler restarts
        its run when every module's does). Called before the first frame of it is finished."""
        self.acquisition = (self.acquisition + 1) & 0xFFFF_FFFF

    def _finish(self) -> None:
        image_id, c = self.current_id, self.counters
        missing = self.n_packets - self.n_arrived
        if missing:
            c.incomplete_frames += 1
            c.lost_packets += missing
            # Lost packets, and positions that received a datagram that was not theirs, read as zeros.
            self._current_rows[~self.arrived[:self.n_full]] = 0
            for packet in range(self.n_full, self.n_packets):
                if not self.arrived[packet]:
                    offset = packet * self.data_bytes
                    self.current_data[offset:offset + self.stream.packet_payload_bytes(packet)] = 0
        else:
            c.complete_frames += 1
        self._generation += 1
        frame = ModuleFrame(id=image_id, n_recv_packets=self.n_arrived, n_packets=self.n_packets,
                            module_id=self.module_id, bit_depth=self.stream.bit_depth,
                            acquisition=self.acquisition, generation=self._generation, **self.current_fields)
        self.frames.commit_frame(frame)
        try:
            self.push.send(frame.encode(), _DONTWAIT)
        except zmq.Again:
            c.frames_not_delivered += 1
        c.frames += 1
        c.last_frame_id = image_id
        if len(self.recent) == self.recent.maxlen:
            self.recent_set.discard(self.recent[0])
        self.recent.append(image_id)
        self.recent_set.add(image_id)
        self.current_id = None
        self.current_data = self._current_rows = None

    # --- Service --------------------------------------------------------------------------------------

    def _queued_bytes(self) -> int | None:
        """Bytes in the socket's receive queue (Linux SO_MEMINFO; kernel accounting, so more than the
        datagrams' sizes). FIONREAD would not do: for UDP it gives the size of the next datagram only."""
        try:
            return struct.unpack_from("I", self.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 36))[0]
        except OSError:
            return None

    def stop(self) -> None:
        # Whatever was queued when the stop came belongs to frames the detector finished sending: take it,
        # but no more than that (bounded by the queue's size at this moment) and for at most STOP_DRAIN_S,
        # so a detector that keeps sending cannot hold the stop up. Then finish the open frame.
        queued = self._queued_bytes()
        bytes_before = self.counters.bytes
        deadline = time.monotonic() + STOP_DRAIN_S
        while time.monotonic() < deadline:
            if queued is not None and self.counters.bytes - bytes_before >= queued:
                break
            n, _ = self._receive()
            if n == 0:
                break
        self._drop_held()
        if self.current_id is not None:
            self._finish()

    def close(self) -> None:
        self.sock.close()
        self.push.close()
        self.frames.close()

    def stats(self) -> Mapping[str, int]:
        return self.counters.snapshot()

    @staticmethod
    def interval_fields(now: Mapping[str, int | float], before: Mapping[str, int | float],
                        elapsed_s: float) -> dict[str, int]:
        """The fields of the existing std-daq std_udp_recv's InfluxDB line, over the last interval:
        packets lost (in incomplete and in missed frames), incomplete frames, and frames per second."""
        def delta(name: str) -> int:
            return int(now.get(name, 0) - before.get(name, 0))

        return {"n_missed_packets": delta("lost_packets"), "n_corrupted_frames": delta("incomplete_frames"),
                "repetition_rate": round(delta("frames") / elapsed_s) if elapsed_s > 0 else 0}
