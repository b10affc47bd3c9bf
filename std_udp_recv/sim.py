"""The detector simulator: real-format packets for Jungfrau, Eiger and Gigafrost, one UDP port per module.

Pixel content is core_buffer.pattern's, so tests recompute every pixel. Each module's packets for an image
are built in one array: the pattern's bytes are laid out once, and per image only the header fields and
the image-id stamp of every row change. Faults for tests are injected per frame: whole frames not sent, random or
periodic packet drops (or a fixed list of packet numbers), duplicates, reordering within the frame (a shuffle, or
swapped neighbours), and malformed datagrams of every kind the receiver must survive, sent in the middle
of the frame's packets.
"""
from __future__ import annotations

import ctypes
import errno
import os
import random
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from core_buffer.config import DetectorConfig
from core_buffer.detectors import (EIGER, GF_HEADER_DTYPE, GF_PROTOCOL_ID, GIGAFROST, SLS_HEADER_DTYPE,
                                   gigafrost_quadrant_link, pack_12bit)
from core_buffer.errors import StdDaqError
from core_buffer.pattern import STAMP_COLUMNS, frame_bytes, stamp
from std_udp_recv.batch import IoVec, MMsgHdr, load_libc_function
from std_udp_recv.packets import SLS_DETECTOR_TYPE, SLS_HEADER_VERSION

REORDER_MODES = ("shuffle", "swap")
# Malformed datagrams, sent in this order (cycling) when faults ask for them:
MALFORMED_KINDS = (
    "short",  # shorter than a header
    "long",  # a valid packet with 7 bytes too many
    "garbage",  # random header bytes
    "bad_number",  # packet number beyond the frame
    "wrong_type",  # valid length and number, but SLS detectortype (Gigafrost: protocol id) of another detector
    "foreign_id",  # a valid packet in every field but its image id, which is FOREIGN_ID_OFFSET ahead
)
FOREIGN_ID_OFFSET = 1_000_003

# A frame's packets in one system call where libc has sendmmsg (a Python sendto loop tops out near
# 1 kHz of Jungfrau frames on a small machine, below what the receiver must be tested at).
_SENDMMSG = load_libc_function("sendmmsg", [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int])


class HostError(StdDaqError):
    """The simulator's destination host does not resolve to an IPv4 address."""


def resolve_ipv4(host: str) -> str:
    """The IPv4 address of `host` (a name or an address), looked up once: the packets are sent to it with
    prebuilt sockaddrs, so a name is never resolved per packet."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise HostError(f"cannot resolve host {host!r} to an IPv4 address: {exc}") from None
    if not infos:
        raise HostError(f"host {host!r} has no IPv4 address")
    return infos[0][4][0]


def eiger_port_place(config: DetectorConfig, module_id: int) -> tuple[int, int]:
    """(row, column) of an Eiger half-module port in the detector, which its SLS header carries
    (DETECTORS.md): with module_positions, the rank of the stream's top row among all streams' top rows
    and of its left column among their left columns; without, the one-module layout of the default
    geometry (streams 0 and 1 the top half, left and right; 2 and 3 the bottom half): m // 2, m % 2."""
    positions = config.module_positions
    if not positions:
        return module_id // 2, module_id % 2
    tops = sorted({min(p.y0, p.y1) for p in positions})
    lefts = sorted({min(p.x0, p.x1) for p in positions})
    p = positions[module_id]
    return tops.index(min(p.y0, p.y1)), lefts.index(min(p.x0, p.x1))


