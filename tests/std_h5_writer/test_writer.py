"""std_h5_writer against a real ImageBuffer, real ZMQ and real HDF5 files; the test plays writer_agent."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import h5py
import hdf5plugin  # registers bitshuffle for reading
import numpy as np
import pytest

from core_buffer.errors import ConfigError
from core_buffer.formats import Encoding, ModuleFrame, WriterState
from core_buffer.ringbuffer import FrameBuffer
from std_h5_writer import h5file, open_files
from std_h5_writer import writer as writer_module
from std_h5_writer.compression import Bitshuffle
from std_h5_writer.h5file import STATUS_LOST, STATUS_NOT_WRITTEN, STATUS_REJECTED
from std_h5_writer.writer import H5Writer
from tests.std_h5_writer.agent import Agent, write_run


@pytest.fixture(params=["batched", "one by one"])
def write_path(request, monkeypatch):
    """Uncompressed writes queued together are done as a batch (numpy bookkeeping), a few one by one
    through the general path; which one a test gets depends on timing, so tests of pixels and statuses
    that use this fixture run each path for sure."""
    monkeypatch.setattr(writer_module, "VECTOR_MIN_WRITES", 1 if request.param == "batched" else 10**9)


# Uncompressed runs of up to writer.preallocate_max_images images are written with pwrite into chunks
# allocated at start, longer ones with H5Dwrite_chunk: "none, 0" takes the second path.
@pytest.mark.parametrize("compression,threads,preallocate", [
    ("none", 1, 65536), ("none", 1, 0), ("bitshuffle-lz4", 1, 65536), ("bitshuffle-lz4", 2, 65536)])
def test_images_land_bit_for_bit_with_nxmx_layout_links_and_attributes(write_path, writer_rig, tmp_path, compression,
                                                                       threads, preallocate):
    agent, _ = writer_rig(n_modules=2, image_pixel_height=1024,
                          writer={"compression": compression, "compression_threads": threads,
                                  "preallocate_max_images": preallocate})
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


def test_an_overwritten_image_is_recorded_as_lost_with_zero_pixels(write_path, writer_rig, tmp_path):
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


@pytest.mark.parametrize("preallocate", [65536, 0])
def test_stop_early_trims_the_file_and_marks_it_interrupted(write_path, writer_rig, tmp_path, preallocate):
    agent, _ = writer_rig(writer={"preallocate_max_images": preallocate})
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
        data = f["entry/data/data"]
        assert data.shape[0] == 3 and f.attrs["state"] == "interrupted"
        assert np.array_equal(data[:], np.stack([agent.produce(image_id)[1] for image_id in (1, 2, 3)]))


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


@pytest.fixture(params=["tmpfs", "ext4"])
def small_disk(request, tmp_path):
    """A small real file system that fills up (needs root to mount; the file-size-limit test below covers
    the same path without root): a 3 MiB tmpfs, or a 12 MiB ext4 on a loop device, which writes its pages
    back to its disk as a real one does (a tmpfs keeps them: a bounded page cache falls back to kernel
    mode there)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = tmp_path / f"small-{request.param}"  # the test reads the kind from the name
    mount.mkdir()
    if request.param == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    else:
        if shutil.which("mkfs.ext4") is None:
            pytest.skip("mkfs.ext4 is not installed")
        image = tmp_path / "small-ext4.img"
        with open(image, "wb") as f:
            f.truncate(12 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)  # the loop device goes at umount
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("page_cache", ["bounded", "kernel"])
def test_disk_full_fails_the_run_with_the_error_and_the_writer_goes_on(writer_rig, tmp_path, small_disk, page_cache):
    agent, writer = writer_rig(output_dirs=[str(small_disk), str(tmp_path)], writer={
        "flush_interval_s": 0.05, "page_cache": page_cache, "page_cache_window_mib": 1})
    agent.start(small_disk / "full.h5", 10)
    agent.wait((WriterState.WRITING,))
    for i in range(10):  # 10 MiB into 3 MiB
        meta, _ = agent.produce(i + 1)
        agent.write(i, meta, 10)
        time.sleep(0.06)
    agent.stop(10, 10)
    final = agent.wait()
    assert final.state == WriterState.FAILED
    assert "No space left on device" in final.error
    assert writer.counters.files_failed == 1
    # A tmpfs keeps its pages: a bounded page cache went to kernel mode for that file, and said so.
    assert final.details["page_cache"] == ("kernel" if small_disk.name == "small-tmpfs" else page_cache)
    write_run(agent, tmp_path / "next.h5", [5], run_id=2)
    assert agent.wait(run_id=2).state == WriterState.FINISHED
    with h5py.File(small_disk / "full.h5", "r") as f:  # closed, readable, holding the images it says
        assert f.attrs["state"] == "interrupted"
        written = f.attrs["n_images_written"]
        assert written == f["entry/data/data"].shape[0] < 10
        assert written > 0 or small_disk.name == "small-tmpfs"  # 3 MiB hold none with the closing reserve


def _limit_file_size():
    # In the writer's process only (preexec): files stop growing at 3 MiB with EFBIG ("File too large");
    # SIGXFSZ ignored, else the kernel kills the process instead of failing the write. Works unprivileged.
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


