"""Detector definitions match the packet table of DESIGN.md §2 and DETECTORS.md."""
import math

import numpy as np
import pytest

from core_buffer import detectors


def test_sls_header_field_offsets():
    offsets = {name: detectors.SLS_HEADER_DTYPE.fields[name][1] for name in detectors.SLS_HEADER_DTYPE.names}
    assert offsets == {"framenum": 0, "exptime": 8, "packetnum": 12, "bunchid": 16, "timestamp": 24,
                       "moduleID": 32, "row": 34, "column": 36, "reserved": 38, "debug": 40,
                       "roundRobin": 44, "detectortype": 46, "headerVersion": 47}


def test_gigafrost_header_field_offsets():
    dt = detectors.GF_HEADER_DTYPE
    offsets = {name: dt.fields[name][1] for name in dt.names}
    assert offsets == {"protocol_id": 0, "quadrant_row_length_in_blocks": 1, "quadrant_rows": 2,
                       "status_flags": 3, "scan_id": 4, "frame_index": 8, "image_status_flags": 12,
                       "packet_starting_row": 14, "image_timing": 16, "sync_time": 24, "scan_time": 28}


def test_jungfrau_streams():
    one = detectors.jungfrau_stream(1)
    assert (one.packet_bytes, one.packets_per_frame, one.frame_bytes) == (8240, 128, 1024 * 512 * 2)
    two = detectors.jungfrau_stream(2)
    assert (two.packets_per_frame, two.frame_height, two.frame_bytes) == (64, 256, 1024 * 256 * 2)


def test_a_jungfrau_frame_is_512_rows_of_1024_pixels():
    stream = detectors.jungfrau_stream(1)
    assert (stream.frame_height, stream.frame_width) == (512, 1024)
    assert stream.pixel_dtype == np.dtype("<u2")
    assert stream.frame_bytes == 512 * 1024 * 2  # 1 MiB (DESIGN.md §2)
    half = detectors.jungfrau_stream(2)  # two-interface mode: each stream half the rows
    assert (half.frame_height, half.frame_width) == (256, 1024)


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_an_eiger_frame_is_256_rows_of_512_pixels_at_every_bit_depth(bits):
    stream = detectors.eiger_stream(bits)
    assert (stream.frame_height, stream.frame_width) == (256, 512)
    assert stream.frame_bytes == 256 * 512 * bits // 8


@pytest.mark.parametrize("bits,packets", [(8, 32), (16, 64), (32, 128)])
def test_eiger_streams(bits, packets):
    stream = detectors.eiger_stream(bits)
    assert stream.packet_bytes == 4144
    assert stream.packets_per_frame == packets
    assert stream.frame_bytes == packets * 4096
    assert stream.pixel_dtype.itemsize * 8 == bits


def test_gigafrost_2016_matches_the_documented_example():
    stream = detectors.gigafrost_stream(2016, 2016)
    assert (stream.frame_width, stream.frame_height) == (1008, 504)
    assert stream.rows_per_packet == 4
    assert stream.packet_data_bytes == 6048
    assert stream.packets_per_frame == 126
    assert stream.packet_payload_bytes(125) == 6048


@pytest.mark.parametrize("height,width", [(280, 528), (128, 480), (2016, 2016), (1000, 960)])
def test_gigafrost_packets_cover_the_frame_exactly(height, width):
    stream = detectors.gigafrost_stream(height, width)
    w = width // 2
    b = w // 12
    c = (7400 // (36 * b)) * b // 2
    rows = min(c * 48 // w, height // 4)
    assert stream.rows_per_packet == rows
    assert stream.packets_per_frame == math.ceil((height // 4) / rows)
    covered = sum(stream.packet_payload_bytes(i) for i in range(stream.packets_per_frame))
    assert covered == stream.frame_bytes == w * (height // 4) * 3 // 2
    assert stream.packet_data_bytes <= 7400


def test_jungfrau_gain_and_adc_split_the_pixel_word():
    pixels = np.array([0x0005, 0x4006, 0xC007, 0x8008], dtype=np.uint16)
    assert detectors.jungfrau_gain(pixels).tolist() == [0, 1, 3, 2]
    assert detectors.jungfrau_adc(pixels).tolist() == [5, 6, 7, 8]