@dataclass
class Faults:
    drop_fraction: float = 0.0  # each packet dropped with this probability
    drop_every: int = 0  # drop one packet (number image_id % n_packets) of every image with id % N == 0
    duplicate_fraction: float = 0.0
    reorder: str | bool = ""  # "shuffle" the packets of each frame, or "swap" neighbours (0, 2, 1, 4, 3, ...)
    malformed_per_frame: int = 0  # extra malformed datagrams per frame, of the kinds below in turn
    seed: int = 1
    drop_packets: tuple[int, ...] = ()  # packet numbers dropped from every frame
    malformed_kinds: tuple[str, ...] = MALFORMED_KINDS
    drop_images: tuple[int, ...] = ()  # image ids whose frames are not sent at all (whole frames lost)
    drop_images_modules: tuple[int, ...] | None = None  # ... by these modules only (default: every module)

    def __post_init__(self) -> None:
        if self.reorder is True:
            self.reorder = "shuffle"
        if self.reorder not in ("", False, *REORDER_MODES):
            raise ValueError(f"reorder must be one of {REORDER_MODES}, not {self.reorder!r}")
        unknown = set(self.malformed_kinds) - set(MALFORMED_KINDS)
        if unknown:
            raise ValueError(f"unknown malformed kinds {sorted(unknown)}; known: {MALFORMED_KINDS}")

    @property
    def reorders(self) -> bool:
        return self.reorder in REORDER_MODES


