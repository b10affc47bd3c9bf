"""std_assembler with a real FrameBuffer, ImageBuffer and ZMQ: the test plays the receivers (it writes frames
into the FrameBuffer and PUSHes their ModuleFrames) and a consumer of the metadata stream."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

import core_buffer
from core_buffer.errors import ConfigError, ImageLostError
from core_buffer.formats import ImageMetadata, ModuleFrame
from core_buffer.ipc import image_metadata_address, make_socket, module_frames_address
from core_buffer.pattern import frame_bytes, frame_pattern
from core_buffer.ringbuffer import FrameBuffer, ImageBuffer
from std_assembler import kernels
from std_assembler.assembler import Assembler
from tests.e2e.expected import raw_image

EIGER_POSITIONS = {"0": [0, 0, 513, 255], "1": [0, 513, 513, 258]}


class Rig:
    def __init__(self, config):
        self.config = config
        ctx = zmq.Context.instance()
        self.pushes = []
        for m in range(config.n_modules):
            push = make_socket(ctx, zmq.PUSH, hwm=1000)
            push.bind(module_frames_address(config, m))
            self.pushes.append(push)
        self.frames = FrameBuffer.for_config(config)
        self.generation = 0  # as a receiver counts its writes (ModuleFrame.generation)
        self.assembler = Assembler(config)
        self.sub = make_socket(ctx, zmq.SUB, hwm=1000)
        self.sub.connect(image_metadata_address(config))
        time.sleep(0.2)

    def send(self, image_id, module, *, data=None, n_recv=None, pulse_id=0, frame_index=None, push=True):
        """Write a frame into the FrameBuffer as a receiver does, and (if `push`) send its ModuleFrame."""
        stream = self.config.stream
        slot = self.frames.begin_frame(image_id, module)
        slot[:] = frame_bytes(stream, module, image_id) if data is None else data
        self.generation += 1
        frame = ModuleFrame(id=image_id, pulse_id=pulse_id, frame_index=image_id if frame_index is None else frame_index,
                            n_recv_packets=stream.packets_per_frame if n_recv is None else n_recv,
                            n_packets=stream.packets_per_frame, module_id=module, bit_depth=stream.bit_depth,
                            generation=self.generation)
        self.frames.commit_frame(frame)
        if push:
            self.pushes[module].send(frame.encode())

    def send_image(self, image_id, modules=None):
        for m in (range(self.config.n_modules) if modules is None else modules):
            self.send(image_id, m)

    def run(self, n_images, timeout_s=5.0):
        out = []
        deadline = time.monotonic() + timeout_s
        while len(out) < n_images and time.monotonic() < deadline:
            self.assembler.poll(0.02)
            while self.sub.poll(0):
                out.append(ImageMetadata.decode(self.sub.recv()))
        return out

    def image(self, meta):
        return self.assembler.images.image_view(meta.id, self.config.image_dtype, self.config.image_shape)

    def close(self):
        self.assembler.stop()
        self.assembler.close()
        self.sub.close()
        for p in self.pushes:
            p.close()
        self.frames.close()


@pytest.fixture
def rig(make_config):
    made = []

    def factory(**overrides):
        _, config = make_config(**overrides)
        made.append(Rig(config))
        return made[-1]

    yield factory
    for r in made:
        r.close()


def gigafrost_expected(config, image_id):
    """Per pixel, from the documented stream numbering (docs/detectors.md), without the assembler's code."""
    h, w = config.image_shape
    image = np.zeros((h, w), np.uint16)
    for m in range(8):
        quadrant, link = divmod(m, 2)
        frame = frame_pattern(config.stream, m, image_id)
        for r in range(frame.shape[0]):
            s = 2 * r + link
            y = h // 2 + s if quadrant >= 2 else h // 2 - 1 - s
            x0 = 0 if quadrant in (0, 2) else w // 2
            image[y, x0:x0 + w // 2] = frame[r]
    return image


GEOMETRIES = {
    "jungfrau-stacked": dict(n_modules=2, image_pixel_height=1024),
    "jungfrau-placed": dict(n_modules=2, image_pixel_height=1100, image_pixel_width=1030,
                            module_positions={"0": [0, 0, 1023, 511], "1": [1029, 1099, 6, 588]}),
    "jungfrau-2if": dict(n_modules=2, jungfrau_interfaces=2, image_pixel_height=512),
    "eiger8": dict(detector_type="eiger", n_modules=2, bit_depth=8, image_pixel_height=514, image_pixel_width=514,
                   module_positions=EIGER_POSITIONS),
    "eiger16": dict(detector_type="eiger", n_modules=2, bit_depth=16, image_pixel_height=514, image_pixel_width=514,
                    module_positions=EIGER_POSITIONS),
    "eiger32": dict(detector_type="eiger", n_modules=2, bit_depth=32, image_pixel_height=514, image_pixel_width=514,
                    module_positions=EIGER_POSITIONS),
    "gigafrost": dict(detector_type="gigafrost", n_modules=8, bit_depth=12, image_pixel_height=96,
                      image_pixel_width=192),
    "gigafrost-2workers": dict(detector_type="gigafrost", n_modules=8, bit_depth=12, image_pixel_height=96,
                               image_pixel_width=192, assembler={"conversion_threads": 2}),
    "gigafrost-528x280": dict(detector_type="gigafrost", n_modules=8, bit_depth=12, image_pixel_height=280,
                              image_pixel_width=528),  # rows of 264 pixels: not a multiple of 16
}


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_every_detector_assembles_exactly_the_expected_image(rig, geometry):
    r = rig(**GEOMETRIES[geometry])
    for image_id in (5, 6):
        r.send_image(image_id)
    metas = r.run(2)
    assert [m.id for m in metas] == [5, 6]
    assert [m.user_1 for m in metas] == [0, 1]
    for meta in metas:
        assert meta.status == 0 and meta.user_2 == meta.id
        expected = gigafrost_expected(r.config, meta.id) if geometry.startswith("gigafrost") else \
            raw_image(r.config, meta.id)
        image = r.image(meta)
        assert image.dtype == expected.dtype
        assert np.array_equal(image, expected), f"{np.count_nonzero(image != expected)} pixels differ"


def eiger_500k_expected(config, image_id):
    """An Eiger 500k (one module, 4 half-module streams) pixel by pixel from the detector's layout, not from
    module_positions: stream 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right; chips of 256 x 256
    with 2 gap pixels between neighbours (also between the streams); the bottom half is read out upside
    down, so frame row 0 of streams 2 and 3 is the image's last row."""
    image = np.zeros((514, 1030), config.image_dtype)
    for s in range(4):
        frame = frame_pattern(config.stream, s, image_id)
        bottom, right = divmod(s, 2)
        for row in range(256):
            y = 513 - row if bottom else row
            for chip in range(2):
                x = right * 516 + chip * 258
                image[y, x:x + 256] = frame[row, chip * 256:(chip + 1) * 256]
    return image


@pytest.mark.parametrize("bit_depth", [8, 16, 32])
@pytest.mark.parametrize("positions", ["example-config", "default"])
def test_eiger_500k_has_its_gaps_and_flipped_bottom_half(rig, bit_depth, positions):
    example = json.loads((Path(core_buffer.__file__).parent / "configs" / "eiger_500k.json").read_text())
    extra = {"module_positions": example["module_positions"]} if positions == "example-config" else {}
    r = rig(detector_type="eiger", n_modules=4, bit_depth=bit_depth, image_pixel_height=514,
            image_pixel_width=1030, **extra)
    r.send_image(77)
    (meta,) = r.run(1)
    expected = eiger_500k_expected(r.config, 77)
    image = r.image(meta)
    assert meta.status == 0
    assert np.array_equal(image, expected), f"{np.count_nonzero(image != expected)} pixels differ"
    assert not image[256:258].any() and not image[:, 256:258].any() and not image[:, 514:516].any()


def test_eiger_without_positions_beyond_one_module_is_refused(make_config):
    _, config = make_config(detector_type="eiger", n_modules=8, bit_depth=16, image_pixel_height=514,
                            image_pixel_width=2068)
    with pytest.raises(ConfigError, match="module_positions"):
        Assembler(config)


def test_a_jungfrau_stack_taller_than_the_image_is_refused_at_start(make_config):
    _, config = make_config(n_modules=2, image_pixel_height=512)
    with pytest.raises(ConfigError, match="image_pixel_height"):
        Assembler(config)


def write_calibration(path, n_modules, rows=512, mask_pixel=(3, 7)):
    rng = np.random.default_rng(4)
    pedestal = rng.uniform(800, 3000, (3, n_modules * rows, 1024)).astype(np.float32)
    gain = rng.uniform(5, 60, (3, n_modules * rows, 1024)).astype(np.float32)
    mask = np.zeros((n_modules * rows, 1024), np.uint8)
    mask[mask_pixel] = 1
    with h5py.File(path, "w") as f:
        f["pedestal"], f["gain"], f["pixel_mask"] = pedestal, gain, mask
    return pedestal, gain, mask


def reference_conversion(raw, pedestal, gain, mask):
    out = np.full(raw.shape, np.nan, np.float64)
    g = raw >> 14
    adc = (raw & 0x3FFF).astype(np.float64)
    for bits, slot in ((0, 0), (1, 1), (3, 2)):
        sel = (g == bits) & (mask == 0)
        out[sel] = (adc[sel] - pedestal[slot][sel]) / gain[slot][sel]
    return out


@pytest.mark.parametrize("threads", [1, 2])
def test_jungfrau_conversion_matches_the_reference_with_nan_for_invalid_gain_and_mask(rig, tmp_path, threads):
    pedestal, gain, mask = write_calibration(tmp_path / "cal.h5", 2)
    r = rig(n_modules=2, image_pixel_height=1024, conversion="converted", calibration_file=str(tmp_path / "cal.h5"),
            assembler={"conversion_threads": threads})
    r.send_image(9)
    (meta,) = r.run(1)
    assert meta.dtype == 14  # float32
    raw = np.vstack([frame_pattern(r.config.stream, m, 9) for m in range(2)])
    expected = reference_conversion(raw, pedestal, gain, mask)
    image = r.image(meta)
    assert np.array_equal(np.isnan(image), np.isnan(expected))
    assert np.allclose(image[~np.isnan(image)], expected[~np.isnan(expected)], rtol=1e-5, atol=1e-3)
    invalid = int(np.count_nonzero((raw >> 14) == 2)) + 1  # the masked pixel has a valid gain in the pattern
    assert r.assembler.counters.nan_pixels == invalid == int(np.isnan(expected).sum())


def sparse_gain_frame(shape, seed, p_other=0.02):
    """Mostly G0 (real data), a few scattered G1/G2/invalid pixels, and one dense block (a bright spot)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 0x4000, shape, dtype=np.uint16)
    gain = rng.choice(np.array([1, 3, 2], np.uint16), shape) * (rng.random(shape) < p_other)
    gain[100:110, 500:600] = rng.choice(np.array([1, 3], np.uint16), (10, 100))
    return raw | (gain.astype(np.uint16) << 14)


@pytest.mark.parametrize("threads", [1, 2])
def test_jungfrau_conversion_of_mostly_g0_data_matches_the_reference(rig, tmp_path, threads):
    pedestal, gain, mask = write_calibration(tmp_path / "cal.h5", 2)
    r = rig(n_modules=2, image_pixel_height=1024, conversion="converted", calibration_file=str(tmp_path / "cal.h5"),
            assembler={"conversion_threads": threads})
    frames = [sparse_gain_frame((512, 1024), seed) for seed in (1, 2)]
    for m in range(2):
        r.send(4, m, data=frames[m].reshape(-1).view(np.uint8))
    (meta,) = r.run(1)
    expected = reference_conversion(np.vstack(frames), pedestal, gain, mask)
    image = r.image(meta)
    assert np.array_equal(np.isnan(image), np.isnan(expected))
    assert np.allclose(image[~np.isnan(image)], expected[~np.isnan(expected)], rtol=1e-5, atol=1e-3)
    assert r.assembler.counters.nan_pixels == int(np.isnan(expected).sum())


def test_jungfrau_conversion_into_a_flipped_and_mirrored_place(rig, tmp_path):
    pedestal, gain, mask = write_calibration(tmp_path / "cal.h5", 2)
    r = rig(**GEOMETRIES["jungfrau-placed"], conversion="converted", calibration_file=str(tmp_path / "cal.h5"))
    r.send_image(6)
    (meta,) = r.run(1)
    raw = np.vstack([frame_pattern(r.config.stream, m, 6) for m in range(2)])
    stack = reference_conversion(raw, pedestal, gain, mask)
    image = r.image(meta)
    placed = np.stack([image[:512, :1024], image[1099:587:-1, 1029:5:-1]]).reshape(1024, 1024)
    assert np.array_equal(np.isnan(placed), np.isnan(stack))
    assert np.allclose(placed[~np.isnan(placed)], stack[~np.isnan(stack)], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("data", ["pattern", "sparse"])
def test_numpy_fallback_converts_bit_for_bit_like_the_compiled_path(make_config, tmp_path, data):
    from std_assembler.convert import JungfrauConverter

    write_calibration(tmp_path / "cal.h5", 1)
    _, config = make_config(conversion="converted", calibration_file=str(tmp_path / "cal.h5"))
    raw = frame_pattern(config.stream, 0, 3) if data == "pattern" else sparse_gain_frame((512, 1024), 5)
    a, b = np.empty((512, 1024), np.float32), np.empty((512, 1024), np.float32)
    assert JungfrauConverter(config, use_numba=False).convert(0, raw, a) == \
        JungfrauConverter(config).convert(0, raw, b)
    assert np.array_equal(a, b, equal_nan=True)


def test_background_and_flatfield_are_applied_after_geometry(rig, tmp_path):
    rng = np.random.default_rng(2)
    background = rng.uniform(0, 50, (1024, 1024)).astype(np.float32)
    flat = rng.uniform(0.5, 1.5, (1024, 1024)).astype(np.float32)
    with h5py.File(tmp_path / "bg.h5", "w") as f:
        f["background"] = background
    with h5py.File(tmp_path / "ff.h5", "w") as f:
        f["flatfield"] = flat
    r = rig(n_modules=2, image_pixel_height=1024, background_file=str(tmp_path / "bg.h5"),
            flatfield_file=str(tmp_path / "ff.h5"))
    r.send_image(2)
    (meta,) = r.run(1)
    expected = (raw_image(r.config, 2).astype(np.float32) - background) / flat
    assert np.allclose(r.image(meta), expected, rtol=1e-5)


def test_corrections_leave_a_missing_module_and_the_gaps_at_zero(rig, tmp_path):
    shape = (1100, 1030)
    background = np.full(shape, 7.0, np.float32)
    flat = np.full(shape, 0.5, np.float32)
    with h5py.File(tmp_path / "bg.h5", "w") as f:
        f["background"] = background
    with h5py.File(tmp_path / "ff.h5", "w") as f:
        f["flatfield"] = flat
    r = rig(**GEOMETRIES["jungfrau-placed"], background_file=str(tmp_path / "bg.h5"),
            flatfield_file=str(tmp_path / "ff.h5"), assembler={"sync_timeout_s": 0.1})
    r.send(1, 0)  # module 1 never comes
    (meta,) = r.run(1)
    assert meta.status == 3
    image = r.image(meta)
    module_0 = (raw_image(r.config, 1)[:512, :1024].astype(np.float32) - 7) / 0.5
    assert np.array_equal(image[:512, :1024], module_0)
    image[:512, :1024] = 0
    assert not image.any(), "the missing module's area or a gap is not zero"


def test_an_attached_image_buffer_with_stale_pixels_in_the_gaps_has_them_zeroed_at_start(make_config):
    """An ImageBuffer left by a run with other module positions of the same byte size: the slots that hold
    pixels where this geometry has gaps are zeroed there and marked invalid; a slot whose gaps are zero
    already (a restart with the same geometry) keeps its image."""
    _, config = make_config(**GEOMETRIES["jungfrau-placed"])
    old = ImageBuffer.for_config(config)
    for slot in range(config.image_buffer_slots):
        old.begin_image(slot)[:] = 0xFF  # an earlier run's images, covering every pixel
    old.commit_image(ImageMetadata(3, 1100, 1030, 2))
    old.begin_image(4)[:] = 0
    old.slot_data(4)[:1024 * 2] = 7  # an image of this geometry: module 0's first row, gaps zero
    old.commit_image(ImageMetadata(4, 1100, 1030, 2))
    old.close()
    r = Rig(config)
    try:
        gaps = ~r.assembler.placer.coverage()
        assert gaps.any()
        for slot in range(config.image_buffer_slots):
            assert not r.image(ImageMetadata(slot, 1100, 1030, 2))[gaps].any(), f"slot {slot}"
        with pytest.raises(ImageLostError):
            r.assembler.images.read_meta(3)
        assert r.assembler.images.read_meta(4).id == 4
        assert (r.image(ImageMetadata(4, 1100, 1030, 2))[0, :1024] == 0x0707).all()
    finally:
        r.close()


def test_a_gigafrost_image_without_one_stream_has_only_those_rows_zero(rig):
    r = rig(**GEOMETRIES["gigafrost"], assembler={"sync_timeout_s": 0.1})
    r.send_image(8, modules=[m for m in range(8) if m != 5])  # quadrant 2 (SW), link 1: its odd rows
    (meta,) = r.run(1)
    assert meta.status == 3
    expected = gigafrost_expected(r.config, 8)
    expected[48 + 1::2, :96] = 0
    assert np.array_equal(r.image(meta), expected)


def test_a_corrected_gigafrost_image_is_unpacked_straight_to_float(rig, tmp_path):
    background = np.random.default_rng(3).uniform(0, 100, (96, 192)).astype(np.float32)
    with h5py.File(tmp_path / "bg.h5", "w") as f:
        f["background"] = background
    r = rig(**GEOMETRIES["gigafrost"], background_file=str(tmp_path / "bg.h5"))
    r.send_image(12)
    (meta,) = r.run(1)
    assert meta.dtype == 14
    assert np.array_equal(r.image(meta), gigafrost_expected(r.config, 12).astype(np.float32) - background)


def test_missing_module_lost_packets_and_mismatch_give_their_status(rig):
    r = rig(n_modules=2, image_pixel_height=1024, frame_buffer_slots=16, assembler={"sync_timeout_s": 0.1})
    r.send_image(1)
    r.send(2, 0)  # module 1 never sends 2, but moves past it
    r.send(3, 0, n_recv=100)
    r.send(3, 1)
    r.send(4, 0, pulse_id=1000)
    r.send(4, 1, pulse_id=1001)
    r.send(5, 0, frame_index=70)  # same id, but the modules disagree on the detector's frame index
    r.send(5, 1, frame_index=71)
    r.send(6, 0)  # module 1 silent: only the timeout releases it
    metas = {m.id: m for m in r.run(6)}
    assert {i: m.status for i, m in metas.items()} == {1: 0, 2: 3, 3: 1, 4: 2, 5: 2, 6: 3}
    r.send_image(7)  # the pipeline goes on: the next image is good
    (meta7,) = r.run(1)
    assert (meta7.id, meta7.status, meta7.user_1) == (7, 0, 6)
    assert np.array_equal(r.image(meta7), raw_image(r.config, 7))
    image2 = r.image(metas[2])
    assert not image2[512:].any() and np.array_equal(image2[:512], raw_image(r.config, 2)[:512])
    c = r.assembler.counters
    assert (c.images_good, c.images_missing_module, c.images_missing_packets, c.images_mismatch) == (2, 2, 1, 2)


@pytest.mark.parametrize("max_pending", [None, 32])
def test_a_backlog_of_complete_images_queued_before_the_first_poll_comes_out_complete(rig, max_pending):
    """More images queued than may wait at once (the default limit was half the FrameBuffer): read one
    module at a time, they would all wait for the other module and the oldest would leave incomplete."""
    section = {"sync_timeout_s": 5.0} | ({} if max_pending is None else {"max_pending": max_pending})
    r = rig(**GEOMETRIES["eiger8"], frame_buffer_slots=256, image_buffer_slots=256, assembler=section)
    n = 200
    for image_id in range(1, n + 1):
        r.send_image(image_id)
    metas = r.run(n)
    assert [m.id for m in metas] == list(range(1, n + 1))
    assert [m.status for m in metas] == [0] * n
    assert [m.user_1 for m in metas] == list(range(n))
    for meta in (metas[0], metas[-1]):
        assert np.array_equal(r.image(meta), raw_image(r.config, meta.id))
    c = r.assembler.counters
    assert (c.images_good, c.images_missing_module, c.frames_overwritten) == (n, 0, 0)


def test_drop_incomplete_counts_and_does_not_publish(rig):
    r = rig(n_modules=2, image_pixel_height=1024, assembler={"sync_timeout_s": 0.05, "drop_incomplete": True})
    r.send(1, 0)
    r.send_image(2)
    metas = r.run(2, timeout_s=1.0)
    assert [m.id for m in metas] == [2]
    assert r.assembler.counters.images_dropped == 1


@pytest.mark.parametrize("drop_incomplete", [False, True])
def test_an_image_whose_frame_was_overwritten_before_it_was_read_is_incomplete(rig, drop_incomplete):
    """Both modules delivered image 1, but module 1's receiver overwrote the FrameBuffer slot (with the id
    one FrameBuffer depth later) before the assembler read it: status 3, or dropped like any incomplete
    image with drop_incomplete, without a sequence number and with its ImageBuffer slot invalid."""
    slots = 8
    r = rig(n_modules=2, image_pixel_height=1024, frame_buffer_slots=slots,
            assembler={"sync_timeout_s": 5.0, "drop_incomplete": drop_incomplete})
    r.send_image(1)
    r.frames.begin_frame(1 + slots, 1)  # the receiver of module 1 ran on (its ModuleFrame not sent yet)
    r.frames.commit_frame(ModuleFrame(id=1 + slots, module_id=1))
    r.send_image(2)
    metas = r.run(2, timeout_s=1.0)
    c = r.assembler.counters
    assert c.frames_overwritten == 1
    if drop_incomplete:
        assert [(m.id, m.status, m.user_1) for m in metas] == [(2, 0, 0)]
        assert (c.images_dropped, c.images_missing_module, c.images) == (1, 0, 1)
        with pytest.raises(ImageLostError):
            r.assembler.images.read_meta(1)
    else:
        assert [(m.id, m.status, m.user_1) for m in metas] == [(1, 3, 0), (2, 0, 1)]
        image = r.image(metas[0])
        assert not image[512:].any() and np.array_equal(image[:512], raw_image(r.config, 1)[:512])
        assert (c.images_dropped, c.images_missing_module) == (0, 1)


@pytest.mark.parametrize("geometry", ["gigafrost", "eiger16"])
def test_a_frame_of_the_same_id_from_a_later_acquisition_is_never_taken_for_the_announced_one(rig, geometry):
    """Image 5 of acquisition A is announced by every module; before the assembler reads it, module 1's
    receiver has begun acquisition B (ids from 1 again) and written B's own frame 5 into the slot. The id
    matches, the generation does not: module 1 counts as overwritten (status 3, its area zero), and not one
    pixel of B's frame reaches image 5 of A. Gigafrost takes the whole-slot path, Eiger the per-module one."""
    r = rig(frame_buffer_slots=8, assembler={"sync_timeout_s": 5.0}, **GEOMETRIES[geometry])
    assert r.assembler._whole_slots == (geometry == "gigafrost")
    r.send_image(5)
    r.send(5, 1, data=np.full(r.config.stream.frame_bytes, 0xAB, np.uint8), push=False)  # B's frame 5
    metas = r.run(1, timeout_s=2.0)
    c = r.assembler.counters
    assert [(m.id, m.status) for m in metas] == [(5, 3)]
    assert c.frames_overwritten == 1 and c.images_missing_module == 1
    expected = gigafrost_expected(r.config, 5) if geometry == "gigafrost" else raw_image(r.config, 5)
    r.assembler.placer.zero(expected, 1)
    assert np.array_equal(r.image(metas[0]), expected)  # the others as A sent them, module 1's area zero