@contextlib.contextmanager
def _size_limited_writer(path_cfg, config):
    """A std_h5_writer process whose files stop growing at 3 MiB, and an Agent to drive it; on leaving, the
    writer is stopped (SIGTERM) and its log kept as `proc.log`."""
    agent = Agent(config)
    proc = subprocess.Popen(["std_h5_writer", str(path_cfg)], stderr=subprocess.PIPE, text=True,
                            preexec_fn=_limit_file_size)
    try:
        yield agent, proc
    finally:
        proc.terminate()
        _, proc.log = proc.communicate(timeout=20)
        agent.close()
        # A file whose close failed inside HDF5's metadata write (the limit reached there, depending on
        # when the flushes fell) keeps its record, for the next writer of the detector to mark: there is
        # none after this test.
        shutil.rmtree(open_files.record_directory(config), ignore_errors=True)


def test_a_file_size_limit_fails_the_run_with_the_errno_text_and_the_next_request_succeeds(make_config, tmp_path):
    # Written through H5Dwrite_chunk, the file grows image by image. (Preallocated, it has its full size
    # from the start: the next test.)
    path_cfg, config = make_config(output_dirs=[str(tmp_path)], writer={"preallocate_max_images": 0})
    with _size_limited_writer(path_cfg, config) as (agent, proc):
        agent.start(tmp_path / "big.h5", 10)
        agent.wait((WriterState.WRITING,), timeout_s=20)
        for i in range(10):  # 10 MiB against a 3 MiB limit
            meta, _ = agent.produce(i % 4 + 1)
            agent.write(i, meta, 10)
        agent.stop(10, 10)
        final = agent.wait(timeout_s=20)
        assert final.state == WriterState.FAILED
        assert "File too large" in final.error, final.error
        assert 0 < final.n_written < 10
        write_run(agent, tmp_path / "next.h5", [5], run_id=2)
        nxt = agent.wait(run_id=2, timeout_s=20)
        assert nxt.state == WriterState.FINISHED and nxt.n_written == 1
    with h5py.File(tmp_path / "next.h5", "r") as f:
        assert f["entry/data/data"].shape[0] == 1


def test_a_preallocated_run_larger_than_the_file_size_limit_is_refused_at_its_start_and_leaves_no_file(make_config,
                                                                                                        tmp_path):
    path_cfg, config = make_config(output_dirs=[str(tmp_path)])
    with _size_limited_writer(path_cfg, config) as (agent, proc):
        agent.start(tmp_path / "big.h5", 10)  # 10 MiB against a 3 MiB limit
        refused = agent.wait(timeout_s=20)
        assert refused.state == WriterState.FAILED and "File too large" in refused.error, refused.error
        assert not (tmp_path / "big.h5").exists()
        write_run(agent, tmp_path / "next.h5", [5], run_id=2)
        assert agent.wait(run_id=2, timeout_s=20).state == WriterState.FINISHED
    assert proc.returncode == 0


def _fds(pid, directory):
    """The process's open descriptors: (count, those of files in `directory` that are deleted)."""
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:  # closed while listed
            pass
    return len(targets), [t for t in targets if t.startswith(str(directory)) and t.endswith("(deleted)")]


def test_repeated_oversize_preallocated_runs_refused_at_start_hold_no_descriptors_or_disk_space(make_config,
                                                                                                 tmp_path):
    # HDF5 fails to close such a file (its flush fails with EFBIG) and the h5py File is kept (h5file.
    # keep_unclosable); the file is unlinked. Neither its descriptor nor its blocks may stay held, and
    # every kept handle is logged with the running count.
    path_cfg, config = make_config(output_dirs=[str(tmp_path)])
    with _size_limited_writer(path_cfg, config) as (agent, proc):
        def refuse(run_id):
            agent.start(tmp_path / f"big-{run_id}.h5", 10, run_id=run_id)  # 10 MiB against a 3 MiB limit
            refused = agent.wait(timeout_s=20, run_id=run_id)
            assert refused.state == WriterState.FAILED and "File too large" in refused.error, refused.error

        refuse(1)
        before, _ = _fds(proc.pid, tmp_path)
        for run_id in range(2, 22):
            refuse(run_id)
        after, deleted = _fds(proc.pid, tmp_path)
        print(f"descriptors: {before} after 1 refused run, {after} after 21")
        assert deleted == [], deleted
        assert after <= before, f"{after - before} descriptors more after 20 refused runs"
        assert not list(tmp_path.glob("big-*.h5"))
        write_run(agent, tmp_path / "next.h5", [5], run_id=30)
        assert agent.wait(run_id=30, timeout_s=20).state == WriterState.FINISHED
    assert proc.returncode == 0
    assert "HDF5 could not close" in proc.log and "(21 so far)" in proc.log, proc.log[-2000:]


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
        assert "interruption" not in f.attrs  # closed by its own writer, not marked after a crash
    assert not os.path.exists(open_files.record_directory(config))  # no record of an open file left


