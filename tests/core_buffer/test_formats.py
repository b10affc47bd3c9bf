"""Formats round-trip, and their bytes match layouts computed here independently of formats.py."""
import json
import struct

import numpy as np
import pytest

from core_buffer.errors import FormatError
from core_buffer.formats import (
    Dtype,
    ImageMetadata,
    ImageStatus,
    ModuleFrame,
    StoreOp,
    StoreStream,
    Verdict,
    WriterState,
    WriterStatus,
)


def _le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def test_module_frame_bytes_follow_the_design_layout():
    frame = ModuleFrame(id=2**40 + 7, pulse_id=11, frame_index=12, daq_rec=13, n_recv_packets=127,
                        n_packets=128, module_id=3, bit_depth=16, pos_y=512, pos_x=1024)
    expected = (_le(2**40 + 7, 8) + _le(11, 8) + _le(12, 8) + _le(13, 8) + _le(127, 4) + _le(128, 4)
                + _le(3, 4) + _le(16, 2) + _le(512, 2) + _le(1024, 2) + bytes(14))
    assert len(expected) == 64
    assert frame.encode() == expected
    assert ModuleFrame.decode(expected) == frame
    assert not frame.is_complete


def test_module_frame_dtype_reads_the_encoded_bytes():
    frame = ModuleFrame(id=5, pulse_id=6, n_recv_packets=128, n_packets=128, module_id=1, pos_x=9)
    record = np.frombuffer(frame.encode(), dtype=ModuleFrame.DTYPE)[0]
    assert ModuleFrame.from_record(record) == frame


def test_image_metadata_bytes_follow_the_design_layout():
    meta = ImageMetadata(id=99, height=512, width=1024, dtype=Dtype.FLOAT32, encoding=0, source_id=4,
                         status=ImageStatus.MISSING_MODULE, user_1=17, user_2=18)
    expected = (_le(1, 8) + _le(99, 8) + _le(512, 8) + _le(1024, 8) + _le(14, 2) + _le(0, 2) + _le(4, 2)
                + _le(3, 2) + _le(17, 8) + _le(18, 8))
    assert len(expected) == 56
    assert meta.encode() == expected
    assert ImageMetadata.decode(expected) == meta
    assert meta.numpy_dtype == np.float32
    assert meta.nbytes == 512 * 1024 * 4
    assert ImageMetadata.from_record(np.frombuffer(expected, ImageMetadata.DTYPE)[0]) == meta


def test_store_stream_bytes_are_the_header_then_the_image_metadata():
    image = ImageMetadata(id=7, height=2, width=3, user_1=1)
    message = StoreStream(op=StoreOp.WRITE, i_image=4, n_images=10, user_id=1000, run_id=2**33, image=image)
    expected = _le(0, 4) + _le(4, 4) + _le(10, 4) + _le(1000, 4) + _le(2**33, 8) + image.encode()
    assert len(expected) == 80
    assert message.encode() == expected
    assert StoreStream.decode(expected) == message


@pytest.mark.parametrize("intact,last_byte", [(True, 1), (False, 0)])
def test_verdict_bytes_are_the_image_id_then_intact_or_torn(intact, last_byte):
    verdict = Verdict(image_id=2**40 + 3, intact=intact)
    expected = _le(2**40 + 3, 8) + _le(last_byte, 1)
    assert len(expected) == Verdict.SIZE == 9
    assert verdict.encode() == expected
    assert Verdict.decode(expected) == verdict


def test_a_verdict_message_is_the_verdicts_back_to_back_in_order_and_may_be_empty():
    verdicts = [Verdict(7, True), Verdict(2**40 + 3, False), Verdict(9, True)]
    message = Verdict.encode_many(verdicts)
    assert message == b"".join(v.encode() for v in verdicts)
    assert Verdict.decode_many(message) == verdicts
    assert Verdict.encode_many([]) == b"" and Verdict.decode_many(b"") == []


def test_a_verdict_message_with_a_bad_size_or_an_unknown_verdict_is_refused_whole():
    good = Verdict(5, True).encode()
    with pytest.raises(FormatError, match="multiple of 9 bytes, got 10"):
        Verdict.decode_many(good + b"\x01")
    with pytest.raises(FormatError, match="Verdict 7 of image 6 is unknown"):
        Verdict.decode_many(good + _le(6, 8) + b"\x07")


def test_unknown_verdict_is_refused():
    with pytest.raises(FormatError, match="Verdict 7 of image 5 is unknown"):
        Verdict.decode(_le(5, 8) + b"\x07")


@pytest.mark.parametrize("cls,size", [(ModuleFrame, 64), (ImageMetadata, 56), (StoreStream, 80), (Verdict, 9)])
@pytest.mark.parametrize("delta", [-1, 1])
def test_decoding_the_wrong_size_names_the_message_and_both_sizes(cls, size, delta):
    with pytest.raises(FormatError, match=rf"{cls.__name__} must be {size} bytes, got {size + delta}"):
        cls.decode(bytes(size + delta))


def test_unknown_image_metadata_version_is_refused():
    data = bytearray(ImageMetadata(id=1, height=1, width=1).encode())
    data[0] = 2
    with pytest.raises(FormatError, match="version 2 is not supported"):
        ImageMetadata.decode(bytes(data))


def test_unknown_dtype_code_is_refused():
    data = bytearray(ImageMetadata(id=1, height=1, width=1).encode())
    struct.pack_into("<H", data, 32, 3)
    with pytest.raises(FormatError, match="dtype code 3 is unknown"):
        ImageMetadata.decode(bytes(data))


def test_unknown_store_op_is_refused():
    data = bytearray(StoreStream(op=StoreOp.STOP).encode())
    struct.pack_into("<I", data, 0, 9)
    with pytest.raises(FormatError, match="op 9 is unknown"):
        StoreStream.decode(bytes(data))


def test_writer_status_round_trips_with_extra_keys():
    status = WriterStatus(run_id=3, state=WriterState.FAILED, output_file="/data/a.h5", n_written=4,
                          n_missing=1, error="disk full", details={"request_id": "abc"})
    body = json.loads(status.encode())
    assert body == {"run_id": 3, "state": "failed", "output_file": "/data/a.h5", "n_written": 4,
                    "n_missing": 1, "error": "disk full", "request_id": "abc"}
    assert WriterStatus.decode(status.encode()) == status


@pytest.mark.parametrize("payload,message", [
    (b"\xff", "not UTF-8 JSON"),
    (b"[1]", "must be a JSON object"),
    (b'{"state": "writing", "run_id": 1}', "lacks the key 'output_file'"),
    (b'{"state": "sleeping", "run_id": 1, "output_file": "x"}', "bad value"),
])
def test_bad_writer_status_is_refused_with_the_reason(payload, message):
    with pytest.raises(FormatError, match=message):
        WriterStatus.decode(payload)


def test_numpy_dtype_codes_round_trip():
    for code in Dtype:
        assert Dtype.from_numpy(code.numpy) is code
    with pytest.raises(FormatError):
        Dtype.from_numpy(np.complex64)
