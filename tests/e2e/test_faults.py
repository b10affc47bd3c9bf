"""Faults in a whole pipeline of real processes: kill -9 of each service mid-write, packet loss, a
receiver that falls behind. Whatever happens, a request ends with a final status and no wrong pixel
reaches a file: an image is either equal to the simulator's pattern or its status says what is missing."""
from __future__ import annotations

import os
import signal
import time

import h5py
import numpy as np
import pytest

from std_h5_writer.h5file import STATUS_NOT_WRITTEN
from tests.e2e.expected import raw_image

pytestmark = pytest.mark.broker


def read(path, det):
    with h5py.File(path, "r") as f:
        return (f["entry/data/data"][:], f[f"{det}/image_id"][:], f[f"{det}/status"][:], dict(f.attrs))


def assert_no_wrong_pixel(config, data, ids, statuses):
    """Status 0: the pattern, bit for bit. Status 1 (lost packets): every pixel is the pattern's or 0.
    Status 3 (missing module): the same. Status 4 (lost in the buffer): all zeros."""
    for image, image_id, st in zip(data, ids, statuses):
        if st == 4:
            assert not image.any()
            continue
        expected = raw_image(config, int(image_id))
        if st == 0:
            assert np.array_equal(image, expected), image_id
        else:
            assert np.all((image == expected) | (image == 0)), (image_id, st)


def write(client, config, path, n):
    return client.send_write(config.detector_name, {"output_file": str(path), "n_images": n})


@pytest.mark.parametrize("victim", ["udp_recv-0", "assembler", "writer_agent", "h5_writer"])
def test_kill_9_of_a_service_mid_write_ends_the_request_and_the_pipeline_resumes(
        victim, pipeline_config, pipelines, client, tmp_path):
    path, config = pipeline_config(writer_agent={"writer_timeout_s": 3.0},
                                   writer={"flush_interval_s": 0.3, "status_interval_s": 0.2})
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "50", "--n-images", "forever")
    out = tmp_path / "out" / "during.h5"
    request_id = write(client, config, out, 200)  # 4 s at 50 Hz
    client.wait(request_id, timeout_s=30, until="request_progress")
    time.sleep(1.0)
    os.kill(pipe.pid(victim), signal.SIGKILL)
    outcome = client.wait(request_id, timeout_s=60)
    assert outcome.final_action in ("request_success", "request_fail"), outcome
    if victim in ("udp_recv-0", "assembler"):  # the data path stalls and resumes; the write completes
        assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    elif victim == "writer_agent":
        assert not outcome.succeeded and "writer_agent restarted during the write" in outcome.message
    else:
        assert not outcome.succeeded and "std_h5_writer sent no status" in outcome.message
    if victim != "h5_writer":
        data, ids, statuses, attrs = read(out, config.detector_name)
        assert attrs["state"] in ("complete", "interrupted") and data.shape[0] == len(ids) > 0
        assert_no_wrong_pixel(config, data, ids, statuses)
    else:  # killed mid-file: readable up to its last flush, and it says it was never finished
        with h5py.File(out, "r") as f:
            assert f.attrs["state"] == "writing"
            n = int((f[f"{config.detector_name}/status"][:] != STATUS_NOT_WRITTEN).sum())
            assert n > 0
            assert_no_wrong_pixel(config, f["entry/data/data"][:n], f[f"{config.detector_name}/image_id"][:n],
                                  f[f"{config.detector_name}/status"][:n])
    pipe.wait_ready()  # the launcher restarted it
    again = write(client, config, tmp_path / "out" / "after.h5", 20)
    outcome = client.wait(again, timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    data, ids, statuses, _ = read(tmp_path / "out" / "after.h5", config.detector_name)
    assert not statuses.any()
    assert_no_wrong_pixel(config, data, ids, statuses)


def test_dropped_packets_give_status_1_on_exactly_those_images(pipeline_config, pipelines, client, tmp_path):
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024)
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "50", "--n-images", "forever", "--drop-every", "5")
    # The write starts once the stream is under way: a module's first frame may come late to the assembler
    # (missing module, status 3), which this test is not about (it failed once so on a busy machine).
    deadline = time.monotonic() + 30
    while pipe.metrics().get("std_assembler", {}).get("images", 0) < 10:
        assert time.monotonic() < deadline, pipe.log_tail()
        time.sleep(0.1)
    out = tmp_path / "out" / "lossy.h5"
    outcome = client.wait(write(client, config, out, 30), timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    data, ids, statuses, _ = read(out, config.detector_name)
    assert list(statuses) == [1 if i % 5 == 0 else 0 for i in ids]
    assert_no_wrong_pixel(config, data, ids, statuses)
    for image, image_id in zip(data[statuses == 1], ids[statuses == 1]):
        assert (image != raw_image(config, int(image_id))).any()  # the lost packet's pixels are zeros


def test_a_receiver_that_falls_behind_loses_counted_packets_and_no_wrong_pixel(
        pipeline_config, pipelines, client, tmp_path):
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024, udp_recv={"rcvbuf_bytes": 1 << 20})
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "100", "--n-images", "forever")
    out = tmp_path / "out" / "behind.h5"
    request_id = write(client, config, out, 150)
    client.wait(request_id, timeout_s=30, until="request_progress")
    receiver = pipe.pid("udp_recv-1")
    os.kill(receiver, signal.SIGSTOP)  # its CPU is stolen for half a second
    time.sleep(0.5)
    os.kill(receiver, signal.SIGCONT)
    outcome = client.wait(request_id, timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    data, ids, statuses, _ = read(out, config.detector_name)
    assert (statuses != 0).sum() > 0  # the stall shows in the file ...
    assert_no_wrong_pixel(config, data, ids, statuses)  # ... and not as wrong pixels
    metrics = pipe.metrics()
    assert metrics["std_udp_recv-1"]["lost_packets"] > 0 or metrics["std_assembler"]["images_missing_module"] > 0
    print(f"\nfalls behind: {len(statuses)} images written, statuses {dict(zip(*(a.tolist() for a in np.unique(statuses, return_counts=True))))}"
          f", receiver 1 lost {metrics['std_udp_recv-1']['lost_packets']:.0f} packets")


def test_a_broker_restart_during_a_write_loses_neither_the_data_nor_the_final_status(
        pipeline_config, pipelines, client, broker_url, tmp_path):
    """RabbitMQ's application is stopped and started again mid-write: the data path never needed it, so the
    file is complete; the agent reconnects with backoff and publishes the final status it owes."""
    import shutil
    import subprocess

    from tests.e2e.protocol_client import ProtocolClient

    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed (the broker runs elsewhere)")
    path, config = pipeline_config(writer_agent={"reconnect_max_s": 1.0})
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "50", "--n-images", "forever")
    out = tmp_path / "out" / "restart.h5"
    request_id = write(client, config, out, 500)  # 10 s at 50 Hz: it outlasts the restart
    client.wait(request_id, timeout_s=30, until="request_progress")
    try:
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
    client.close()
    deadline = time.monotonic() + 60
    while True:  # a new client, as soon as the broker takes connections again
        try:
            again = ProtocolClient(broker_url)
            break
        except Exception:  # noqa: BLE001 - pika's connection errors while the broker boots
            assert time.monotonic() < deadline, "the broker did not come back"
            time.sleep(0.5)
    try:
        outcome = again.wait(request_id, timeout_s=60)
    finally:
        again.close()
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    data, ids, statuses, attrs = read(out, config.detector_name)
    assert attrs["state"] == "complete" and data.shape[0] == 500
    assert_no_wrong_pixel(config, data, ids, statuses)