def test_the_file_is_nxmx_with_definition_times_sample_and_detector_data_link(writer_rig, tmp_path):
    agent, _ = writer_rig()
    path = tmp_path / "nx.h5"
    write_run(agent, path, [1, 2])
    assert agent.wait().state == WriterState.FINISHED
    with h5py.File(path, "r") as f:
        entry = f["entry"]
        assert entry["definition"][()].decode() == "NXmx"
        start, end = entry["start_time"][()].decode(), entry["end_time"][()].decode()
        assert start[:4].isdigit() and "T" in start and end >= start
        assert entry["sample"].attrs["NX_class"] == "NXsample"
        detector = entry["instrument/detector"]
        assert detector["data"] == entry["data/data"]  # the same dataset, linked
        assert detector["depends_on"][()].decode() == "."
        assert detector["x_pixel_size"][()] == pytest.approx(75e-6) and detector["x_pixel_size"].attrs["units"] == "m"
        module = detector["module"]
        assert module.attrs["NX_class"] == "NXdetector_module"
        assert list(module["data_size"][:]) == [512, 1024] and list(module["data_origin"][:]) == [0, 0]
        fast = module["fast_pixel_direction"]
        assert fast.attrs["transformation_type"] == "translation" and list(fast.attrs["vector"]) == [1, 0, 0]
        assert f[fast.attrs["depends_on"]] == module["module_offset"]
        assert entry["data"].attrs["signal"] == "data" and entry.attrs["default"] == "data"


def test_pulse_id_and_daq_rec_come_from_a_frame_buffer_made_after_the_writer_started(write_path, writer_rig, tmp_path):
    agent, writer = writer_rig()
    assert writer.frames is None  # the launcher starts the writer before the receivers make the FrameBuffer
    frames = FrameBuffer.for_config(agent.config)
    try:
        ids = [21, 22, 23]
        for image_id in ids:
            frames.begin_frame(image_id, 0)
            frames.commit_frame(ModuleFrame(image_id, pulse_id=9000 + image_id, frame_index=image_id,
                                            daq_rec=40 + image_id, module_id=0))
        path = tmp_path / "pulses.h5"
        write_run(agent, path, ids)
        assert agent.wait().state == WriterState.FINISHED
        det = agent.config.detector_name
        with h5py.File(path, "r") as f:
            assert list(f[f"{det}/pulse_id"][:]) == [9021, 9022, 9023]
            assert list(f[f"{det}/daq_rec"][:]) == [61, 62, 63]
        assert writer.counters.frame_fields_missing == 0
    finally:
        frames.close()
        frames.unlink()


def test_with_image_id_source_pulse_id_the_image_id_is_the_pulse_id_and_missing_frames_are_counted(
        write_path, writer_rig, tmp_path):
    agent, writer = writer_rig(image_id_source="pulse_id")
    path = tmp_path / "pid.h5"
    write_run(agent, path, [1000001, 1000002])
    assert agent.wait().state == WriterState.FINISHED
    det = agent.config.detector_name
    with h5py.File(path, "r") as f:
        assert list(f[f"{det}/pulse_id"][:]) == [1000001, 1000002]
        assert list(f[f"{det}/daq_rec"][:]) == [0, 0]
    assert writer.counters.frame_fields_missing == 2  # no FrameBuffer: daq_rec could not be read


def test_an_unexpected_error_creating_the_file_gets_a_failed_status_and_leaves_no_file(
        writer_rig, tmp_path, monkeypatch):
    agent, _ = writer_rig()
    real_layout = h5file.OutputFile._layout
    calls = []

    def failing_once(self, *args):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("cannot allocate the per-image columns")
        return real_layout(self, *args)

    monkeypatch.setattr(h5file.OutputFile, "_layout", failing_once)
    path = tmp_path / "retry.h5"
    agent.start(path, 3)
    status = agent.wait()
    assert status.state == WriterState.FAILED and "MemoryError" in status.error
    assert not path.exists()  # the retry below is not refused as "already exists"
    write_run(agent, path, [1], run_id=2)
    assert agent.wait(run_id=2).state == WriterState.FINISHED


def test_rows_without_a_write_read_as_not_written_also_in_a_file_caught_mid_write(write_path, writer_rig, tmp_path):
    agent, _ = writer_rig(writer={"flush_interval_s": 0.05})
    path = tmp_path / "gaps.h5"
    agent.start(path, 6)
    agent.wait((WriterState.WRITING,))
    for i in (0, 2):  # row 1 never gets a write
        meta, _ = agent.produce(i + 1)
        agent.write(i, meta, 6)
    time.sleep(0.5)  # a flush happens
    snapshot = tmp_path / "snapshot.h5"  # what a crash right now would leave
    snapshot.write_bytes(path.read_bytes())
    agent.stop(3, 6)
    assert agent.wait().state == WriterState.FINISHED
    det = agent.config.detector_name
    with h5py.File(snapshot, "r") as f:
        assert f.attrs["state"] == "writing"
        assert list(f[f"{det}/status"][:]) == [0, STATUS_NOT_WRITTEN, 0] + [STATUS_NOT_WRITTEN] * 3
    with h5py.File(path, "r") as f:  # trimmed after the last row written; the gap stays marked
        assert list(f[f"{det}/status"][:]) == [0, STATUS_NOT_WRITTEN, 0]
        assert list(f[f"{det}/image_id"][:]) == [1, 0, 3]
        assert not f["entry/data/data"][1].any()


