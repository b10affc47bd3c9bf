"""The decoder's three entry points (decode, all_in_place, check_one) must agree on every datagram, and
its header checks must reject what cannot belong to the stream."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_buffer.config import parse_config
from std_udp_recv.packets import BAD_HEADER, PacketDecoder
from std_udp_recv.sim import ModuleSender

DETECTORS = {
    "jungfrau": {"detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16, "image_pixel_height": 512,
                 "image_pixel_width": 1024},
    "jungfrau-pulse-id": {"detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16, "image_pixel_height": 512,
                          "image_pixel_width": 1024, "image_id_source": "pulse_id"},
    "jungfrau-2if": {"detector_type": "jungfrau", "n_modules": 2, "bit_depth": 16, "image_pixel_height": 512,
                     "image_pixel_width": 1024, "jungfrau_interfaces": 2},
    "eiger32": {"detector_type": "eiger", "n_modules": 2, "bit_depth": 32, "image_pixel_height": 514,
                "image_pixel_width": 514},
    # 504 rows in packets of 4: the geometry of the real 2016 x 2016 camera
    "gigafrost": {"detector_type": "gigafrost", "n_modules": 8, "bit_depth": 12, "image_pixel_height": 2016,
                  "image_pixel_width": 2016},
    # streams of 24 x 409 pixels: packets of 204, 204 and 1 rows (a short last packet)
    "gigafrost-short-last": {"detector_type": "gigafrost", "n_modules": 8, "bit_depth": 12,
                             "image_pixel_height": 1636, "image_pixel_width": 48},
}


def _setup(kind: str):
    config = parse_config({"detector_name": f"pk-{kind}", "start_udp_port": 50000, **DETECTORS[kind]})
    module = config.n_modules - 1
    return PacketDecoder(config, module), ModuleSender(config, module)


def _mutated(sender: ModuleSender, image_id: int, packets: list[int], edits) -> tuple[np.ndarray, np.ndarray]:
    """Header rows and lengths of real packets, with (row, byte offset, value) edits applied."""
    sender.build(image_id)
    rows = np.array([sender.packets[k, :sender.hdr] for k in packets], dtype=np.uint8)
    lengths = np.array([sender.lengths[k] for k in packets], dtype=np.int64)
    for row, offset, value in edits:
        if offset < 0:
            lengths[row % len(packets)] += value % 9 - 4  # a length a few bytes off
        else:
            rows[row % len(packets), offset % sender.hdr] = value
    return rows, lengths


EDITS = st.lists(st.tuples(st.integers(0, 200), st.integers(-1, 60), st.integers(0, 255)), max_size=3)


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_all_in_place_and_check_one_agree_with_decode(kind):
    decoder, sender = _setup(kind)
    n_packets = decoder.n_packets

    @settings(max_examples=150, deadline=None)
    @given(st.integers(0, n_packets - 1), st.integers(1, 16), EDITS, st.integers(1, 2**20))
    def check(first, n, edits, image_id):
        packets = list(range(first, min(first + n, n_packets)))  # the receiver aims inside the frame
        rows, lengths = _mutated(sender, image_id, packets, edits)
        n = len(packets)
        headers = np.zeros((16, decoder.header_bytes), np.uint8)
        headers[:n] = rows
        decoder.bind(headers)
        d = decoder.decode(headers, lengths, n)
        expected = bool((d.valid & (d.image_id == image_id) & (d.packet == np.arange(first, first + n))
                         & (lengths == decoder.full_length)).all())
        fast = decoder.all_in_place(lengths, n, image_id, first)
        assert fast <= expected  # never claims a datagram is in place when it is not
        pulse = d.headers["bunchid"] if decoder.use_pulse_id else np.zeros(n)
        with np.errstate(invalid="ignore"):
            integral = bool((np.floor(pulse) == pulse).all())
        if integral:  # a fractional pulse id (never sent) may take the slow path: same result, slower
            assert fast == expected
        for i in range(n):
            one = decoder.check_one(bytes(rows[i]), int(lengths[i]))
            if d.valid[i]:
                assert one == (int(d.image_id[i]), int(d.packet[i]))
            else:
                assert one is None

    check()


@pytest.mark.parametrize("kind,offset,value", [
    ("jungfrau", 46, 1),  # detectortype of an Eiger
    ("jungfrau", 47, 1),  # header version 1
    ("eiger32", 46, 3),  # detectortype of a Jungfrau
    ("jungfrau-2if", 34, 0),  # row 0: the other half-module (this is module 1)
])
def test_sls_header_fields_of_another_stream_are_bad_headers(kind, offset, value):
    decoder, sender = _setup(kind)
    rows, lengths = _mutated(sender, 5, [0, 1], [(1, offset, value)])
    d = decoder.decode(rows, lengths, 2)
    assert list(d.valid) == [True, False] and d.malformed[BAD_HEADER] == 1


def test_sls_type_and_version_checks_can_be_turned_off():
    config = parse_config({"detector_name": "pk-lax", "start_udp_port": 50000, **DETECTORS["jungfrau"]})
    decoder = PacketDecoder(config, 0, strict_sls_header=False)
    rows, lengths = _mutated(ModuleSender(config, 0), 5, [0, 1], [(1, 46, 0), (1, 47, 0)])
    assert decoder.decode(rows, lengths, 2).valid.all()
