"""What each detector sends (DESIGN.md §2, DETECTORS.md): header layouts and per-stream frame geometry.

Terminology used throughout the project: a *stream* is one UDP port, which std-daq calls a *module*;
`n_modules` in the config counts streams. A Jungfrau in two-interface mode therefore has two modules per
physical module, each carrying 256 of its 512 rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

JUNGFRAU = "jungfrau"
EIGER = "eiger"
GIGAFROST = "gigafrost"
DETECTOR_TYPES = (JUNGFRAU, EIGER, GIGAFROST)

# The 48-byte header that SLS detectors (Jungfrau, Eiger) put before each packet's data.
SLS_HEADER_DTYPE = np.dtype(
    [
        ("framenum", "<u8"),
        ("exptime", "<u4"),
        ("packetnum", "<u4"),
        ("bunchid", "<f8"),
        ("timestamp", "<u8"),
        ("moduleID", "<u2"),
        ("row", "<u2"),
        ("column", "<u2"),
        ("reserved", "<u2"),
        ("debug", "<u4"),
        ("roundRobin", "<u2"),
        ("detectortype", "u1"),
        ("headerVersion", "u1"),
    ]
)
assert SLS_HEADER_DTYPE.itemsize == 48

# The 32-byte Gigafrost header.
GF_HEADER_DTYPE = np.dtype(
    [
        ("protocol_id", "u1"),
        ("quadrant_row_length_in_blocks", "u1"),
        ("quadrant_rows", "u1"),
        ("status_flags", "u1"),
        ("scan_id", "<u4"),
        ("frame_index", "<u4"),
        ("image_status_flags", "<u2"),
        ("packet_starting_row", "<u2"),
        ("image_timing", "<u8"),
        ("sync_time", "<u4"),
        ("scan_time", "<u4"),
    ]
)
assert GF_HEADER_DTYPE.itemsize == 32
GF_PROTOCOL_ID = 0xCB
GF_MAX_DATA_BYTES = 7400
GF_PIXELS_PER_BLOCK = 12

JUNGFRAU_GAIN_SHIFT = 14
JUNGFRAU_ADC_MASK = 0x3FFF
JUNGFRAU_INVALID_GAIN = 2


@dataclass(frozen=True)
class StreamGeometry:
    """What one UDP stream (one std-daq module) sends per frame.

    `frame_bytes` is what std_udp_recv stores in the FrameBuffer: the payloads as they arrive, so a
    Gigafrost frame stays 12-bit packed (1.5 bytes per pixel).
    """

    detector_type: str
    header_dtype: np.dtype
    packet_data_bytes: int  # data bytes of a full packet (the last Gigafrost packet may be shorter)
    packets_per_frame: int
    frame_height: int  # pixel rows of this stream's frame
    frame_width: int
    bit_depth: int  # bits per pixel on the wire (12 for Gigafrost)
    rows_per_packet: int = 0  # Gigafrost only
    packet_padding_bytes: int = 0  # Gigafrost only: trailing bytes of a full packet that carry no pixels

    @property
    def header_bytes(self) -> int:
        return self.header_dtype.itemsize

    @property
    def packet_bytes(self) -> int:
        """Size of a full packet on the wire."""
        return self.header_bytes + self.packet_data_bytes + self.packet_padding_bytes

    @property
    def frame_bytes(self) -> int:
        return self.frame_height * self.frame_width * self.bit_depth // 8

    @property
    def pixel_dtype(self) -> np.dtype:
        """dtype of one pixel as received (Gigafrost: the uint16 it unpacks to)."""
        return np.dtype({8: "u1", 12: "<u2", 16: "<u2", 32: "<u4"}[self.bit_depth])

    def packet_offset(self, packet_number: int) -> int:
        """Byte offset in the frame of a packet's data."""
        return packet_number * self.packet_data_bytes

    def packet_payload_bytes(self, packet_number: int) -> int:
        """Pixel bytes that packet `packet_number` carries (only the last Gigafrost packet is shorter)."""
        return min(self.packet_data_bytes, self.frame_bytes - self.packet_offset(packet_number))