@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_slots_that_are_not_an_image_of_the_file_are_rejected_never_written(write_path, writer_rig, tmp_path,
                                                                            compression):
    agent, writer = writer_rig(writer={"compression": compression})
    h, w = agent.config.image_shape
    path = tmp_path / "bad.h5"
    agent.start(path, 5)
    agent.wait((WriterState.WRITING,))
    good, pixels = agent.produce(1)
    metas = [
        good,
        agent.produce(2, height=h // 2)[0],                         # another shape
        agent.produce(3, dtype=4)[0],                               # uint32, the file holds uint16
        agent.produce_bytes(4, b"\x00" * 64, encoding=Encoding.BITSHUFFLE_LZ4, user_2=64),  # bad chunk header
        agent.produce(5, encoding=Encoding.BITSHUFFLE_LZ4, user_2=h * w * 2)[0],  # pixels labelled compressed
    ]
    for i, meta in enumerate(metas):
        agent.write(i, meta, 5)
    agent.stop(5, 5)
    final = agent.wait()
    assert (final.n_written, final.n_missing) == (1, 4)
    assert writer.counters.images_rejected == 4
    with h5py.File(path, "r") as f:
        assert list(f[f"{agent.config.detector_name}/status"][:]) == [0] + [STATUS_REJECTED] * 4
        data = f["entry/data/data"]
        assert np.array_equal(data[0], pixels)
        assert not data[1:].any()


def test_a_slot_holding_a_bitshuffle_chunk_is_written_as_it_is(writer_rig, tmp_path):
    agent, _ = writer_rig(writer={"compression": "bitshuffle-lz4"})
    h, w = agent.config.image_shape
    _, pixels = agent.produce(7)
    codec = Bitshuffle(2, h * w)
    out = codec.new_buffer()
    chunk = out[:codec.compress(pixels.reshape(-1).view(np.uint8), out)].tobytes()
    path = tmp_path / "precompressed.h5"
    agent.start(path, 1)
    agent.wait((WriterState.WRITING,))
    meta = agent.produce_bytes(7, chunk, encoding=Encoding.BITSHUFFLE_LZ4, user_2=len(chunk))
    agent.write(0, meta, 1)
    agent.stop(1, 1)
    assert agent.wait().n_written == 1
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["entry/data/data"][0], pixels)
        assert f["entry/data/data"].id.read_direct_chunk((0, 0, 0))[1] == chunk


def test_our_bitshuffle_chunks_are_byte_for_byte_what_the_hdf5_filter_writes(tmp_path):
    rng = np.random.default_rng(3)
    pixels = (rng.poisson(2.0, (256, 512)) + 1000).astype(np.uint16)
    codec = Bitshuffle(2, pixels.size)
    out = codec.new_buffer()
    ours = out[:codec.compress(pixels.reshape(-1).view(np.uint8), out)].tobytes()
    with h5py.File(tmp_path / "filter.h5", "w") as f:
        dset = f.create_dataset("d", shape=(1, 256, 512), dtype=np.uint16, chunks=(1, 256, 512),
                                **hdf5plugin.Bitshuffle(cname="lz4"))
        dset[0] = pixels
        assert dset.id.read_direct_chunk((0, 0, 0))[1] == ours


@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_an_image_overwritten_while_it_is_written_is_erased_and_recorded_as_lost(
        write_path, writer_rig, tmp_path, monkeypatch, compression):
    agent, _ = writer_rig(writer={"compression": compression})
    slots = agent.config.image_buffer_slots
    def overwriting_after(real_write):
        def write_then_overwrite(self, i, chunk):
            real_write(self, i, chunk)
            if i == 1:  # the producer laps the ring right after the chunk of image 2 reached the file
                agent.produce(2 + slots)
        return write_then_overwrite

    # Uncompressed rows go out through write_preallocated, compressed ones through write_chunk.
    for name in ("write_chunk", "write_preallocated"):
        monkeypatch.setattr(h5file.OutputFile, name, overwriting_after(getattr(h5file.OutputFile, name)))
    path = tmp_path / "torn.h5"
    agent.start(path, 3)
    agent.wait((WriterState.WRITING,))
    metas = [agent.produce(image_id)[0] for image_id in (1, 2, 3)]
    for i, meta in enumerate(metas):
        agent.write(i, meta, 3)
    agent.stop(3, 3)
    final = agent.wait()
    with h5py.File(path, "r") as f:
        status = list(f[f"{agent.config.detector_name}/status"][:])
        data = f["entry/data/data"][:]
    if compression == "none":  # written from the slot, found overwritten after: erased
        assert status == [0, STATUS_LOST, 0] and (final.n_written, final.n_missing) == (2, 1)
        assert not data[1].any()
    else:  # compressed before the write, so the check after compressing passed: the image is good
        assert status == [0, 0, 0]
        assert np.array_equal(data[1], agent.produce(2)[1])


def test_overwrite_replaces_an_existing_file_instead_of_truncating_it(writer_rig, tmp_path):
    agent, _ = writer_rig(overwrite_files=True)
    path = tmp_path / "again.h5"
    path.write_bytes(b"old contents")
    old_inode = path.stat().st_ino
    with open(path, "rb") as reader:  # a reader holding the old file keeps it
        write_run(agent, path, [1])
        assert agent.wait().state == WriterState.FINISHED
        assert reader.read() == b"old contents"
    assert path.stat().st_ino != old_inode
    with h5py.File(path, "r") as f:
        assert f["entry/data/data"].shape[0] == 1