def test_startup_offset_and_detector_restart_do_not_stop_the_pipeline(rig):
    r = rig(n_modules=2, image_pixel_height=1024, assembler={"sync_timeout_s": 5.0})
    for i in (1001, 1002, 1003):
        r.send(i, 0)
    assert r.run(1, timeout_s=0.3) == []  # module 1 has not started yet: nothing is ready
    r.send(1003, 1)  # module 1 started late: 1001 and 1002 are released without it at once, in id order
    metas = r.run(3)
    for i in (1, 2):  # the detector restarted: ids start again, far below (more than the FrameBuffer holds)
        r.send_image(i)
        metas += r.run(1)
    assert [(m.id, m.status) for m in metas] == [(1001, 3), (1002, 3), (1003, 0), (1, 0), (2, 0)]
    assert [m.user_1 for m in metas] == [0, 1, 2, 3, 4]
    c = r.assembler.counters
    assert (c.detector_restarts, c.module_restarts, c.late_frames) == (1, 2, 0)
    assert np.array_equal(r.image(metas[-1]), raw_image(r.config, 2))


def test_a_duplicated_frame_is_counted_late_and_its_image_is_not_published_again(rig):
    r = rig(n_modules=2, image_pixel_height=1024, assembler={"sync_timeout_s": 0.2})
    for i in (1, 2, 3):
        r.send_image(i)
    metas = r.run(3)
    r.send(2, 1)  # a duplicate (or reordered) frame of module 1, below its last id
    r.send_image(4)
    metas += r.run(2, timeout_s=0.6)
    assert [(m.id, m.status) for m in metas] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    assert np.array_equal(r.image(metas[1]), raw_image(r.config, 2))  # slot of 2 untouched
    assert r.assembler.counters.late_frames == 1 and r.assembler.counters.module_restarts == 0