@dataclass
class SimStats:
    images: int = 0
    packets: int = 0
    dropped: int = 0
    duplicated: int = 0
    malformed: int = 0
    dropped_ids: list[int] = field(default_factory=list)
    dropped_frames: int = 0  # whole frames not sent (Faults.drop_images)
    seconds: float = 0.0  # time run() took

    @property
    def rate_hz(self) -> float:
        """Images per second that run() achieved."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


class ModuleSender:
    """The packets of one module: built per image in place, sent in order (or in the faults' order)."""

    def __init__(self, config: DetectorConfig, module_id: int) -> None:
        stream = config.stream
        self.stream, self.module_id = stream, module_id
        self.gigafrost = stream.detector_type == GIGAFROST
        self.header_dtype = GF_HEADER_DTYPE if self.gigafrost else SLS_HEADER_DTYPE
        hdr = self.header_dtype.itemsize
        self.hdr = hdr
        n = stream.packets_per_frame
        self.lengths = []
        for k in range(n):
            payload = stream.packet_payload_bytes(k)
            padding = stream.packet_padding_bytes if payload == stream.packet_data_bytes else 0
            self.lengths.append(hdr + payload + padding)
        self.packets = np.zeros((n, max(self.lengths)), dtype=np.uint8)
        body = frame_bytes(stream, module_id, 0)
        for k in range(n):
            size = stream.packet_payload_bytes(k)
            off = stream.packet_offset(k)
            self.packets[k, hdr:hdr + size] = body[off:off + size]
        self.headers = np.zeros(n, dtype=self.header_dtype)
        self._init_headers(config)
        # Where each row's stamp bytes sit: (packet, byte offset in the datagram) per frame row.
        row_bytes = stream.frame_width * stream.bit_depth // 8
        starts = np.arange(stream.frame_height) * row_bytes
        self.stamp_packet = (starts // stream.packet_data_bytes)[:, None]
        stamp_bytes = STAMP_COLUMNS * stream.bit_depth // 8
        self.stamp_offset = (hdr + starts % stream.packet_data_bytes)[:, None] + np.arange(stamp_bytes)[None, :]
        self.address = ("127.0.0.1", config.udp_port(module_id))
        # One view per datagram, made once: build() rewrites the packets in place.
        self.views = [memoryview(self.packets[k, :self.lengths[k]]) for k in range(n)]

    def prepare_sendmmsg(self) -> None:
        """The message array for sending the whole frame in order with one sendmmsg (to self.address)."""
        self.mmsgs = None
        if _SENDMMSG is None:
            return
        n = len(self.lengths)
        host, port = self.address
        self._sockaddr = ctypes.create_string_buffer(
            socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big") + socket.inet_aton(host) + bytes(8), 16)
        self._iovecs = (IoVec * n)()
        iov = np.frombuffer(self._iovecs, dtype=np.uint64).reshape(n, 2)
        iov[:, 0] = self.packets.ctypes.data + np.arange(n, dtype=np.uint64) * self.packets.shape[1]
        iov[:, 1] = self.lengths
        self.mmsgs = (MMsgHdr * n)()
        for k in range(n):
            hdr = self.mmsgs[k].msg_hdr
            hdr.msg_name = ctypes.addressof(self._sockaddr)
            hdr.msg_namelen = 16
            hdr.msg_iov = ctypes.pointer(self._iovecs[k])
            hdr.msg_iovlen = 1

    def _init_headers(self, config: DetectorConfig) -> None:
        h, stream, n = self.headers, self.stream, self.stream.packets_per_frame
        if self.gigafrost:
            quadrant, link = gigafrost_quadrant_link(self.module_id)
            quadrant_rows = config.image_pixel_height // 2
            h["protocol_id"] = GF_PROTOCOL_ID
            h["quadrant_row_length_in_blocks"] = stream.frame_width // 12
            h["quadrant_rows"] = quadrant_rows & 0xFF
            h["status_flags"] = (quadrant << 6) | (link << 5) | ((quadrant_rows >> 8) & 0x3)
            h["packet_starting_row"] = np.arange(n) * stream.rows_per_packet
        else:
            h["packetnum"] = np.arange(n)
            h["moduleID"] = self.module_id
            if stream.detector_type == EIGER:
                h["row"], h["column"] = eiger_port_place(config, self.module_id)
            else:  # Jungfrau: modules stacked; with two interfaces, the half of the module
                h["row"] = self.module_id % 2 if config.jungfrau_interfaces == 2 else self.module_id
            h["detectortype"] = SLS_DETECTOR_TYPE[stream.detector_type]
            h["headerVersion"] = SLS_HEADER_VERSION

    def _stamp_bytes(self, image_id: int) -> np.ndarray:
        pixels = stamp(image_id)
        if self.gigafrost:
            return pack_12bit(pixels)
        return pixels.astype(self.stream.pixel_dtype).view(np.uint8)

    def build(self, image_id: int) -> None:
        h = self.headers
        if self.gigafrost:
            h["frame_index"] = image_id & 0xFFFFFFFF
            h["image_timing"] = image_id
        else:
            h["framenum"] = image_id
            h["bunchid"] = float(image_id)
            h["timestamp"] = image_id
        self.packets[:, :self.hdr] = h.view(np.uint8).reshape(len(h), self.hdr)
        self.packets[self.stamp_packet, self.stamp_offset] = self._stamp_bytes(image_id)

    def datagram(self, k: int) -> memoryview:
        return self.views[k]


class Simulator:
    def __init__(self, config: DetectorConfig, modules: list[int] | None = None, host: str = "127.0.0.1",
                 faults: Faults | None = None) -> None:
        self.config = config
        address = resolve_ipv4(host)  # raises HostError
        self.senders = [ModuleSender(config, m) for m in (modules if modules is not None else range(config.n_modules))]
        for sender in self.senders:
            sender.address = (address, sender.address[1])
            sender.prepare_sendmmsg()
        self.faults = faults or Faults()
        self.rng = random.Random(self.faults.seed)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 2**20)
        self.stats = SimStats()

    def _order(self, n: int, image_id: int) -> list[int]:
        f = self.faults
        order = list(range(n))
        if f.reorder == "shuffle":
            self.rng.shuffle(order)
        elif f.reorder == "swap":  # 0, 2, 1, 4, 3, ...: the first and (for an even count) the last packet stay
            for k in range(1, n - 1, 2):
                order[k], order[k + 1] = order[k + 1], order[k]
        if f.drop_packets:
            kept = [k for k in order if k not in f.drop_packets]
            self.stats.dropped += len(order) - len(kept)
            order = kept
        if f.drop_every and image_id % f.drop_every == 0:
            order.remove(image_id % n)
            self.stats.dropped += 1
            self.stats.dropped_ids.append(image_id)
        if f.drop_fraction:
            kept = [k for k in order if self.rng.random() >= f.drop_fraction]
            self.stats.dropped += len(order) - len(kept)
            order = kept
        if f.duplicate_fraction:
            dups = [k for k in order if self.rng.random() < f.duplicate_fraction]
            self.stats.duplicated += len(dups)
            order += dups
        return order

    def _malformed(self, sender: ModuleSender, image_id: int) -> list[bytes]:
        """`malformed_per_frame` datagrams of the faults' kinds in turn (MALFORMED_KINDS), built from the
        frame's packet 0 (its header already says `image_id`)."""
        good = bytes(sender.datagram(0))
        hdr = sender.hdr
        out = []
        for i in range(self.faults.malformed_per_frame):
            kind = self.faults.malformed_kinds[i % len(self.faults.malformed_kinds)]
            if kind == "short":
                out.append(good[:hdr - 5])
            elif kind == "long":
                out.append(good + b"\x00" * 7)
            elif kind == "garbage":
                out.append(bytes(self.rng.getrandbits(8) for _ in range(hdr)) + good[hdr:])
            else:
                bad = bytearray(good)
                if kind == "bad_number":
                    if sender.gigafrost:
                        row = sender.stream.frame_height + sender.stream.rows_per_packet
                        bad[14:16] = row.to_bytes(2, "little")
                    else:
                        bad[12:16] = (sender.stream.packets_per_frame + 3).to_bytes(4, "little")
                elif kind == "wrong_type":
                    if sender.gigafrost:
                        bad[0] = GF_PROTOCOL_ID ^ 0x01
                    else:
                        bad[46] = SLS_DETECTOR_TYPE["eiger" if sender.stream.detector_type == "jungfrau" else "jungfrau"]
                else:  # foreign_id
                    foreign = image_id + FOREIGN_ID_OFFSET
                    if sender.gigafrost:
                        bad[8:12] = (foreign & 0xFFFFFFFF).to_bytes(4, "little")
                    else:
                        bad[0:8] = foreign.to_bytes(8, "little")
                        bad[16:24] = np.float64(foreign).tobytes()  # bunchid, for pulse-id configs
                out.append(bytes(bad))
        return out

    def send_image(self, image_id: int) -> None:
        st, f = self.stats, self.faults
        for sender in self.senders:
            if image_id in f.drop_images and (f.drop_images_modules is None
                                               or sender.module_id in f.drop_images_modules):
                st.dropped += len(sender.lengths)
                st.dropped_frames += 1
                continue
            sender.build(image_id)
            address = sender.address
            n = len(sender.lengths)
            if not (f.reorders or f.drop_every or f.drop_fraction or f.duplicate_fraction or f.drop_packets
                    or f.malformed_per_frame):
                if sender.mmsgs is not None:
                    self._sendmmsg(sender.mmsgs, n)
                else:
                    for datagram in sender.views:
                        self._send_one(datagram, address)
                st.packets += n
                continue
            order = self._order(n, image_id)
            # Malformed datagrams go in the middle of the frame (after packet n // 2 is sent), where the
            # receiver has the frame open and aims at the positions that follow.
            malformed = self._malformed(sender, image_id) if f.malformed_per_frame else []
            middle = n // 2 + 1
            for i, k in enumerate(order):
                if i == middle and malformed:
                    self._send_all(malformed, address)
                    st.malformed += len(malformed)
                    malformed = []
                self._send_one(sender.views[k], address)
                st.packets += 1
            if malformed:
                self._send_all(malformed, address)
                st.malformed += len(malformed)
        st.images += 1

    def _sendmmsg(self, mmsgs, n: int) -> None:
        fd, base, size = self.sock.fileno(), ctypes.addressof(mmsgs), ctypes.sizeof(MMsgHdr)
        sent = 0
        while sent < n:
            done = _SENDMMSG(fd, base + sent * size, n - sent, 0)
            if done < 0:
                err = ctypes.get_errno()
                if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS):
                    time.sleep(0.0001)
                    continue
                raise OSError(err, os.strerror(err))
            sent += done

    def _send_one(self, datagram, address) -> None:
        while True:
            try:
                self.sock.sendto(datagram, address)
                return
            except BlockingIOError:
                time.sleep(0.0001)

    def _send_all(self, datagrams, address) -> None:
        for datagram in datagrams:
            self._send_one(datagram, address)

    def run(self, rate_hz: float, n_images: int | None, start_id: int = 1, stop=None) -> SimStats:
        """Send images start_id, start_id + 1, ... at `rate_hz` (0: as fast as possible)."""
        period = 1.0 / rate_hz if rate_hz > 0 else 0.0
        t0 = time.monotonic()
        i = 0
        while n_images is None or i < n_images:
            if stop is not None and stop.is_set():
                break
            if period:
                delay = t0 + i * period - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.send_image(start_id + i)
            i += 1
        self.stats.seconds = time.monotonic() - t0
        return self.stats

    def close(self) -> None:
        self.sock.close()