def _user_other_than_root():
    for name in ("nobody", "daemon"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    return None


def test_a_writer_not_running_as_root_refuses_a_request_for_another_user(make_config, detector_name):
    """The writer runs in a forked child that drops to an unprivileged user (the interpreter may live
    where that user cannot exec it, so no new program is started)."""
    user = _user_other_than_root()
    if user is None:
        pytest.skip("no unprivileged user on this host")
    if os.geteuid() != 0:
        user = pwd.getpwuid(os.geteuid())  # we are the unprivileged one already
    shared = tempfile.mkdtemp(prefix="std-daq-h5w-")
    try:
        os.chmod(shared, 0o1777)
        # The segments are the test's (root's, mode 0660: shm_mode refuses access for others); the child
        # keeps the test's group to reach them, with the user's uid.
        path, config = make_config(output_dirs=[shared], ipc_dir=shared, shm_mode="0660")
        old_umask = os.umask(0)  # the agent's socket files must be connectable by the child's user
        try:
            agent = Agent(config)
        finally:
            os.umask(old_umask)
        other_uid = next(u.pw_uid for u in pwd.getpwall() if u.pw_uid not in (0, user.pw_uid))
        # A fresh interpreter (forking this multi-threaded test process could deadlock the child on a lock
        # another thread held), started as root so it can load its modules, then dropping to the user.
        child_code = textwrap.dedent(f"""
            import os, sys, time, zmq
            from core_buffer.config import load_config
            from std_h5_writer.writer import H5Writer
            config = load_config({str(path)!r})
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid({os.getegid()})
                os.setuid({user.pw_uid})
            writer = H5Writer(config, zmq.Context())
            deadline = time.monotonic() + 60
            while writer.counters.files_finished < 1 and time.monotonic() < deadline:
                writer.poll(0.05)
            writer.stop()
            writer.close()
        """)
        child = subprocess.Popen([sys.executable, "-c", child_code], cwd=os.getcwd())
        try:
            agent.start(os.path.join(shared, "theirs.h5"), 1, run_id=1, user_id=other_uid)
            refused = agent.wait(run_id=1, timeout_s=20)
            assert refused.state == WriterState.FAILED
            assert f"cannot create files for uid {other_uid}" in refused.error
            assert not os.path.exists(os.path.join(shared, "theirs.h5"))
            own = os.path.join(shared, "own.h5")  # its own uid is fine
            agent.start(own, 1, run_id=2, user_id=user.pw_uid)
            agent.wait((WriterState.WRITING,), run_id=2, timeout_s=20)
            meta, _ = agent.produce(1)
            agent.write(0, meta, 1, run_id=2)
            agent.stop(1, 1, run_id=2)
            assert agent.wait(run_id=2, timeout_s=20).state == WriterState.FINISHED
            assert os.stat(own).st_uid == user.pw_uid
        finally:
            returncode = child.wait(timeout=90)
            agent.close()
        assert returncode == 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_python_dash_m_runs_the_writer_cli():
    result = subprocess.run([sys.executable, "-m", "std_h5_writer", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "std_h5_writer" in result.stdout


@pytest.mark.parametrize("threads", [1, 2])
def test_an_image_overwritten_while_it_is_compressed_is_recorded_as_lost(writer_rig, tmp_path, monkeypatch, threads):
    agent, writer = writer_rig(writer={"compression": "bitshuffle-lz4", "compression_threads": threads})
    slots = agent.config.image_buffer_slots
    real_compress = Bitshuffle.compress

    def compress_then_overwrite(self, pixels, out):
        n = real_compress(self, pixels, out)
        if pixels[:16].tobytes() == lapped_pixels:  # image 2's bytes: the producer laps the ring now
            agent.produce(2 + slots)
        return n

    monkeypatch.setattr(Bitshuffle, "compress", compress_then_overwrite)
    path = tmp_path / "lapped.h5"
    agent.start(path, 3)
    agent.wait((WriterState.WRITING,))
    metas, pixels = zip(*(agent.produce(image_id) for image_id in (1, 2, 3)))
    lapped_pixels = pixels[1].reshape(-1).view(np.uint8)[:16].tobytes()
    for i, meta in enumerate(metas):
        agent.write(i, meta, 3)
    agent.stop(3, 3)
    final = agent.wait()
    assert (final.n_written, final.n_missing) == (2, 1)
    with h5py.File(path, "r") as f:
        assert list(f[f"{agent.config.detector_name}/status"][:]) == [0, STATUS_LOST, 0]
        data = f["entry/data/data"][:]
    assert np.array_equal(data[0], pixels[0]) and np.array_equal(data[2], pixels[2]) and not data[1].any()


# --- a writer killed with a file open (kill -9) -------------------------------------------------------

def _start_writer_process(path_cfg, log_path):
    with open(log_path, "a") as log_file:
        return subprocess.Popen(["std_h5_writer", str(path_cfg)], stdout=log_file, stderr=subprocess.STDOUT)


def _stop_writer_process(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rows_a_crash_would_leave(path, copy):
    """Rows accounted for in what a crash right now would leave (a copy of the file as it is on disk);
    0 while the copy caught a flush halfway."""
    shutil.copyfile(path, copy)
    try:
        with h5py.File(copy, "r") as f:
            return int((f["entry/instrument/detector/status"][:] != STATUS_NOT_WRITTEN).sum())
    except OSError:
        return 0


def _kill_9_mid_run(agent, path_cfg, log_path, out, tmp_path, n_images):
    """A writer process that writes 6 images of a run of `n_images`, is seen to have flushed them, gets 3
    more, and is killed -9 at once. Returns the pixels sent, by row."""
    proc = _start_writer_process(path_cfg, log_path)
    try:
        agent.start(out, n_images)
        agent.wait((WriterState.WRITING,), timeout_s=30)
        sent = []
        for i in range(6):
            meta, pixels = agent.produce(i + 1)
            sent.append(pixels)
            agent.write(i, meta, n_images)
        deadline = time.monotonic() + 20
        while _rows_a_crash_would_leave(out, tmp_path / "copy.h5") < 6:
            assert time.monotonic() < deadline, "the writer never flushed the first 6 images"
            time.sleep(0.02)
        for i in range(6, 9):  # flushed or not by the time the kill lands: either way the file says which
            meta, pixels = agent.produce(i + 1)
            sent.append(pixels)
            agent.write(i, meta, n_images)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
    finally:
        _stop_writer_process(proc)
    with h5py.File(out, "r") as f:
        assert f.attrs["state"] == "writing"  # what the kill left
    return sent


# Uncompressed, the chunks are preallocated and written with pwrite (HDF5's metadata changes only at a
# flush); compressed, each chunk goes through H5Dwrite_chunk (the chunk index changes with every image).
# With a bounded page cache of 1 MiB windows, windows are written back and dropped before the kill.
@pytest.mark.parametrize("page_cache", ["bounded", "kernel"])
@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_a_file_left_open_by_a_killed_writer_is_marked_interrupted_by_the_next_writer_up_to_its_last_flush(
        make_config, tmp_path, compression, page_cache):
    path_cfg, config = make_config(output_dirs=[str(tmp_path)], writer={
        "flush_interval_s": 0.05, "status_interval_s": 0.05, "compression": compression,
        "page_cache": page_cache, "page_cache_window_mib": 1})
    agent = Agent(config)
    log_path = tmp_path / "writer.log"
    out = tmp_path / "killed.h5"
    try:
        sent = _kill_9_mid_run(agent, path_cfg, log_path, out, tmp_path, n_images=20)
        proc = _start_writer_process(path_cfg, log_path)
        try:
            final = agent.wait(run_id=1, timeout_s=30)  # the status the dead writer owed
            assert final.state == WriterState.FAILED
            assert f"marked {out} interrupted: {final.n_written} images readable" in final.error, final.error
            assert 6 <= final.n_written <= 9 and final.n_missing == 0
            assert final.details["file_state"] == "interrupted" and final.details["request_id"] == "r-1"
            write_run(agent, tmp_path / "next.h5", [42], run_id=2)  # and the restarted writer serves on
            assert agent.wait(run_id=2, timeout_s=30).state == WriterState.FINISHED
        finally:
            _stop_writer_process(proc)
    finally:
        agent.close()
    det = config.detector_name
    with h5py.File(out, "r") as f:
        n = final.n_written
        assert f.attrs["state"] == "interrupted" and "died with the file open" in f.attrs["interruption"]
        assert (f.attrs["n_images_written"], f.attrs["n_images_lost"], f.attrs["n_images_rejected"]) == (n, 0, 0)
        assert f["entry/data/data"].shape[0] == n  # trimmed to the rows its last flush accounted for
        assert list(f[f"{det}/image_id"][:]) == list(range(1, n + 1)) and not f[f"{det}/status"][:].any()
        for row in range(n):
            assert np.array_equal(f["entry/data/data"][row], sent[row]), row
        assert f["entry/end_time"][()].decode() == f.attrs["end_time"]
    log_text = log_path.read_text()
    assert f"to {out}: marked it interrupted, {n} images readable" in log_text
    assert not os.path.exists(open_files.record_directory(config))  # no record left, nor its directory


def test_a_file_left_open_that_hdf5_cannot_open_is_reported_by_path_and_the_writer_serves_on(make_config,
                                                                                            tmp_path):
    path_cfg, config = make_config(output_dirs=[str(tmp_path)],
                                   writer={"flush_interval_s": 0.05, "status_interval_s": 0.05})
    agent = Agent(config)
    log_path = tmp_path / "writer.log"
    out = tmp_path / "broken.h5"
    try:
        _kill_9_mid_run(agent, path_cfg, log_path, out, tmp_path, n_images=20)
        with open(out, "r+b") as f:  # as if killed halfway through writing its metadata: the superblock only
            f.truncate(96)
        proc = _start_writer_process(path_cfg, log_path)
        try:
            final = agent.wait(run_id=1, timeout_s=30)
            assert final.state == WriterState.FAILED and f"{out} cannot be marked interrupted" in final.error
            write_run(agent, tmp_path / "next.h5", [42], run_id=2)
            assert agent.wait(run_id=2, timeout_s=30).state == WriterState.FINISHED
        finally:
            _stop_writer_process(proc)
    finally:
        agent.close()
    assert f"{out} cannot be marked interrupted" in log_path.read_text()
    assert not os.path.exists(open_files.record_directory(config))  # reported once, not tried at every start


def test_the_open_file_is_recorded_while_it_is_written_and_a_second_writer_of_the_detector_refuses_to_start(
        writer_rig, tmp_path):
    agent, writer = writer_rig()
    records = open_files.record_directory(agent.config)
    agent.start(tmp_path / "open.h5", 2)
    agent.wait((WriterState.WRITING,))
    (record,) = [name for name in os.listdir(records) if name.endswith(open_files.RECORD_SUFFIX)]
    with open(os.path.join(records, record)) as f:
        assert json.load(f)["output_file"] == str(tmp_path / "open.h5")
    assert stat.S_IMODE(os.stat(records).st_mode) == 0o700
    with pytest.raises(open_files.WriterRunningError, match="another std_h5_writer of this detector is running"):
        H5Writer(agent.config)
    meta, _ = agent.produce(1)
    agent.write(0, meta, 2)
    agent.stop(1, 2)
    assert agent.wait().state == WriterState.FINISHED
    assert os.listdir(records) == []


# --- the slot holds the very image it was asked for, not just its id (issue 20, 2) ---------------------

def _filled(agent, image_id, value, sequence):
    """A slot holding an image of `value` everywhere, published with sequence number `sequence` (user_1)."""
    pixels = np.full(agent.config.image_shape, value, agent.config.image_dtype)
    return agent.produce_bytes(image_id, pixels.tobytes(), user_1=sequence)


def _compression_unavailable(*args):
    raise writer_module.CompressionUnavailable("switched off by the test")


SLOT_READERS = ["batched", "one by one", "compressed, 1 thread", "compressed, 2 threads", "hdf5 filter"]


def _rig_reading_slots_by(reader, writer_rig, monkeypatch):
    """A writer that takes its images from the slots by `reader`: the uncompressed batch (vectorised) or
    one-by-one path, in-process compression inline or in the pool, or HDF5's filter (the bitshuffle
    library switched off, as when it cannot be loaded). 16 slots: a run of 10 and one more image fit."""
    writer = {}
    if reader in ("batched", "one by one"):
        monkeypatch.setattr(writer_module, "VECTOR_MIN_WRITES", 1 if reader == "batched" else 10**9)
    elif reader == "hdf5 filter":
        monkeypatch.setattr(writer_module, "Bitshuffle", _compression_unavailable)
        writer = {"compression": "bitshuffle-lz4"}
    else:
        writer = {"compression": "bitshuffle-lz4", "compression_threads": int(reader.split()[1])}
    agent, h5writer = writer_rig(image_buffer_slots=16, writer=writer)
    assert (h5writer.compressor is None) == (reader != "compressed, 1 thread" and reader != "compressed, 2 threads")
    return agent, h5writer


# Acquisition A's images 1..10 (image 5 holds 111 everywhere, the others their id), published with sequence
# numbers 1001..1010; acquisition B numbered from 1 again, and its image 5 (222 everywhere, its own sequence
# number 3) lands in the same slot.
A_SEQUENCE = 1000
B_IMAGE_5 = dict(image_id=5, value=222, sequence=3)


def _a_value(image_id):
    return 111 if image_id == 5 else image_id


def _check_row_5_lost(agent, writer, path):
    final = agent.wait()
    assert (final.n_written, final.n_missing) == (9, 1), final
    assert writer.counters.images_lost == 1
    with h5py.File(path, "r") as f:
        status = list(f[f"{agent.config.detector_name}/status"][:])
        data = f["entry/data/data"][:]
    assert status == [0] * 4 + [STATUS_LOST] + [0] * 5
    assert not data[4].any()  # zeros: never B's 222
    for row in (0, 1, 2, 3, 5, 6, 7, 8, 9):
        assert (data[row] == _a_value(row + 1)).all(), row


@pytest.mark.parametrize("reader", SLOT_READERS)
def test_an_image_of_another_acquisition_with_the_same_id_is_recorded_as_lost_never_written(
        writer_rig, tmp_path, monkeypatch, reader):
    agent, writer = _rig_reading_slots_by(reader, writer_rig, monkeypatch)
    path = tmp_path / "aba.h5"
    agent.start(path, 10)
    agent.wait((WriterState.WRITING,))
    metas = [_filled(agent, image_id, _a_value(image_id), A_SEQUENCE + image_id) for image_id in range(1, 11)]
    _filled(agent, **B_IMAGE_5)  # before the writer reaches A's image 5
    for i, meta in enumerate(metas):
        agent.write(i, meta, 10)
    agent.stop(10, 10)
    _check_row_5_lost(agent, writer, path)


@pytest.mark.parametrize("reader", SLOT_READERS[:4])
def test_an_image_of_another_acquisition_committed_with_the_same_id_while_the_image_is_read_is_lost(
        writer_rig, tmp_path, monkeypatch, reader):
    """The check before the read passed (A's image 5 was there); B's image 5 is written into the slot and
    committed while the writer reads it, so what it read is B's: the check after the read must see that
    the slot's sequence number is no longer A's, although the id is the same."""
    agent, writer = _rig_reading_slots_by(reader, writer_rig, monkeypatch)
    committed = []

    def commit_b_first(image_5):
        if image_5 and not committed:
            committed.append(_filled(agent, **B_IMAGE_5))

    if reader in ("batched", "one by one"):  # the pixels go out from the slot by pwrite: B's, right before
        real_write = h5file.OutputFile.write_preallocated

        def write(self, i, view):
            commit_b_first(i == 4)
            real_write(self, i, view)

        monkeypatch.setattr(h5file.OutputFile, "write_preallocated", write)
    else:  # compressed from the slot, in the pool with 2 threads
        real_compress = Bitshuffle.compress

        def compress(self, pixels, out):
            commit_b_first(int(pixels[:2].view(np.uint16)[0]) == 111)
            return real_compress(self, pixels, out)

        monkeypatch.setattr(Bitshuffle, "compress", compress)
    path = tmp_path / "aba-during.h5"
    agent.start(path, 10)
    agent.wait((WriterState.WRITING,))
    metas = [_filled(agent, image_id, _a_value(image_id), A_SEQUENCE + image_id) for image_id in range(1, 11)]
    for i, meta in enumerate(metas):
        agent.write(i, meta, 10)
    agent.stop(10, 10)
    _check_row_5_lost(agent, writer, path)
    assert committed  # B's image did go into the slot during the read


# --- statuses on time whatever the backlog (issue 20, 4) ---------------------------------------------------

@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_a_slow_writer_with_a_backlog_of_1500_writes_sends_its_statuses_on_time_and_completes(
        writer_rig, tmp_path, monkeypatch, compression):
    """Every image write takes 3 ms more (a slow disk, made by wrapping the file's write functions) and
    1500 writes are queued before the first is done: ~4.5 s of work, in which the status may not wait for
    the backlog (a writer silent for writer_timeout_s is taken for dead by writer_agent), nor for a batch
    of queued writes (256 take 0.8 s here)."""
    interval = 0.2
    # Small images (Gigafrost 96x192, 36 KiB): the test is about time, not bytes.
    agent, writer = writer_rig(detector_type="gigafrost", n_modules=8, bit_depth=12, image_pixel_height=96,
                               image_pixel_width=192, image_buffer_slots=16,
                               writer={"compression": compression, "status_interval_s": interval})
    for name in ("write_chunk", "write_preallocated"):
        real = getattr(h5file.OutputFile, name)

        def slow(self, i, chunk, real=real):
            time.sleep(0.003)
            real(self, i, chunk)

        monkeypatch.setattr(h5file.OutputFile, name, slow)
    n = 1500
    metas = [_filled(agent, image_id, image_id, image_id) for image_id in range(1, 17)]
    path = tmp_path / "backlog.h5"
    agent.start(path, n)  # start, the writes and the stop all queued at once: the backlog
    for i in range(n):
        agent.write(i, metas[i % 16], n)
    agent.stop(n, n)
    statuses = []
    while not statuses or statuses[-1].state == WriterState.WRITING:
        statuses.append(agent.wait((WriterState.WRITING, WriterState.FINISHED, WriterState.FAILED), timeout_s=30))
    final = statuses[-1]
    assert final.state == WriterState.FINISHED and final.n_written == n and final.n_missing == 0, final
    # When each status was made, by the writer's own clock (so the test thread's scheduling does not count).
    sent = [s.details["duration_s"] for s in statuses]
    gaps = np.diff(sent)
    print(f"{len(statuses)} statuses over {sent[-1]:.2f} s, largest gap {gaps.max():.3f} s")
    assert sent[-1] > 4 * interval  # the backlog did take a while
    assert gaps.max() < 3 * interval, list(zip(sent, [s.n_written for s in statuses]))
    assert [s.n_written for s in statuses] == sorted(s.n_written for s in statuses)
    with h5py.File(path, "r") as f:
        assert not f[f"{agent.config.detector_name}/status"][:].any()
        data = f["entry/data/data"]
        for row in (0, 17, 777, n - 1):
            assert (data[row] == row % 16 + 1).all(), row


# --- a failed start removes its own file, not one elsewhere (issue 20, 5) ----------------------------------

def test_a_start_that_fails_after_a_directory_on_the_path_was_swapped_for_a_symlink_removes_its_own_file_only(
        writer_rig, tmp_path, monkeypatch):
    """The file is made in a directory pinned by its descriptor; the layout then fails (as a first flush
    past the file size limit does) right after `sub` was renamed and a symlink to another directory put
    in its place. The clean-up must remove the half-made file in the renamed directory, not follow the
    link by path and remove a file of the same name there."""
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    (allowed / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "run.h5").write_bytes(b"someone else's file")
    agent, _ = writer_rig(output_dirs=[str(allowed)])
    real_layout = h5file.OutputFile._layout
    calls = []

    def layout_then_swap_and_fail(self, *args):
        real_layout(self, *args)
        calls.append(1)
        if len(calls) == 1:
            os.rename(allowed / "sub", allowed / "sub.moved")
            os.symlink(elsewhere, allowed / "sub")
            raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(h5file.OutputFile, "_layout", layout_then_swap_and_fail)
    agent.start(allowed / "sub" / "run.h5", 3)
    status = agent.wait()
    assert status.state == WriterState.FAILED and "File too large" in status.error, status.error
    assert (elsewhere / "run.h5").read_bytes() == b"someone else's file"
    assert os.listdir(allowed / "sub.moved") == []  # its own half-made file is gone
    write_run(agent, allowed / "next.h5", [1], run_id=2)  # and the writer serves on
    assert agent.wait(run_id=2).state == WriterState.FINISHED
