"""std_assembler with a real FrameBuffer, ImageBuffer and ZMQ: the test plays the receivers (it writes frames
into the FrameBuffer and PUSHes their ModuleFrames) and a consumer of the metadata stream."""
from __future__ import annotations

import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import zmq

from core_buffer.detectors import pack_12bit
from core_buffer.errors import ConfigError
from core_buffer.formats import ImageMetadata, ModuleFrame
from core_buffer.ipc import image_metadata_address, make_socket, module_frames_address
from core_buffer.pattern import frame_bytes, frame_pattern
from core_buffer.ringbuffer import FrameBuffer
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
        self.assembler = Assembler(config)
        self.sub = make_socket(ctx, zmq.SUB, hwm=1000)
        self.sub.connect(image_metadata_address(config))
        time.sleep(0.2)

    def send(self, image_id, module, *, data=None, n_recv=None, pulse_id=0, frame_index=None):
        stream = self.config.stream
        slot = self.frames.begin_frame(image_id, module)
        slot[:] = frame_bytes(stream, module, image_id) if data is None else data
        frame = ModuleFrame(id=image_id, pulse_id=pulse_id, frame_index=image_id if frame_index is None else frame_index,
                            n_recv_packets=stream.packets_per_frame if n_recv is None else n_recv,
                            n_packets=stream.packets_per_frame, module_id=module, bit_depth=stream.bit_depth)
        self.frames.commit_frame(frame)
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
        expected = gigafrost_expected(r.config, meta.id) if geometry == "gigafrost" else raw_image(r.config, meta.id)
        image = r.image(meta)
        assert image.dtype == expected.dtype
        assert np.array_equal(image, expected), f"{np.count_nonzero(image != expected)} pixels differ"


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


def test_numpy_fallback_converts_like_the_compiled_path(make_config, tmp_path):
    from std_assembler.convert import JungfrauConverter

    pedestal, gain, mask = write_calibration(tmp_path / "cal.h5", 1)
    _, config = make_config(conversion="converted", calibration_file=str(tmp_path / "cal.h5"))
    raw = frame_pattern(config.stream, 0, 3)
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


def test_missing_module_lost_packets_and_mismatch_give_their_status(rig):
    r = rig(n_modules=2, image_pixel_height=1024, frame_buffer_slots=16, assembler={"sync_timeout_s": 0.1})
    r.send_image(1)
    r.send(2, 0)  # module 1 never sends 2, but moves past it
    r.send(3, 0, n_recv=100)
    r.send(3, 1)
    r.send(4, 0, pulse_id=1000)
    r.send(4, 1, pulse_id=1001)
    r.send(5, 0)  # module 1 silent: only the timeout releases it
    metas = {m.id: m for m in r.run(5)}
    assert {i: m.status for i, m in metas.items()} == {1: 0, 2: 3, 3: 1, 4: 2, 5: 3}
    image2 = r.image(metas[2])
    assert not image2[512:].any() and np.array_equal(image2[:512], raw_image(r.config, 2)[:512])
    c = r.assembler.counters
    assert (c.images_good, c.images_missing_module, c.images_missing_packets, c.images_mismatch) == (1, 2, 1, 1)


def test_drop_incomplete_counts_and_does_not_publish(rig):
    r = rig(n_modules=2, image_pixel_height=1024, assembler={"sync_timeout_s": 0.05, "drop_incomplete": True})
    r.send(1, 0)
    r.send_image(2)
    metas = r.run(2, timeout_s=1.0)
    assert [m.id for m in metas] == [2]
    assert r.assembler.counters.images_dropped == 1


def test_startup_offset_and_restart_do_not_stop_the_pipeline(rig):
    r = rig(n_modules=2, image_pixel_height=1024, assembler={"sync_timeout_s": 5.0})
    for i in (1, 2, 3):
        r.send(i, 0)
    assert r.run(1, timeout_s=0.3) == []  # module 1 has not started yet: nothing is ready
    r.send(3, 1)  # module 1 started late: 1 and 2 are released without it at once, in id order
    metas = r.run(3)
    for i in (1, 2):  # both receivers restarted: ids start again
        r.send_image(i)
        metas += r.run(1)
    assert [(m.id, m.status) for m in metas] == [(1, 3), (2, 3), (3, 0), (1, 0), (2, 0)]
    assert [m.user_1 for m in metas] == [0, 1, 2, 3, 4]
    assert r.assembler.sync.id_jumps_back == 1  # one detector restart
    assert np.array_equal(r.image(metas[-1]), raw_image(r.config, 2))


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
