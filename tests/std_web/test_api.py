"""The REST API against a real pipeline: the launcher runs the services (std_web among them) from their
console scripts, std_udp_sim sends real UDP, writes go through the real RabbitMQ, files are real HDF5."""
from __future__ import annotations

import struct
import zlib

import h5py
import numpy as np
import pytest

from tests.std_web.conftest import wait_for

pytestmark = pytest.mark.broker


def decode_png(data: bytes) -> np.ndarray:
    """A greyscale PNG (filter 0 rows, as std_web writes them) back into an array, by the spec."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert colour == 0
    dtype = np.dtype(">u2") if depth == 16 else np.dtype(np.uint8)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, -1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].copy().view(dtype).reshape(height, width)


def test_write_sync_writes_a_file_of_n_images_and_the_daq_endpoints_describe_the_pipeline(web_pipeline):
    web = web_pipeline()
    web.pipe.simulate("--rate", "50", "--n-images", "forever")
    target = web.out / "sync.h5"

    answer = web.http.post("/writer/write_sync", {"output_file": str(target), "n_images": 5, "run_id": 7})

    assert answer["status"] == "ok", answer
    assert answer["message"] == "Completed."
    assert answer["acquisition"]["state"] == "FINISHED"
    assert answer["acquisition"]["stats"]["n_write_completed"] == 5
    with h5py.File(target, "r") as f:
        assert f["/entry/data/data"].shape == (5, 512, 1024)
    status = web.http.get("/writer/status")
    assert status["writer"]["state"] == "READY"
    assert status["writer"]["acquisition"]["message"] == "Completed."
    assert status["writer"]["acquisition"]["info"] == {"output_file": str(target), "n_images": 5, "run_id": 7}
    logs = web.http.get("/daq/logs/3")["logs"]
    assert logs[0]["output_file"] == str(target) and logs[0]["result"] == "request_success"
    config = web.http.get("/daq/config")["config"]
    assert config["detector_name"] == web.pipe.config.detector_name and config["image_pixel_width"] == 1024
    stats = wait_for(lambda: (s := web.http.get("/daq/stats")["stats"])["detector"]["images_per_second"] > 0 and s,
                     10, "a detector rate in /daq/stats")
    assert stats["detector"]["bytes_per_second"] == pytest.approx(
        stats["detector"]["images_per_second"] * 512 * 1024 * 2, rel=1e-3)
    deployment = web.http.get("/daq/deployment")["deployment"]
    services = {s["service"]: s for s in deployment["services"]}
    assert services["std_assembler"]["up"] and services["std_assembler"]["pids"] == [web.pipe.pid("assembler")]
    assert services["std_web"]["pids"] == [web.pipe.pid("web")]


def test_write_async_then_status_then_stop_ends_interrupted(web_pipeline):
    web = web_pipeline()
    web.pipe.simulate("--rate", "20", "--n-images", "forever")
    target = web.out / "async.h5"

    answer = web.http.post("/writer/write_async", {"output_file": str(target), "n_images": 100000})
    assert answer["status"] == "ok", answer

    def writing():
        writer = web.http.get("/writer/status")["writer"]
        return writer["state"] == "WRITING" and writer["acquisition"]["stats"]["n_write_completed"] > 0 and writer
    writer = wait_for(writing, 20, "the write writing images")
    assert writer["acquisition"]["state"] == "ACQUIRING_IMAGES"
    assert writer["acquisition"]["request_id"] == answer["request_id"]

    stopped = web.http.post("/writer/stop")
    assert stopped["status"] == "ok" and stopped["request_id"] == answer["request_id"], stopped

    def ended():
        writer = web.http.get("/writer/status")["writer"]
        return writer["acquisition"]["state"] == "FINISHED" and writer
    writer = wait_for(ended, 20, "the write ending")
    assert writer["acquisition"]["message"] == "Interrupted."
    assert writer["state"] == "READY"
    n_written = writer["acquisition"]["stats"]["n_write_completed"]
    with h5py.File(target, "r") as f:
        assert 0 < f["/entry/data/data"].shape[0] == n_written < 100000
    assert web.http.post("/writer/stop")["message"].startswith("nothing to stop")


def test_refusals_arrive_as_errors_naming_the_problem(web_pipeline):
    web = web_pipeline()
    outside = "/var/tmp/not-allowed/x.h5"

    refused = web.http.post("/writer/write_sync", {"output_file": outside, "n_images": 3})
    assert refused["status"] == "error"
    assert outside in refused["message"] or "allowed" in refused["message"], refused
    assert web.http.get("/writer/status")["writer"]["state"] == "UNKNOWN"
    assert web.http.post("/writer/stop")["status"] == "ok"
    assert web.http.get("/writer/status")["writer"]["state"] == "READY"
    refused = web.http.post("/writer/write_async", {"output_file": "relative.h5", "n_images": 3})
    assert refused["status"] == "error" and "relative.h5" in refused["message"], refused

    for body, field in (({"output_file": str(web.out / "a.h5"), "n_images": 0}, "n_images"),
                        ({"n_images": 3}, "output_file"),
                        ({"output_file": str(web.out / "a.h5"), "n_images": "3"}, "n_images"),
                        ({"output_file": str(web.out / "a.h5"), "n_images": 3, "run_id": -1}, "run_id")):
        status, answer = web.http.json("POST", "/writer/write_async", body)
        assert status == 422, answer
        assert answer["status"] == "error" and field in answer["message"], answer
    status, answer = web.http.json("POST", "/writer/write_async", raw=b"{not json")
    assert status == 422 and answer["status"] == "error"
    assert web.http.get("/simulation/status")["status"] == "error"
    assert "allow_config_write" in web.http.post("/daq/config", {"bit_depth": 16})["message"]
    assert not list(web.out.iterdir())


def test_live_png_holds_the_latest_preview_image_and_moves_on(web_pipeline):
    web = web_pipeline()
    web.pipe.simulate("--rate", "50", "--n-images", "forever")

    def live():
        status, headers, body = web.http.request("GET", "/daq/live")
        return headers.get("Content-Type") == "image/png" and (headers, body)
    headers, body = wait_for(live, 20, "a live image")
    image = decode_png(body)
    assert image.shape == (512, 1024) and image.dtype == np.dtype(">u2")
    assert headers["X-Dtype"] == "uint16" and headers["X-Shape"] == "512,1024"
    first_id = int(headers["X-Image-Id"])
    wait_for(lambda: int(web.http.request("GET", "/daq/live")[1]["X-Image-Id"]) > first_id, 10,
             "a later live image")

    status, headers, raw = web.http.request("GET", "/daq/live/raw?max_side=256")
    rows, cols = map(int, headers["X-Shape"].split(","))
    assert (rows, cols) == (128, 256) and len(raw) == rows * cols * 2
    stretched = decode_png(web.http.request("GET", "/daq/live?scale=auto")[2])
    assert stretched.dtype == np.uint8 and stretched.shape == (512, 1024)
