"""Messages between processes (DESIGN.md §4), as frozen dataclasses with encode/decode.

Each fixed-size message has a struct format for encode/decode and a numpy dtype with the same bytes, so
that the ring buffers can keep the message in a slot and services can read it there without a copy.
All layouts are little-endian and packed.
"""
from __future__ import annotations

import enum
import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterable

import numpy as np

from core_buffer.errors import FormatError

# An id no real trigger has: marks a ring-buffer slot as "being written" (DESIGN.md §3).
INVALID_ID = 0xFFFF_FFFF_FFFF_FFFF


def _check_size(data: bytes | memoryview, size: int, what: str) -> None:
    if len(data) != size:
        raise FormatError(f"{what} must be {size} bytes, got {len(data)}")


@dataclass(frozen=True)
class ModuleFrame:
    """One finished frame of one module: std_udp_recv -> std_assembler, and the FrameBuffer slot meta.

    DESIGN.md §4 fixes the first 50 bytes; this project uses the reserved bytes after them
    (docs/design-choices.md, "ModuleFrame's reserved bytes"):
    - `acquisition` (u32 at 52): the receiver's acquisition token. It changes whenever that receiver's
      image ids start again (a confirmed restart, or ids not above the last ones after an idle gap), and
      at every start of the receiver, so the assembler restarts its run together with its receivers.
    - `generation` (u64 at 56): unique per frame written into the FrameBuffer by that module's receivers,
      past and future (the receiver's start time in ns plus its frame count). A reader holding a message
      proves the slot still holds *that* frame, not only a frame of the same id (another acquisition's).
    """

    id: int
    pulse_id: int = 0
    frame_index: int = 0
    daq_rec: int = 0
    n_recv_packets: int = 0
    n_packets: int = 0
    module_id: int = 0
    bit_depth: int = 16
    pos_y: int = 0
    pos_x: int = 0
    acquisition: int = 0
    generation: int = 0

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQQIIIHHH2xIQ")
    SIZE: ClassVar[int] = 64
    DTYPE: ClassVar[np.dtype] = np.dtype(
        {
            "names": ["id", "pulse_id", "frame_index", "daq_rec", "n_recv_packets", "n_packets",
                      "module_id", "bit_depth", "pos_y", "pos_x", "acquisition", "generation"],
            "formats": ["<u8", "<u8", "<u8", "<u8", "<u4", "<u4", "<u4", "<u2", "<u2", "<u2", "<u4", "<u8"],
            "offsets": [0, 8, 16, 24, 32, 36, 40, 44, 46, 48, 52, 56],
            "itemsize": 64,
        }
    )

    @property
    def is_complete(self) -> bool:
        return self.n_recv_packets == self.n_packets

    def encode(self) -> bytes:
        return self.STRUCT.pack(
            self.id, self.pulse_id, self.frame_index, self.daq_rec, self.n_recv_packets, self.n_packets,
            self.module_id, self.bit_depth, self.pos_y, self.pos_x, self.acquisition, self.generation,
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ModuleFrame:
        _check_size(data, cls.SIZE, "ModuleFrame")
        return cls(*cls.STRUCT.unpack(data))

    @classmethod
    def from_record(cls, record: np.void | np.ndarray) -> ModuleFrame:
        """Build from one element of an array of DTYPE (for example a FrameBuffer meta view)."""
        return cls(*(int(record[name]) for name in cls.DTYPE.names))


class Dtype(enum.IntEnum):
    """ImageMetadata.dtype codes."""

    UINT8 = 1
    UINT16 = 2
    UINT32 = 4
    UINT64 = 8
    FLOAT16 = 12
    FLOAT32 = 14
    FLOAT64 = 18

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(_DTYPE_TO_NUMPY[self])

    @classmethod
    def from_numpy(cls, dtype: np.dtype | str | type) -> Dtype:
        name = np.dtype(dtype).newbyteorder("<").str
        for code, np_name in _DTYPE_TO_NUMPY.items():
            if np.dtype(np_name).str == name:
                return code
        raise FormatError(f"numpy dtype {np.dtype(dtype)} has no ImageMetadata dtype code")


_DTYPE_TO_NUMPY = {
    Dtype.UINT8: "<u1", Dtype.UINT16: "<u2", Dtype.UINT32: "<u4", Dtype.UINT64: "<u8",
    Dtype.FLOAT16: "<f2", Dtype.FLOAT32: "<f4", Dtype.FLOAT64: "<f8",
}


class Encoding(enum.IntEnum):
    RAW = 0
    BITSHUFFLE_LZ4 = 1


class ImageStatus(enum.IntEnum):
    GOOD = 0
    MISSING_PACKETS = 1
    ID_MISMATCH = 2
    MISSING_MODULE = 3


@dataclass(frozen=True)
class ImageMetadata:
    """One assembled image in the ImageBuffer: std_assembler / std_stream_recv PUB stream (56 B)."""

    id: int
    height: int
    width: int
    dtype: int = Dtype.UINT16
    encoding: int = Encoding.RAW
    source_id: int = 0
    status: int = ImageStatus.GOOD
    user_1: int = 0
    user_2: int = 0
    version: int = 1

    VERSION: ClassVar[int] = 1
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQQHHHHQQ")
    SIZE: ClassVar[int] = 56
    DTYPE: ClassVar[np.dtype] = np.dtype(
        {
            "names": ["version", "id", "height", "width", "dtype", "encoding", "source_id", "status",
                      "user_1", "user_2"],
            "formats": ["<u8", "<u8", "<u8", "<u8", "<u2", "<u2", "<u2", "<u2", "<u8", "<u8"],
            "offsets": [0, 8, 16, 24, 32, 34, 36, 38, 40, 48],
            "itemsize": 56,
        }
    )

    @property
    def sequence(self) -> int:
        """The producer's message sequence number (user_1)."""
        return self.user_1

    @property
    def numpy_dtype(self) -> np.dtype:
        return Dtype(self.dtype).numpy

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def nbytes(self) -> int:
        """Bytes of the raw image (for encoding 1, the compressed size is user_2)."""
        return self.height * self.width * self.numpy_dtype.itemsize

    def encode(self) -> bytes:
        return self.STRUCT.pack(
            self.version, self.id, self.height, self.width, self.dtype, self.encoding, self.source_id,
            self.status, self.user_1, self.user_2,
        )

    @classmethod
    def decode(cls, data: bytes | memoryview) -> ImageMetadata:
        _check_size(data, cls.SIZE, "ImageMetadata")
        (version, id_, height, width, dtype, encoding, source_id, status, user_1,
         user_2) = cls.STRUCT.unpack(data)
        if version != cls.VERSION:
            raise FormatError(f"ImageMetadata version {version} is not supported (expected {cls.VERSION})")
        try:
            Dtype(dtype)
        except ValueError:
            raise FormatError(f"ImageMetadata dtype code {dtype} is unknown") from None
        if encoding not in Encoding.__members__.values():
            raise FormatError(f"ImageMetadata encoding {encoding} is unknown")
        return cls(id_, height, width, dtype, encoding, source_id, status, user_1, user_2, version)

    @classmethod
    def from_record(cls, record: np.void | np.ndarray) -> ImageMetadata:
        values = {name: int(record[name]) for name in cls.DTYPE.names}
        return cls(**values)


@dataclass(frozen=True)
class Verdict:
    """std_stream_send -> std_stream_recv, once per image after ZMQ let go of the image's bytes (9 B):
    image id u64, then 1 if the source slot still held the image after its bytes went out, 0 if it was
    overwritten meanwhile (docs/std_stream.md). The replica publishes an image only after a good verdict.

    A verdict message (one ZMQ frame) carries the verdicts of any number of images back to back, in the
    order of the images (`encode_many`, `decode_many`); an empty one carries none."""

    image_id: int
    intact: bool

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QB")
    SIZE: ClassVar[int] = 9
    INTACT: ClassVar[int] = 1
    TORN: ClassVar[int] = 0

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.image_id, self.INTACT if self.intact else self.TORN)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Verdict:
        _check_size(data, cls.SIZE, "Verdict")
        image_id, verdict = cls.STRUCT.unpack(data)
        if verdict not in (cls.INTACT, cls.TORN):
            raise FormatError(f"Verdict {verdict} of image {image_id} is unknown (expected 1 intact, 0 torn)")
        return cls(image_id, verdict == cls.INTACT)

    @classmethod
    def encode_many(cls, verdicts: Iterable[Verdict]) -> bytes:
        """A verdict message: the verdicts back to back, in the order given."""
        return b"".join(v.encode() for v in verdicts)

    @classmethod
    def decode_many(cls, data: bytes | memoryview) -> list[Verdict]:
        """The verdicts of a verdict message, in order; FormatError if its size is not a multiple of 9 B or
        any verdict in it is unknown (then none of them is returned)."""
        if len(data) % cls.SIZE:
            raise FormatError(f"a verdict message must be a multiple of {cls.SIZE} bytes, got {len(data)}")
        return [cls.decode(data[i:i + cls.SIZE]) for i in range(0, len(data), cls.SIZE)]


