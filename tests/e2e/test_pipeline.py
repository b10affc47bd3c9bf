"""Simulator -> receivers -> assembler -> writer_agent (request over RabbitMQ) -> std_h5_writer -> file."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from core_buffer.pattern import STAMP_COLUMNS
from std_daq.launcher import ServiceSpec, console_script
from tests.conftest import free_tcp_port_block
from tests.e2e.expected import raw_image

pytestmark = pytest.mark.broker

RATE_HZ = "50"


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
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024)
    pipe = pipelines(path, config)
    pipe.simulate("--rate", RATE_HZ, "--n-images", "forever")
    out_file = str(tmp_path / "out" / "jf.h5")
    outcome = write(client, config, out_file, 20)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    assert outcome.actions[0] == "request_start"
    data, ids, statuses = read_file(out_file, config.detector_name)
    assert data.shape == (20, 1024, 1024) and data.dtype == np.uint16
    assert not statuses.any()
    assert_images_equal_pattern(config, data, ids)


def test_eiger_two_half_modules_file_equals_the_simulated_pattern(pipeline_config, pipelines, client, tmp_path):
    path, config = pipeline_config(detector_type="eiger", n_modules=2, bit_depth=16, image_pixel_height=514,
                                   image_pixel_width=514,
                                   module_positions={"0": [0, 0, 513, 255], "1": [0, 513, 513, 258]})
    pipe = pipelines(path, config)
    pipe.simulate("--rate", RATE_HZ, "--n-images", "forever")
    out_file = str(tmp_path / "out" / "eiger.h5")
    outcome = write(client, config, out_file, 10)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    data, ids, statuses = read_file(out_file, config.detector_name)
    assert data.shape == (10, 514, 514)
    assert not statuses.any()
    assert_images_equal_pattern(config, data, ids)


def test_a_write_on_the_replica_server_equals_the_originals(pipeline_config, pipelines, client, tmp_path):
    """Detector server: the pipeline plus std_stream_send. "Other server": std_stream_recv, writer_agent and
    std_h5_writer in their own namespace (own shared memory and ipc names), as on a second machine."""
    port = free_tcp_port_block(1)
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024,
                                   stream_send={"to": f"tcp://127.0.0.1:{port}"})
    replica_path, replica = pipeline_config(n_modules=2, image_pixel_height=1024, namespace="replica",
                                            stream_recv={"bind": f"tcp://127.0.0.1:{port}"},
                                            writer_agent={"tag": config.detector_name + "-replica"})
    replica_side = pipelines(replica_path, replica, specs=[
        ServiceSpec(label, [console_script(script), str(replica_path)], rank)
        for rank, (label, script) in enumerate((("stream_recv", "std_stream_recv"),
                                                ("writer_agent", "writer_agent"), ("h5_writer", "std_h5_writer")))])
    detector_side = pipelines(path, config)
    detector_side.simulate("--rate", RATE_HZ, "--n-images", "forever")
    out_file = str(tmp_path / "out" / "replica.h5")
    request_id = client.send_write(config.detector_name + "-replica", {"output_file": out_file, "n_images": 15})
    outcome = client.wait(request_id, timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n{replica_side.log_tail()}\n{detector_side.log_tail()}"
    data, ids, statuses = read_file(out_file, config.detector_name)
    assert data.shape == (15, 1024, 1024) and not statuses.any()
    assert_images_equal_pattern(config, data, ids)
