"""Simulator -> receivers -> assembler -> writer_agent (request over RabbitMQ) -> std_h5_writer -> file."""
from __future__ import annotations

import os
import time

import h5py
import numpy as np
import pytest

from std_daq import status
from tests.conftest import free_tcp_port_block
from tests.e2e.conftest import wait_until_up
from tests.e2e.expected import converted_image, raw_image

pytestmark = pytest.mark.broker

RATE_HZ = "50"
STATS_INTERVAL_S = 0.2  # metrics snapshots this often, so stream_under_way sees the first images soon


def stream_under_way(pipe, n_images: int = 3, timeout_s: float = 20.0) -> None:
    """Start the simulator and wait until the assembler has published a few images. The first images of a
    stream can leave without a module whose first frame came late (status 3, "start-up offsets" in
    docs/std_assembler.md); these tests check the pixels of a steady stream, test_faults the statuses."""
    pipe.simulate("--rate", RATE_HZ, "--n-images", "forever")
    deadline = time.monotonic() + timeout_s
    while pipe.metrics().get("std_assembler", {}).get("images", 0) < n_images:
        assert time.monotonic() < deadline, f"no images from the assembler\n{pipe.log_tail()}"
        time.sleep(0.1)


def read_file(path: str, det: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["entry/data/data"][:], f[f"{det}/image_id"][:], f[f"{det}/status"][:]


def assert_images_equal_pattern(config, data: np.ndarray, ids: np.ndarray) -> None:
    assert len(ids) == data.shape[0] > 0
    assert np.all(np.diff(ids.astype(np.int64)) == 1), f"image ids not consecutive: {ids}"
    for image, image_id in zip(data, ids):
        expected = raw_image(config, int(image_id))
        if not np.array_equal(image, expected):
            bad = np.argwhere(image != expected)
            raise AssertionError(f"image {image_id}: {len(bad)} pixels differ, first at {bad[0].tolist()}")


def write(client, config, out_file: str, n_images: int, timeout_s: float = 60.0):
    request_id = client.send_write(config.detector_name, {"output_file": out_file, "n_images": n_images,
                                                          "user_id": os.getuid(), "run_id": 7})
    return client.wait(request_id, timeout_s=timeout_s)


def test_jungfrau_two_modules_file_equals_the_simulated_pattern(pipeline_config, pipelines, client, tmp_path):
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024, stats_interval_s=STATS_INTERVAL_S)
    pipe = pipelines(path, config)
    stream_under_way(pipe)
    out_file = str(tmp_path / "out" / "jf.h5")
    outcome = write(client, config, out_file, 20)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    assert outcome.actions[0] == "request_start"
    data, ids, statuses = read_file(out_file, config.detector_name)
    assert data.shape == (20, 1024, 1024) and data.dtype == np.uint16
    assert not statuses.any()
    assert_images_equal_pattern(config, data, ids)


