"""Decoding and validation of detector datagrams (DESIGN.md §2): vectorised for a batch, scalar for one.

A datagram is valid when its length is exactly what its packet number carries, its packet number is in
range, and its header fields make sense for this stream:
- SLS (Jungfrau, Eiger): `detectortype` is the detector's (slsDetectorPackage numbering: Eiger 1,
  Jungfrau 3) and `headerVersion` is 2, unless the config turns that check off (`strict_sls_header`);
  for Jungfrau in two-interface mode the parity of `row` is the module's half (module_id % 2); with
  pulse ids, the pulse id is a finite, non-negative number below 2**63.
- Gigafrost: protocol id 0xCB, the quadrant and link of this module, a starting row on a packet boundary.
Everything else is malformed, counted by kind and dropped; nothing a datagram contains raises.

Three entry points, which must agree (a test fuzzes them against each other): `decode` (any batch, every
rule), `all_in_place` (the receiver's common case: is every datagram of a batch the packet it was aimed
at, of the open frame; a handful of numpy operations) and `check_one` (one header, with `struct`, for the
receiver's peek at the next datagram).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from core_buffer.config import DetectorConfig
from core_buffer.detectors import GF_HEADER_DTYPE, GF_PROTOCOL_ID, GIGAFROST, JUNGFRAU, SLS_HEADER_DTYPE, gigafrost_quadrant_link

# Kinds of malformed datagram, each with its own counter.
BAD_LENGTH = "bad_length_packets"  # too short for a header, or not the size its packet number carries
BAD_PACKET_NUMBER = "bad_packet_number_packets"  # packet number outside the frame
BAD_HEADER = "bad_header_packets"  # header fields that cannot belong to this stream
MALFORMED_KINDS = (BAD_LENGTH, BAD_PACKET_NUMBER, BAD_HEADER)

# What SLS detectors put in the last two header bytes (slsDetectorPackage's detectorType enum and
# SLS_DETECTOR_HEADER_VERSION).
SLS_DETECTOR_TYPE = {"jungfrau": 3, "eiger": 1}
SLS_HEADER_VERSION = 2

_MAX_ID = float(2**63)
_SLS = struct.Struct("<QIIdQHHHHIHBB")
_GF = struct.Struct("<BBBBIIHHQII")
assert _SLS.size == SLS_HEADER_DTYPE.itemsize and _GF.size == GF_HEADER_DTYPE.itemsize
_GF_STREAM_BITS = 0xE0  # status_flags bits 7..6 quadrant, bit 5 link


@dataclass
class Decoded:
    """Per datagram of a batch: its image id, packet number and whether it is valid."""

    image_id: np.ndarray  # uint64
    packet: np.ndarray  # int64
    valid: np.ndarray  # bool
    malformed: dict[str, int]
    headers: np.ndarray  # the structured headers (for frame-level fields)


class PacketDecoder:
    def __init__(self, config: DetectorConfig, module_id: int, *, strict_sls_header: bool = True) -> None:
        stream = config.stream
        self.stream = stream
        self.gigafrost = stream.detector_type == GIGAFROST
        self.header_dtype = GF_HEADER_DTYPE if self.gigafrost else SLS_HEADER_DTYPE
        self.header_bytes = stream.header_bytes
        self.n_packets = stream.packets_per_frame
        self.use_pulse_id = config.image_id_source == "pulse_id"
        lengths = []
        for k in range(self.n_packets):
            payload = stream.packet_payload_bytes(k)
            padding = stream.packet_padding_bytes if payload == stream.packet_data_bytes else 0
            lengths.append(self.header_bytes + payload + padding)
        self.expected_length = np.array(lengths, dtype=np.int64)
        self.full_length = int(self.expected_length[0])  # every packet but possibly Gigafrost's last
        self.max_datagram = int(self.expected_length.max())
        self._packets = np.arange(self.n_packets, dtype=np.int64)
        if self.gigafrost:
            self.quadrant, self.link = gigafrost_quadrant_link(module_id)
            self._gf_stream = (self.quadrant << 6) | (self.link << 5)
            self._start_rows = self._packets * stream.rows_per_packet
            # protocol id (byte 0) and the stream bits of status_flags (byte 3) as one little-endian word
            self._gf_word_mask = np.uint32(_GF_STREAM_BITS << 24 | 0xFF)
            self._gf_word = np.uint32(self._gf_stream << 24 | GF_PROTOCOL_ID)
        else:
            # detectortype and headerVersion as one little-endian u16 (header bytes 46, 47); None = unchecked
            self.sls_tail: int | None = None
            if strict_sls_header:
                self.sls_tail = SLS_DETECTOR_TYPE[stream.detector_type] | SLS_HEADER_VERSION << 8
            two_interfaces = stream.detector_type == JUNGFRAU and config.jungfrau_interfaces == 2
            self.row_parity: int | None = module_id % 2 if two_interfaces else None

    # --- a whole batch, every rule ---------------------------------------------------------------------

    def decode(self, buffer: np.ndarray, lengths: np.ndarray, n: int) -> Decoded:
        """`buffer` rows start with a datagram's header; `lengths[i]` is datagram i's size."""
        lengths = lengths[:n]
        headers = np.ascontiguousarray(buffer[:n, :self.header_bytes]).view(self.header_dtype).reshape(n)
        long_enough = lengths >= self.header_bytes
        malformed = {kind: 0 for kind in MALFORMED_KINDS}
        if self.gigafrost:
            image_id = headers["frame_index"].astype(np.uint64)
            start_row = headers["packet_starting_row"].astype(np.int64)
            packet = start_row // self.stream.rows_per_packet
            header_ok = ((headers["protocol_id"] == GF_PROTOCOL_ID)
                         & ((headers["status_flags"] & _GF_STREAM_BITS) == self._gf_stream)
                         & (start_row % self.stream.rows_per_packet == 0))
        else:
            packet = headers["packetnum"].astype(np.int64)
            header_ok = np.ones(n, dtype=bool)
            if self.sls_tail is not None:
                header_ok &= ((headers["detectortype"].astype(np.uint16) | headers["headerVersion"].astype(np.uint16) << 8)
                              == self.sls_tail)
            if self.row_parity is not None:
                header_ok &= (headers["row"] & 1) == self.row_parity
            if self.use_pulse_id:
                pulse = headers["bunchid"]
                with np.errstate(invalid="ignore"):
                    header_ok &= np.isfinite(pulse) & (pulse >= 0) & (pulse < _MAX_ID)
                image_id = np.where(header_ok, pulse, 0).astype(np.uint64)
            else:
                image_id = headers["framenum"].astype(np.uint64)
        in_range = (packet >= 0) & (packet < self.n_packets)
        length_ok = long_enough & (lengths == self.expected_length[np.clip(packet, 0, self.n_packets - 1)])
        # One reason per bad datagram, in order of what can be trusted: length, then header, then number.
        bad_length = ~long_enough | (in_range & header_ok & ~length_ok)
        bad_header = long_enough & ~header_ok
        bad_number = long_enough & header_ok & ~in_range
        malformed[BAD_LENGTH] = int(bad_length.sum())
        malformed[BAD_HEADER] = int(bad_header.sum())
        malformed[BAD_PACKET_NUMBER] = int(bad_number.sum())
        valid = long_enough & header_ok & in_range & length_ok
        return Decoded(image_id, packet, valid, malformed, headers)

    # --- the common case ------------------------------------------------------------------------------

    def bind(self, raw_headers: np.ndarray) -> None:
        """Make the views `all_in_place` reads: `raw_headers` is the receiver's (batch, header_bytes)
        uint8 array of header rows, which lives as long as the decoder."""
        self._h = raw_headers.view(self.header_dtype).reshape(len(raw_headers))
        if self.gigafrost:  # protocol id and status flags as one little-endian word
            self._word = raw_headers.view(np.uint32)[:, 0]
        else:  # detectortype and headerVersion as one little-endian u16
            self._word = raw_headers.view(np.uint16)[:, -1]

    def all_in_place(self, lengths: np.ndarray, n: int, image_id: int, first: int) -> bool:
        """True when datagrams 0..n-1 of the bound header rows are valid packets first, first+1, ...
        of frame `image_id`, all carrying full data: what `decode` would call valid, of that id and
        those packet numbers, in a handful of numpy operations. Needs first + n <= n_packets."""
        h = self._h[:n]
        ok = lengths[:n] == self.full_length
        if self.gigafrost:
            ok &= h["packet_starting_row"] == self._start_rows[first:first + n]
            ok &= h["frame_index"] == image_id
            ok &= (self._word[:n] & self._gf_word_mask) == self._gf_word
            return bool(ok.all())
        ok &= h["packetnum"] == self._packets[first:first + n]
        if self.use_pulse_id:
            ok &= h["bunchid"] == float(image_id)
        else:
            ok &= h["framenum"] == image_id
        if self.sls_tail is not None:
            ok &= self._word[:n] == self.sls_tail
        if self.row_parity is not None:
            ok &= (h["row"] & 1) == self.row_parity
        return bool(ok.all())

    # --- one header ------------------------------------------------------------------------------------

    def check_one(self, header: bytes | bytearray | memoryview, length: int) -> tuple[int, int] | None:
        """(image id, packet number) of one datagram (its header bytes and full length), None if malformed."""
        if length < self.header_bytes or len(header) < self.header_bytes:
            return None
        if self.gigafrost:
            (protocol, _, _, flags, _, frame_index, _, start_row, _, _, _) = _GF.unpack_from(header)
            rows = self.stream.rows_per_packet
            if protocol != GF_PROTOCOL_ID or flags & _GF_STREAM_BITS != self._gf_stream or start_row % rows:
                return None
            image_id, packet = frame_index, start_row // rows
        else:
            (framenum, _, packet, bunchid, _, _, row, _, _, _, _, dtype, version) = _SLS.unpack_from(header)
            if self.sls_tail is not None and (dtype | version << 8) != self.sls_tail:
                return None
            if self.row_parity is not None and row & 1 != self.row_parity:
                return None
            if self.use_pulse_id:
                if not (math.isfinite(bunchid) and 0 <= bunchid < _MAX_ID):
                    return None
                image_id = int(bunchid)
            else:
                image_id = framenum
        if not 0 <= packet < self.n_packets or length != self.expected_length[packet]:
            return None
        return image_id, packet

    def frame_fields(self, header: bytes | bytearray | memoryview | np.void) -> dict[str, int]:
        """pulse_id, frame_index, daq_rec, pos_y, pos_x of a frame, from one of its valid headers."""
        raw = header.tobytes() if isinstance(header, np.void) else header
        if self.gigafrost:
            (_, _, _, _, scan_id, frame_index, _, _, _, _, _) = _GF.unpack_from(raw)
            return {"pulse_id": 0, "frame_index": frame_index, "daq_rec": scan_id, "pos_y": self.quadrant,
                    "pos_x": self.link}
        (framenum, _, _, bunch, _, _, row, column, _, debug, _, _, _) = _SLS.unpack_from(raw)
        pulse = int(bunch) if 0 <= bunch < _MAX_ID else 0  # (False for NaN)
        return {"pulse_id": pulse, "frame_index": framenum, "daq_rec": debug, "pos_y": row, "pos_x": column}
