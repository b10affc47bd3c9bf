"""Every decoder of outside input, fuzzed: whatever bytes arrive, a decoder returns a value or raises
the project's FormatError / BadRequest, and never anything else (a daemon catches exactly those).

Packet decoders get whole batches of random datagrams for every detector and image-id source; message
decoders get random bytes, and bytes of the right size with random content; write requests get random
bytes and random JSON. The number of examples per test is in `EXAMPLES` (docs/reliability.md)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_buffer.config import parse_config
from core_buffer.errors import FormatError
from core_buffer.formats import ImageMetadata, ModuleFrame, StoreStream, Verdict, WriterStatus
from std_udp_recv.packets import MALFORMED_KINDS, PacketDecoder
from writer_agent.request import BadRequest, parse_request

EXAMPLES = 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DETECTORS = {
    "jungfrau": {"detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16, "image_pixel_height": 512,
                 "image_pixel_width": 1024},
    "jungfrau-pulse-id": {"detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
                          "image_pixel_height": 512, "image_pixel_width": 1024, "image_id_source": "pulse_id"},
    "jungfrau-2-interfaces": {"detector_type": "jungfrau", "n_modules": 2, "bit_depth": 16,
                              "image_pixel_height": 512, "image_pixel_width": 1024, "jungfrau_interfaces": 2},
    "eiger-8": {"detector_type": "eiger", "n_modules": 2, "bit_depth": 8, "image_pixel_height": 514,
                "image_pixel_width": 514},
    "eiger-16": {"detector_type": "eiger", "n_modules": 2, "bit_depth": 16, "image_pixel_height": 514,
                 "image_pixel_width": 514},
    "eiger-32": {"detector_type": "eiger", "n_modules": 2, "bit_depth": 32, "image_pixel_height": 514,
                 "image_pixel_width": 514},
    "gigafrost": {"detector_type": "gigafrost", "n_modules": 8, "bit_depth": 12, "image_pixel_height": 2016,
                  "image_pixel_width": 2016},
}


def decoder_for(kind: str) -> PacketDecoder:
    config = parse_config({"detector_name": f"fuzz-{kind}", "start_udp_port": 50000, **DETECTORS[kind]})
    return PacketDecoder(config, config.n_modules - 1)


def datagrams(decoder: PacketDecoder) -> st.SearchStrategy:
    """(header bytes, datagram length): the decoder reads only a datagram's header and length, so the
    payload stays zeros. Lengths are anything up to one past the largest datagram, or exactly a valid
    one, so random headers also get past the length check and exercise the header checks."""
    sizes = sorted({int(n) for n in decoder.expected_length})
    length = st.one_of(st.integers(0, decoder.max_datagram + 1), st.sampled_from(sizes))
    return st.tuples(st.binary(min_size=0, max_size=decoder.header_bytes), length)


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_packet_decoders_never_raise_and_account_for_every_datagram(kind):
    decoder = decoder_for(kind)

    @FUZZ
    @given(st.lists(datagrams(decoder), min_size=1, max_size=64))
    def check(batch):
        n = len(batch)
        buffer = np.zeros((n, decoder.max_datagram + 1), np.uint8)
        lengths = np.zeros(n, np.int64)
        for i, (header, length) in enumerate(batch):
            buffer[i, :len(header)] = np.frombuffer(header, np.uint8)
            lengths[i] = length
        decoded = decoder.decode(buffer, lengths, n)
        n_valid = int(decoded.valid.sum())
        assert n_valid + sum(decoded.malformed[k] for k in MALFORMED_KINDS) == n  # each one counted once
        valid = np.flatnonzero(decoded.valid)
        packets = decoded.packet[valid]
        assert ((packets >= 0) & (packets < decoder.n_packets)).all()
        assert (lengths[valid] == decoder.expected_length[packets]).all()

    check()


def _decode_or_format_error(decode, data: bytes):
    try:
        return decode(data)
    except FormatError:
        return None


@pytest.mark.parametrize("message", [ModuleFrame, ImageMetadata, StoreStream, Verdict])
def test_binary_message_decoders_return_or_raise_format_error(message):
    size = message.SIZE

    @FUZZ
    @given(st.one_of(st.binary(max_size=2 * size), st.binary(min_size=size, max_size=size)))
    def check(data):
        decoded = _decode_or_format_error(message.decode, data)
        if decoded is not None:
            assert len(data) == size
            assert message.decode(decoded.encode()) == decoded  # what decodes, re-encodes to the same value

    check()


@FUZZ
@given(st.one_of(st.binary(max_size=4 * Verdict.SIZE),
                 st.lists(st.binary(min_size=Verdict.SIZE, max_size=Verdict.SIZE), max_size=4).map(b"".join)))
def test_the_verdict_message_decoder_returns_or_raises_format_error(data):
    decoded = _decode_or_format_error(Verdict.decode_many, data)
    if decoded is not None:
        assert len(data) == len(decoded) * Verdict.SIZE
        assert Verdict.encode_many(decoded) == data


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=12)


@FUZZ
@given(st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["run_id", "state", "output_file", "n_written", "n_missing",
                                                  "error", "x"]), JSON, max_size=7).map(
                     lambda v: json.dumps(v).encode())))
def test_the_writer_status_decoder_returns_or_raises_format_error(data):
    _decode_or_format_error(WriterStatus.decode, data)


@FUZZ
@given(st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode()),
                 st.fixed_dictionaries({"output_file": JSON | st.text(), "n_images": JSON},
                                       optional={"run_id": JSON, "user_id": JSON, "extra": JSON}).map(
                     lambda v: json.dumps(v).encode())))
def test_write_requests_parse_or_raise_bad_request(tmp_path_factory, body):
    out = str(tmp_path_factory.getbasetemp())
    try:
        request = parse_request("r1", body, output_dirs=(out,), overwrite=False, max_images=1000)
    except BadRequest as exc:
        assert str(exc)  # a reason a person can read
        return
    assert 1 <= request.n_images <= 1000 and request.output_file.startswith(out)