def test_a_restarted_receiver_reconnects_and_only_the_ids_it_missed_lack_its_module(rig):
    """The receiver of module 1 goes away (its PUSH socket closes) while the detector goes on; a new one
    binds a new PUSH, which the assembler's PULL reconnects to, and delivers the detector's ids from where
    it came in: the same ids as the other modules (unlike a power-cycled module), some skipped."""
    r = rig(n_modules=2, image_pixel_height=1024, frame_buffer_slots=32, assembler={"sync_timeout_s": 5.0})
    for i in range(1, 6):
        r.send_image(i)
    metas = r.run(5)
    r.pushes[1].close(linger=0)  # receiver 1 is gone
    for i in range(6, 10):  # the detector goes on; only module 0's frames are received
        r.send(i, 0)
    assert r.run(1, timeout_s=0.3) == []  # they wait for module 1 (the timeout is long)
    r.pushes[1] = make_socket(zmq.Context.instance(), zmq.PUSH, hwm=1000)  # the new receiver
    r.pushes[1].bind(module_frames_address(r.config, 1))
    for i in range(10, 15):
        r.send_image(i)
    metas += r.run(9, timeout_s=2.0)  # well within the timeout: 6-9 leave as module 1 moved past them
    assert [(m.id, m.status) for m in metas] == [(i, 0) for i in range(1, 6)] + [(i, 3) for i in range(6, 10)] + \
        [(i, 0) for i in range(10, 15)]
    assert [m.user_1 for m in metas] == list(range(14))
    image = r.image(metas[6])
    assert not image[512:].any() and np.array_equal(image[:512], raw_image(r.config, 7)[:512])
    assert np.array_equal(r.image(metas[-1]), raw_image(r.config, 14))
    stats = r.assembler.stats()
    assert (stats["id_gaps"], stats["skipped_ids"], stats["images_missing_module"]) == (1, 4, 4)
    assert (stats["module_restarts"], stats["detector_restarts"], stats["late_frames"]) == (0, 0, 0)