def write_calibration(path, n_modules: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A calibration file (docs/std_assembler.md) with realistic values, float32 as the pedestal command
    writes them, and one pixel of each kind that must come out NaN."""
    rows = n_modules * 512
    rng = np.random.default_rng(8)
    pedestal = np.stack([rng.uniform(lo, hi, (rows, 1024)) for lo, hi in ((900, 3200), (13000, 15000),
                                                                           (14000, 16000))]).astype(np.float32)
    gain = np.stack([rng.uniform(lo, hi, (rows, 1024)) for lo, hi in ((38, 44), (-1.6, -1.4),
                                                                       (-0.12, -0.09))]).astype(np.float32)
    mask = np.zeros((rows, 1024), np.uint8)
    # Pattern gain bits come from (row + col + module) % 16 (core_buffer.pattern): 4 is G0, 9 G1, 12 G2.
    pedestal[1, 5, 4] = np.nan  # G1 never seen by the pedestal run
    gain[0, 10, 10] = 0.0  # G0
    gain[2, 0, 12] = np.inf  # G2
    mask[512 + 100, 203] = 1  # module 1, a G0 pixel
    with h5py.File(path, "w") as f:
        f["pedestal"], f["gain"], f["pixel_mask"] = pedestal, gain, mask
    return pedestal, gain, mask


def test_jungfrau_two_modules_converted_file_equals_the_pattern_converted_bit_for_bit(pipeline_config, pipelines,
                                                                                        client, tmp_path):
    """conversion converted, module 1 placed flipped and mirrored below a gap: each image is the simulator's
    pattern through the calibration, computed here from the documented arithmetic (expected.py)."""
    pedestal, gain, mask = write_calibration(tmp_path / "calibration.h5", 2)
    path, config = pipeline_config(n_modules=2, image_pixel_height=1100, image_pixel_width=1030,
                                   module_positions={"0": [0, 0, 1023, 511], "1": [1029, 1099, 6, 588]},
                                   conversion="converted", calibration_file=str(tmp_path / "calibration.h5"),
                                   image_buffer_slots=32, stats_interval_s=STATS_INTERVAL_S)
    pipe = pipelines(path, config)
    stream_under_way(pipe)
    out_file = str(tmp_path / "out" / "jf-converted.h5")
    outcome = write(client, config, out_file, 10)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    data, ids, statuses = read_file(out_file, config.detector_name)
    assert data.shape == (10, 1100, 1030) and data.dtype == np.float32
    assert not statuses.any()
    assert np.all(np.diff(ids.astype(np.int64)) == 1), f"image ids not consecutive: {ids}"
    for image, image_id in zip(data, ids):
        expected = converted_image(config, int(image_id), pedestal, gain, mask)
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(image), nan), f"image {image_id}: NaN at other pixels"
        differ = np.argwhere(image.view(np.uint32)[~nan] != expected.view(np.uint32)[~nan])
        assert not len(differ), f"image {image_id}: {len(differ)} pixels differ in their bits"
    # The special pixels were hit: NaN there, wherever they landed.
    assert np.isnan(expected[5, 4]) and np.isnan(expected[10, 10]) and np.isnan(expected[0, 12])
    assert np.isnan(expected[1099 - 100, 1029 - 203])


def test_eiger_two_half_modules_file_equals_the_simulated_pattern(pipeline_config, pipelines, client, tmp_path):
    path, config = pipeline_config(detector_type="eiger", n_modules=2, bit_depth=16, image_pixel_height=514,
                                   image_pixel_width=514,
                                   module_positions={"0": [0, 0, 513, 255], "1": [0, 513, 513, 258]},
                                   stats_interval_s=STATS_INTERVAL_S)
    pipe = pipelines(path, config)
    stream_under_way(pipe)
    out_file = str(tmp_path / "out" / "eiger.h5")
    outcome = write(client, config, out_file, 10)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    data, ids, statuses = read_file(out_file, config.detector_name)
    assert data.shape == (10, 514, 514)
    assert not statuses.any()
    assert_images_equal_pattern(config, data, ids)


def test_a_write_on_the_replica_server_equals_the_originals(pipeline_config, pipelines, std_daq_up, client,
                                                            tmp_path):
    """Detector server: the pipeline plus std_stream_send. "Other server": `std-daq up` with the replica's
    config (stream_recv.bind), which runs std_stream_recv, writer_agent and std_h5_writer in their own
    namespace (own shared memory and ipc names), as on a second machine."""
    port = free_tcp_port_block(1)
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024,
                                   stream_send={"to": f"tcp://127.0.0.1:{port}"}, stats_interval_s=STATS_INTERVAL_S)
    replica_path, replica = pipeline_config(n_modules=2, image_pixel_height=1024, namespace="replica",
                                            stream_recv={"bind": f"tcp://127.0.0.1:{port}"},
                                            writer_agent={"tag": config.detector_name + "-replica"})
    replica_side = std_daq_up(replica_path)
    replica_side.output.wait_for(rf"\(replica server: images from std_stream_send on tcp://127\.0\.0\.1:{port}\): "
                                 "3 services")
    wait_until_up(replica, replica_side.output)
    assert [m.label for m in status.scrape(replica)] == ["std_stream_recv", "writer_agent", "std_h5_writer"]
    detector_side = pipelines(path, config)
    stream_under_way(detector_side)
    out_file = str(tmp_path / "out" / "replica.h5")
    request_id = client.send_write(config.detector_name + "-replica", {"output_file": out_file, "n_images": 15})
    outcome = client.wait(request_id, timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n{replica_side.output.text()[-4000:]}\n{detector_side.log_tail()}"
    data, ids, statuses = read_file(out_file, config.detector_name)
    assert data.shape == (15, 1024, 1024) and not statuses.any()
    assert_images_equal_pattern(config, data, ids)
    assert replica_side.stop() == 0
    text = replica_side.output.text()
    stops = [text.index(f"stopped {label} (exit code 0)") for label in ("stream_recv", "writer_agent", "h5_writer")]
    assert stops == sorted(stops), text  # the replica's producer first
    assert "started udp_recv" not in text and "started assembler" not in text
    assert f"removed shared memory: replica-{config.detector_name}-images" in text


def test_short_acquisitions_numbered_from_one_each_time_are_all_written(pipeline_config, pipelines, client,
                                                                        tmp_path):
    """A step scan on a detector that numbers every acquisition from 1: three acquisitions of 2 images,
    an idle gap apart (the receivers see the ids start again). A write of 6 asked for before them ends
    with all 6, every one complete and equal to the pattern of its id, and the assembler drops nothing."""
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024, stats_interval_s=STATS_INTERVAL_S)
    pipe = pipelines(path, config)
    out_file = str(tmp_path / "out" / "scan.h5")
    request_id = client.send_write(config.detector_name, {"output_file": out_file, "n_images": 6,
                                                          "user_id": os.getuid(), "run_id": 8})
    assert client.wait(request_id, timeout_s=20, until="request_start").actions == ["request_start"]
    time.sleep(0.5)  # the agent forwards images published after its start only
    for point in range(3):
        if point:
            time.sleep(1.5)  # an idle gap: longer than the receivers' 1 s (docs/std_udp_recv.md)
        assert pipe.simulate("--n-images", "2", "--rate", "100").wait(timeout=20) == 0
    outcome = client.wait(request_id, timeout_s=20)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    data, ids, statuses = read_file(out_file, config.detector_name)
    assert ids.tolist() == [1, 2] * 3 and not statuses.any()
    for image, image_id in zip(data, ids):
        assert np.array_equal(image, raw_image(config, int(image_id)))
    assembler = pipe.metrics()["std_assembler"]
    assert (assembler["images"], assembler["late_frames"], assembler["detector_restarts"]) == (6, 0, 2)
