"""std_h5_writer against a real ImageBuffer, real ZMQ and real HDF5 files; the test plays writer_agent."""
from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import threading
import time

import h5py
import hdf5plugin  # noqa: F401 - registers bitshuffle for reading
import numpy as np
import pytest
import zmq

from core_buffer.errors import ConfigError
from core_buffer.formats import ImageMetadata, StoreOp, StoreStream, WriterState, WriterStatus
from core_buffer.ipc import make_socket, store_stream_address, writer_status_address
from core_buffer.pattern import frame_pattern
from core_buffer.ringbuffer import ImageBuffer
from core_buffer.service import run
from std_h5_writer.h5file import STATUS_LOST
from std_h5_writer.writer import H5Writer


class Agent:
    """The test's side of the StoreStream contract, plus an image producer."""

    def __init__(self, config):
        self.config = config
        ctx = zmq.Context.instance()
        self.push = make_socket(ctx, zmq.PUSH, hwm=10000)
        self.push.bind(store_stream_address(config))
        self.status = make_socket(ctx, zmq.PULL, hwm=10000)
        self.status.connect(writer_status_address(config))
        self.images = ImageBuffer.for_config(config)
        self.stream = config.stream

    def produce(self, image_id, status=0):
        pixels = np.vstack([frame_pattern(self.stream, m, image_id) for m in range(self.config.n_modules)])
        self.images.begin_image(image_id)[:pixels.nbytes] = pixels.reshape(-1).view(np.uint8)
        meta = ImageMetadata(image_id, *self.config.image_shape, status=status, user_2=image_id)
        self.images.commit_image(meta)
        return meta, pixels

    def start(self, output_file, n_images, run_id=1, user_id=0, extra=None):
        request = {"output_file": str(output_file), "n_images": n_images, "run_id": run_id, "request_id": "r-1",
                   **(extra or {})}
        self.push.send_multipart([StoreStream(StoreOp.START, 0, n_images, user_id, run_id).encode(),
                                  json.dumps(request).encode()])

    def write(self, i, meta, n_images, run_id=1):
        self.push.send(StoreStream(StoreOp.WRITE, i, n_images, 0, run_id, meta).encode())

    def stop(self, n, n_images, run_id=1):
        self.push.send(StoreStream(StoreOp.STOP, n, n_images, 0, run_id).encode())

    def wait(self, states=(WriterState.FINISHED, WriterState.FAILED), timeout_s=10.0, run_id=None):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.status.poll(100):
                status = WriterStatus.decode(self.status.recv())
                if status.state in states and (run_id is None or status.run_id == run_id):
                    return status
        raise AssertionError(f"no writer status in {states}")

    def close(self):
        self.push.close()
        self.status.close()
        self.images.close()


@pytest.fixture
def writer_rig(make_config, tmp_path):
    started = []

    def factory(**overrides):
        overrides.setdefault("output_dirs", [str(tmp_path)])
        _, config = make_config(**overrides)
        agent = Agent(config)
        writer = H5Writer(config)
        stop = threading.Event()
        thread = threading.Thread(target=run, args=(writer, stop), daemon=True)
        thread.start()
        started.append((agent, stop, thread))
        time.sleep(0.2)
        return agent, writer

    yield factory
    for agent, stop, thread in started:
        stop.set()
        thread.join(timeout=10)
        agent.close()


def write_run(agent, path, ids, run_id=1):
    agent.start(path, len(ids), run_id)
    assert agent.wait((WriterState.WRITING,)).run_id == run_id
    expected = []
    for i, image_id in enumerate(ids):
        meta, pixels = agent.produce(image_id)
        expected.append(pixels)
        agent.write(i, meta, len(ids), run_id)
    agent.stop(len(ids), len(ids), run_id)
    return expected


@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_images_land_bit_for_bit_with_nxmx_layout_links_and_attributes(writer_rig, tmp_path, compression):
    agent, _ = writer_rig(n_modules=2, image_pixel_height=1024, writer={"compression": compression})
    path = tmp_path / "run.h5"
    expected = write_run(agent, path, [11, 12, 13, 14])
    final = agent.wait()
    assert final.state == WriterState.FINISHED and final.n_written == 4 and final.n_missing == 0
    det = agent.config.detector_name
    with h5py.File(path, "r") as f:
        data = f["entry/data/data"]
        assert data.shape == (4, 1024, 1024) and data.chunks == (1, 1024, 1024)
        assert np.array_equal(data[:], np.stack(expected))
        assert f[f"{det}/data"] == data  # a hard link to the same dataset, not a copy
        assert list(f[f"{det}/image_id"][:]) == [11, 12, 13, 14]
        assert list(f[f"{det}/frame_index"][:]) == [11, 12, 13, 14]
        assert not f[f"{det}/status"][:].any()
        assert f["entry"].attrs["NX_class"] == "NXentry"
        assert f["entry/instrument/detector"].attrs["NX_class"] == "NXdetector"
        assert f.attrs["state"] == "complete" and f.attrs["detector_name"] == det
        assert json.loads(f.attrs["request"])["n_images"] == 4
        if compression != "none":
            assert "32008" in str(data._filters)  # bitshuffle declared on the dataset
    assert oct(os.stat(path).st_mode & 0o777) == oct(agent.config.file_mode)


