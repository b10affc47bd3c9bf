"""The simulator's pixel pattern: deterministic, id-stamped, and covering every Jungfrau gain value."""
import numpy as np

from core_buffer import detectors
from core_buffer.pattern import frame_bytes, frame_pattern


def test_the_pattern_is_a_function_of_id_module_and_pixel():
    stream = detectors.jungfrau_stream()
    a = frame_pattern(stream, 1, 1000)
    assert np.array_equal(a, frame_pattern(stream, 1, 1000))
    assert not np.array_equal(a, frame_pattern(stream, 2, 1000))
    other = frame_pattern(stream, 1, 1001)
    # Every row differs between two ids (the stamp), nothing else does.
    assert (a[:, :4] != other[:, :4]).any(axis=1).all()
    assert np.array_equal(a[:, 4:], other[:, 4:])
    assert a[7, :4].tolist() == [1000 & 0xFF, 1000 >> 8, 0, 0]
    # Rows differ from each other, so a packet at the wrong offset is caught.
    assert not np.array_equal(a[0, 4:], a[4, 4:])


def test_jungfrau_pattern_covers_every_gain_value():
    pixels = frame_pattern(detectors.jungfrau_stream(), 0, 5)
    assert set(np.unique(detectors.jungfrau_gain(pixels)).tolist()) == {0, 1, 2, 3}


def test_pattern_values_fit_the_bit_depth():
    assert frame_pattern(detectors.eiger_stream(8), 0, 3).max() <= 0xFF
    gf = detectors.gigafrost_stream(2016, 2016)
    assert frame_pattern(gf, 0, 3).max() <= 0xFFF
    assert frame_bytes(gf, 0, 3).nbytes == gf.frame_bytes


def test_12bit_packing_round_trips_and_matches_the_bit_layout():
    values = np.array([0xABC, 0x123, 0xFFF, 0x000], dtype=np.uint16)
    packed = detectors.pack_12bit(values)
    bits = int.from_bytes(packed.tobytes(), "little")
    assert [(bits >> (12 * i)) & 0xFFF for i in range(4)] == values.tolist()
    assert np.array_equal(detectors.unpack_12bit(packed), values)