def jungfrau_stream(interfaces: int = 1) -> StreamGeometry:
    """Jungfrau: 1024 x 512 uint16 per module; two interfaces split it into two 256-row streams."""
    if interfaces not in (1, 2):
        raise ValueError(f"a Jungfrau module has 1 or 2 interfaces, not {interfaces}")
    rows = 512 // interfaces
    return StreamGeometry(JUNGFRAU, SLS_HEADER_DTYPE, 8192, rows * 1024 * 2 // 8192, rows, 1024, 16)


def eiger_stream(bit_depth: int) -> StreamGeometry:
    """Eiger half-module port: 512 x 256 pixels at 8, 16 or 32 bit, 4096 data bytes per packet."""
    if bit_depth not in (8, 16, 32):
        raise ValueError(f"Eiger bit depth must be 8, 16 or 32, not {bit_depth}")
    return StreamGeometry(EIGER, SLS_HEADER_DTYPE, 4096, 256 * 512 * bit_depth // 8 // 4096, 256, 512,
                          bit_depth)


def gigafrost_rows_per_packet(stream_width: int, stream_height: int) -> int:
    """Rows of 12-bit pixels in one Gigafrost packet (the firmware's formula, DETECTORS.md)."""
    blocks = stream_width // GF_PIXELS_PER_BLOCK
    c = (GF_MAX_DATA_BYTES // (36 * blocks)) * blocks // 2
    return min(c * 48 // stream_width, stream_height)


def gigafrost_stream(image_height: int, image_width: int) -> StreamGeometry:
    """Gigafrost: 8 streams (4 quadrants x 2 links), each image_width/2 wide and image_height/4 high."""
    if image_width % (2 * 2 * GF_PIXELS_PER_BLOCK) or image_height % 4:
        raise ValueError(
            f"Gigafrost image {image_height} x {image_width}: width must be a multiple of 48 "
            f"and height a multiple of 4"
        )
    width, height = image_width // 2, image_height // 4
    rows = gigafrost_rows_per_packet(width, height)
    if rows < 1:
        raise ValueError(f"Gigafrost stream width {width} does not fit one row in a packet")
    data_bytes = width * rows * 3 // 2
    padding = 36 if (rows % 2 and width % 48) else 0
    return StreamGeometry(GIGAFROST, GF_HEADER_DTYPE, data_bytes, math.ceil(height / rows), height,
                          width, 12, rows_per_packet=rows, packet_padding_bytes=padding)


# Gigafrost stream (module) numbering, a documented choice (docs/detectors.md):
# module_id = 2 * quadrant + link; quadrant 0 = NW (top left), 1 = NE, 2 = SW, 3 = SE;
# link 0 carries the quadrant's even rows, link 1 its odd rows.
GF_N_STREAMS = 8


def gigafrost_quadrant_link(module_id: int) -> tuple[int, int]:
    return module_id // 2, module_id % 2


def jungfrau_gain(pixels: np.ndarray) -> np.ndarray:
    return pixels >> JUNGFRAU_GAIN_SHIFT


def jungfrau_adc(pixels: np.ndarray) -> np.ndarray:
    return pixels & JUNGFRAU_ADC_MASK


def pack_12bit(pixels: np.ndarray) -> np.ndarray:
    """Pack 12-bit values (any integer array, even length) little-endian: pixel i in bits 12i..12i+11."""
    flat = np.ascontiguousarray(pixels, dtype=np.uint16).reshape(-1)
    if flat.size % 2:
        raise ValueError("12-bit packing needs an even number of pixels")
    even, odd = flat[0::2] & 0xFFF, flat[1::2] & 0xFFF
    out = np.empty((flat.size // 2, 3), dtype=np.uint8)
    out[:, 0] = even & 0xFF
    out[:, 1] = (even >> 8) | ((odd & 0xF) << 4)
    out[:, 2] = odd >> 4
    return out.reshape(-1)


def unpack_12bit(packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Unpack little-endian 12-bit pixels (3 bytes per 2 pixels) to uint16."""
    triples = np.asarray(packed, dtype=np.uint8).reshape(-1, 3).astype(np.uint16)
    if out is None:
        out = np.empty(triples.shape[0] * 2, dtype=np.uint16)
    pairs = out.reshape(-1, 2)
    pairs[:, 0] = triples[:, 0] | ((triples[:, 1] & 0xF) << 8)
    pairs[:, 1] = (triples[:, 1] >> 4) | (triples[:, 2] << 4)
    return out
