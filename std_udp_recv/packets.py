"""Vectorised decoding and validation of a batch of detector datagrams (DESIGN.md §2).

A datagram is valid when its length is exactly what its packet number carries, its packet number is in
range, and its header fields make sense for this stream (Gigafrost: protocol id 0xCB, the quadrant and
link of this module, a starting row on a packet boundary; SLS pulse ids: a finite, non-negative number).
Everything else is malformed, counted by kind and dropped; nothing a datagram contains raises.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core_buffer.config import DetectorConfig
from core_buffer.detectors import GF_HEADER_DTYPE, GF_PROTOCOL_ID, GIGAFROST, SLS_HEADER_DTYPE, gigafrost_quadrant_link

# Kinds of malformed datagram, each with its own counter.
BAD_LENGTH = "bad_length_packets"  # too short for a header, or not the size its packet number carries
BAD_PACKET_NUMBER = "bad_packet_number_packets"  # packet number outside the frame
BAD_HEADER = "bad_header_packets"  # header fields that cannot belong to this stream
MALFORMED_KINDS = (BAD_LENGTH, BAD_PACKET_NUMBER, BAD_HEADER)

_MAX_ID = float(2**63)


@dataclass
class Decoded:
    """Per datagram of a batch: its image id, packet number and whether it is valid."""

    image_id: np.ndarray  # uint64
    packet: np.ndarray  # int64
    valid: np.ndarray  # bool
    malformed: dict[str, int]
    headers: np.ndarray  # the structured headers (for frame-level fields)


class PacketDecoder:
    def __init__(self, config: DetectorConfig, module_id: int) -> None:
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
        self.max_datagram = int(self.expected_length.max())
        if self.gigafrost:
            self.quadrant, self.link = gigafrost_quadrant_link(module_id)

    def decode(self, buffer: np.ndarray, lengths: np.ndarray, n: int) -> Decoded:
        lengths = lengths[:n]
        headers = np.ascontiguousarray(buffer[:n, :self.header_bytes]).view(self.header_dtype).reshape(n)
        long_enough = lengths >= self.header_bytes
        malformed = {kind: 0 for kind in MALFORMED_KINDS}
        if self.gigafrost:
            image_id = headers["frame_index"].astype(np.uint64)
            start_row = headers["packet_starting_row"].astype(np.int64)
            packet = start_row // self.stream.rows_per_packet
            flags = headers["status_flags"]
            header_ok = ((headers["protocol_id"] == GF_PROTOCOL_ID) & ((flags >> 6) == self.quadrant)
                         & (((flags >> 5) & 1) == self.link) & (start_row % self.stream.rows_per_packet == 0))
        else:
            packet = headers["packetnum"].astype(np.int64)
            if self.use_pulse_id:
                pulse = headers["bunchid"]
                with np.errstate(invalid="ignore"):
                    header_ok = np.isfinite(pulse) & (pulse >= 0) & (pulse < _MAX_ID)
                image_id = np.where(header_ok, pulse, 0).astype(np.uint64)
            else:
                image_id = headers["framenum"].astype(np.uint64)
                header_ok = np.ones(n, dtype=bool)
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

    def frame_fields(self, header: np.void) -> dict[str, int]:
        """pulse_id, frame_index, daq_rec, pos_y, pos_x of a frame, from one of its valid headers."""
        if self.gigafrost:
            return {"pulse_id": 0, "frame_index": int(header["frame_index"]), "daq_rec": int(header["scan_id"]),
                    "pos_y": self.quadrant, "pos_x": self.link}
        bunch = float(header["bunchid"])
        pulse = int(bunch) if 0 <= bunch < _MAX_ID else 0
        return {"pulse_id": pulse, "frame_index": int(header["framenum"]), "daq_rec": int(header["debug"]),
                "pos_y": int(header["row"]), "pos_x": int(header["column"])}