def test_a_single_power_cycled_module_leaves_the_others_going_without_republishing(rig):
    r = rig(n_modules=2, image_pixel_height=1024, frame_buffer_slots=16, assembler={"sync_timeout_s": 0.2})
    for i in range(100, 103):
        r.send_image(i)
    metas = r.run(3)
    for i in range(103, 110):  # module 1 starts its ids again at 1 (power-cycled), module 0 goes on
        r.send(i - 102, 1)
        r.send(i, 0)
        metas += r.run(1, timeout_s=0.1)
        time.sleep(0.05)
    metas += r.run(10, timeout_s=0.5)
    ids = [m.id for m in metas]
    assert ids == list(range(100, 110)), "every image of module 0 once, in order, none of the old ids again"
    assert all(m.status == 3 for m in metas[3:]) and all(m.status == 0 for m in metas[:3])
    image = r.image(metas[-1])
    assert not image[512:].any() and np.array_equal(image[:512], raw_image(r.config, 109)[:512])
    c = r.assembler.counters
    assert c.module_restarts == 1 and c.detector_restarts == 0 and c.late_frames >= 1


def test_a_forward_id_jump_is_followed(rig):
    r = rig(n_modules=2, image_pixel_height=1024)
    r.send_image(5)
    r.send_image(5_000_000)
    r.send_image(5_000_001)
    metas = r.run(3)
    assert [(m.id, m.status) for m in metas] == [(5, 0), (5_000_000, 0), (5_000_001, 0)]
    assert r.assembler.counters.forward_jumps == 2