def test_an_overwritten_image_is_recorded_as_lost_with_zero_pixels(writer_rig, tmp_path):
    agent, _ = writer_rig()
    path = tmp_path / "lost.h5"
    agent.start(path, 3)
    agent.wait((WriterState.WRITING,))
    meta1, pix1 = agent.produce(1)
    meta2, _ = agent.produce(2)
    agent.produce(2 + agent.config.image_buffer_slots)  # overwrites image 2's slot before it is written
    meta3, pix3 = agent.produce(3)
    for i, meta in enumerate((meta1, meta2, meta3)):
        agent.write(i, meta, 3)
    agent.stop(3, 3)
    final = agent.wait()
    assert (final.n_written, final.n_missing) == (2, 1)
    with h5py.File(path, "r") as f:
        det = agent.config.detector_name
        assert list(f[f"{det}/status"][:]) == [0, STATUS_LOST, 0]
        assert not f["entry/data/data"][1].any()
        assert np.array_equal(f["entry/data/data"][2], pix3)


def test_stop_early_trims_the_file_and_marks_it_interrupted(writer_rig, tmp_path):
    agent, _ = writer_rig()
    path = tmp_path / "short.h5"
    agent.start(path, 10)
    agent.wait((WriterState.WRITING,))
    for i in range(3):
        meta, _ = agent.produce(i + 1)
        agent.write(i, meta, 10)
    agent.stop(3, 10)
    final = agent.wait()
    assert final.state == WriterState.FINISHED and final.n_written == 3
    with h5py.File(path, "r") as f:
        assert f["entry/data/data"].shape[0] == 3 and f.attrs["state"] == "interrupted"


@pytest.mark.parametrize("case", ["outside", "dotdot", "missing_dir", "exists", "relative", "symlink_dir"])
def test_refused_paths_get_a_failed_status_naming_why(writer_rig, tmp_path, case):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "exists.h5").write_bytes(b"")
    (allowed / "link").symlink_to(tmp_path)
    agent, writer = writer_rig(output_dirs=[str(allowed)])
    path, reason = {
        "outside": (tmp_path / "x.h5", "outside the allowed"),
        "dotdot": (f"{allowed}/../x.h5", "outside the allowed"),
        "missing_dir": (allowed / "nope" / "x.h5", "does not exist"),
        "exists": (allowed / "exists.h5", "already exists"),
        "relative": ("x.h5", "absolute"),
        "symlink_dir": (allowed / "link" / "x.h5", "outside the allowed"),
    }[case]
    agent.start(path, 2)
    status = agent.wait()
    assert status.state == WriterState.FAILED and reason in status.error
    assert not (tmp_path / "x.h5").exists()
    # ... and the writer serves the next request
    write_run(agent, allowed / "ok.h5", [1, 2], run_id=2)
    assert agent.wait(run_id=2).state == WriterState.FINISHED


def test_a_start_while_writing_closes_the_open_file_as_interrupted(writer_rig, tmp_path):
    agent, _ = writer_rig()
    agent.start(tmp_path / "a.h5", 5, run_id=1)
    agent.wait((WriterState.WRITING,))
    meta, _ = agent.produce(1)
    agent.write(0, meta, 5, run_id=1)
    agent.start(tmp_path / "b.h5", 1, run_id=2)
    first = agent.wait(run_id=1)
    assert first.state == WriterState.FAILED and "interrupted" in first.error
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f["entry/data/data"].shape[0] == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: a real file system that fills up (needs root to mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_fails_the_run_with_the_error_and_the_writer_goes_on(writer_rig, tmp_path, small_disk):
    agent, writer = writer_rig(output_dirs=[str(small_disk), str(tmp_path)], writer={"flush_interval_s": 0.05})
    agent.start(small_disk / "full.h5", 10)
    agent.wait((WriterState.WRITING,))
    for i in range(10):  # 10 MiB into 3 MiB
        meta, _ = agent.produce(i + 1)
        agent.write(i, meta, 10)
        time.sleep(0.06)
    agent.stop(10, 10)
    final = agent.wait()
    assert final.state == WriterState.FAILED
    assert "space" in final.error.lower() or "error" in final.error.lower()
    assert writer.counters.files_failed == 1
    write_run(agent, tmp_path / "next.h5", [5], run_id=2)
    assert agent.wait(run_id=2).state == WriterState.FINISHED


def test_user_id_sets_the_owner_when_running_as_root(writer_rig, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nobody = pwd.getpwnam("nobody")
    agent, _ = writer_rig()
    agent.start(tmp_path / "owned.h5", 1, user_id=nobody.pw_uid)
    agent.wait((WriterState.WRITING,))
    meta, _ = agent.produce(1)
    agent.write(0, meta, 1)
    agent.stop(1, 1)
    assert agent.wait().state == WriterState.FINISHED
    assert os.stat(tmp_path / "owned.h5").st_uid == nobody.pw_uid


def test_bad_config_names_the_key(make_config):
    _, config = make_config(writer={"compression": "gzip"})
    with pytest.raises(ConfigError, match="writer.compression"):
        H5Writer(config)


def test_sigterm_closes_the_open_file_cleanly(make_config, tmp_path):
    path_cfg, config = make_config(output_dirs=[str(tmp_path)])
    agent = Agent(config)
    proc = subprocess.Popen(["std_h5_writer", str(path_cfg)], stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        agent.start(tmp_path / "term.h5", 10)
        agent.wait((WriterState.WRITING,), timeout_s=15)
        for i in range(2):
            meta, _ = agent.produce(i + 1)
            agent.write(i, meta, 10)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        final = agent.wait(timeout_s=15)
        assert final.state == WriterState.FAILED and "SIGTERM" in final.error
        proc.wait(timeout=15)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        agent.close()
    with h5py.File(tmp_path / "term.h5", "r") as f:
        assert f["entry/data/data"].shape[0] == 2 and f.attrs["state"] == "interrupted"