class StoreOp(enum.IntEnum):
    WRITE = 0
    START = 1
    STOP = 2


@dataclass(frozen=True)
class StoreStream:
    """writer_agent -> std_h5_writer (80 B, plus a JSON request frame on START)."""

    op: int
    i_image: int = 0
    n_images: int = 0
    user_id: int = 0
    run_id: int = 0
    image: ImageMetadata = field(default_factory=lambda: ImageMetadata(0, 0, 0))

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIIQ")
    SIZE: ClassVar[int] = 80

    def encode(self) -> bytes:
        return self.STRUCT.pack(self.op, self.i_image, self.n_images, self.user_id, self.run_id) + \
            self.image.encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> StoreStream:
        _check_size(data, cls.SIZE, "StoreStream")
        op, i_image, n_images, user_id, run_id = cls.STRUCT.unpack_from(data)
        if op not in StoreOp.__members__.values():
            raise FormatError(f"StoreStream op {op} is unknown (expected 0 write, 1 start, 2 stop)")
        image = ImageMetadata.decode(bytes(data[cls.STRUCT.size:]))
        return cls(StoreOp(op), i_image, n_images, user_id, run_id, image)


class WriterState(str, enum.Enum):
    WRITING = "writing"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True)
class WriterStatus:
    """std_h5_writer -> writer_agent status (JSON). Extra keys travel in `details`."""

    run_id: int
    state: WriterState
    output_file: str
    n_written: int = 0
    n_missing: int = 0
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        body = asdict(self)
        body["state"] = self.state.value
        details = body.pop("details")
        body.update(details)
        return json.dumps(body).encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> WriterStatus:
        try:
            body = json.loads(bytes(data).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"writer status is not UTF-8 JSON: {exc}") from None
        if not isinstance(body, dict):
            raise FormatError("writer status must be a JSON object")
        try:
            state = WriterState(body.pop("state"))
            run_id = int(body.pop("run_id"))
            output_file = str(body.pop("output_file"))
        except KeyError as exc:
            raise FormatError(f"writer status lacks the key {exc}") from None
        except ValueError as exc:
            raise FormatError(f"writer status has a bad value: {exc}") from None
        known = {k: body.pop(k) for k in ("n_written", "n_missing", "error") if k in body}
        return cls(run_id, state, output_file, details=body, **known)