def test_an_image_that_fails_to_assemble_is_counted_and_the_rest_of_its_batch_is_published(rig):
    r = rig(n_modules=2, image_pixel_height=1024, assembler={"sync_timeout_s": 5.0})
    place, calls = r.assembler.placer.place, []

    def failing_place(image, module, frame):
        calls.append(module)
        if len(calls) == 2:  # image 2's only frame
            raise RuntimeError("injected")
        place(image, module, frame)

    r.assembler.placer.place = failing_place
    for i in (1, 2, 3):
        r.send(i, 0)
    r.send(3, 1)  # releases 1, 2 (moved past) and 3 (complete) in one batch
    metas = r.run(3, timeout_s=1.0)
    assert [(m.id, m.status) for m in metas] == [(1, 3), (3, 0)]
    assert [m.user_1 for m in metas] == [0, 1]  # a consumer sees no gap: 2 was never published
    assert r.assembler.counters.images_failed == 1
    with pytest.raises(ImageLostError):
        r.assembler.images.read_meta(2)  # its slot is marked invalid, not left with stale pixels
    assert np.array_equal(r.image(metas[1]), raw_image(r.config, 3))


def test_a_frame_arriving_after_its_image_timed_out_is_late_and_dropped(rig):
    r = rig(n_modules=2, image_pixel_height=1024, assembler={"sync_timeout_s": 0.1})
    r.send(1, 0)
    assert [(m.id, m.status) for m in r.run(1)] == [(1, 3)]
    r.send(1, 1)
    assert r.run(1, timeout_s=0.3) == []
    r.send_image(2)
    assert [(m.id, m.status) for m in r.run(1)] == [(2, 0)]
    assert r.assembler.counters.late_frames == 1


def test_bad_config_names_the_key(make_config, tmp_path):
    _, config = make_config(assembler={"sync_timeout_s": "soon"})
    with pytest.raises(ConfigError, match="assembler.sync_timeout_s"):
        Assembler(config)
    _, config = make_config(conversion="converted", calibration_file=str(tmp_path / "missing.h5"))
    with pytest.raises(ConfigError, match="calibration_file"):
        Assembler(config)
    _, config = make_config(detector_type="eiger", n_modules=2, image_pixel_height=514, image_pixel_width=514,
                            module_positions={"0": [0, 0, 511, 255], "1": [0, 513, 513, 258]})
    with pytest.raises(ConfigError, match="module_positions.0"):
        Assembler(config)


def test_pedestal_command_averages_each_gain(make_config, tmp_path):
    path, config = make_config()
    pattern = frame_pattern(config.stream, 0, 1)
    raw = (pattern & 0xC000) | ((pattern & 0x3FFF) % 16000)  # room for +4 below the gain bits
    images = np.stack([raw, raw + 2, raw + 4])
    with h5py.File(tmp_path / "dark.h5", "w") as f:
        f["entry/data/data"] = images
        f[f"{config.detector_name}/status"] = np.zeros(3, np.uint16)
    result = subprocess.run([sys.executable, "-m", "std_assembler.pedestal", str(path), str(tmp_path / "ped.h5"),
                             str(tmp_path / "dark.h5")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with h5py.File(tmp_path / "ped.h5", "r") as f:
        pedestal = f["pedestal"][()]
    g = raw >> 14
    adc = (raw & 0x3FFF).astype(np.float32) + 2
    assert np.allclose(pedestal[0][g == 0], adc[g == 0])
    assert np.allclose(pedestal[2][g == 3], adc[g == 3])
    assert np.isnan(pedestal[1][g != 1]).all()


def test_the_package_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "std_assembler", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "std_assembler" in result.stdout


def test_the_kernels_compile_without_a_writable_cache_directory():
    """A read-only installation run by a user without a home (the Docker image, a systemd unit) has no
    place for numba's cache; the kernels must still import and run, compiled in the process."""
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:  # a path the unprivileged user can reach
        package = Path(scratch)
        (package / "kernels.py").write_bytes(Path(kernels.__file__).read_bytes())
        package.chmod(0o555)
        script = ("import numpy as np, kernels\n"
                  "raw = np.zeros((2, 64), np.uint16); raw[1, 5] = 0x4000\n"
                  "print('g0 nan pixels', kernels._count_g0_nan(raw, np.array([0, 69])))\n")
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", script],
            cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": scratch},
            capture_output=True, text=True, timeout=120)
        package.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "g0 nan pixels 1"
