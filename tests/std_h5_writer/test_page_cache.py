"""The page cache an output file takes (writer.page_cache, std_h5_writer/page_cache.py) and where the chunks
lie in the file: real writers, real ZMQ, real HDF5 files on a real file system (tmp_path), and real mounts
for the file systems that keep their pages (a tmpfs, as root)."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import threading
import time

import h5py
import hdf5plugin  # noqa: F401 - registers bitshuffle for reading
import numpy as np
import pytest

from core_buffer.formats import Dtype, ImageMetadata, WriterState
from core_buffer.service import run
from std_h5_writer import h5file
from std_h5_writer.page_cache import BoundedPageCache, cached_bytes
from std_h5_writer.writer import H5Writer
from tests.conftest import skip_or_fail
from tests.std_h5_writer.agent import Agent

MIB = 1 << 20

# The paths a chunk takes to the file: preallocated and written with pwrite (uncompressed runs up to
# writer.preallocate_max_images), placed by HDF5 with H5Dwrite_chunk (longer uncompressed runs), compressed.
PATHS = {
    "uncompressed preallocated": {"compression": "none"},
    "uncompressed H5Dwrite_chunk": {"compression": "none", "preallocate_max_images": 0},
    "bitshuffle-lz4": {"compression": "bitshuffle-lz4"},
}


def file_system_type(path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def disk_tmp_path(tmp_path):
    """tmp_path, on a file system that writes its pages to a disk (where the page cache can be bounded)."""
    kind = file_system_type(tmp_path)
    if kind in ("tmpfs", "ramfs"):
        skip_or_fail(f"tmp_path is on {kind}, whose pages are the file: bounding its page cache is moot")
    return tmp_path


def produce_random(agent, image_id, rng):
    """A slot holding an image of the config's shape and dtype with random bytes (incompressible, so a
    compressed chunk is as big as the image); its metadata committed. Returns (meta, bytes)."""
    config = agent.config
    data = rng.integers(0, 256, config.image_bytes, dtype=np.uint8)
    agent.images.begin_image(image_id)[:config.image_bytes] = data
    h, w = config.image_shape
    meta = ImageMetadata(image_id, h, w, dtype=int(Dtype.from_numpy(np.dtype(config.image_dtype))))
    agent.images.commit_image(meta)
    return meta, data


def write_random_run(agent, path, n_images, run_id=1):
    """A run of n_images random images (produced first: the ring must hold them all); the bytes sent."""
    rng = np.random.default_rng(7)
    sent = [produce_random(agent, i + 1, rng) for i in range(n_images)]
    agent.start(path, n_images, run_id)
    assert agent.wait((WriterState.WRITING,)).run_id == run_id
    for i, (meta, _) in enumerate(sent):
        agent.write(i, meta, n_images, run_id)
    agent.stop(n_images, n_images, run_id)
    return [data for _, data in sent]


@contextlib.contextmanager
def writer_running(config):
    """An in-process writer for `config` until the block ends (stopped and closed then, so another writer
    of the same detector can start)."""
    writer = H5Writer(config)
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(writer, stop), daemon=True)
    thread.start()
    try:
        yield writer
    finally:
        stop.set()
        thread.join(timeout=20)
        assert not thread.is_alive()


# --- the same file, whatever the page cache ---------------------------------------------------------------

@pytest.mark.parametrize("path_name", list(PATHS))
def test_the_file_is_the_same_bytes_with_a_bounded_or_a_kernel_page_cache(make_config, disk_tmp_path, monkeypatch,
                                                                          path_name):
    # The file's times are pinned (they are what differs between two runs), and flushes happen only at
    # creation and close (a flush between images changes where HDF5 puts later metadata, with either mode).
    monkeypatch.setattr(h5file, "local_time", lambda t=None: "2026-12-08T00:00:00+0100")
    out = disk_tmp_path / "run.h5"
    files, finals = {}, {}
    agent = None
    try:
        for mode in ("bounded", "kernel"):
            _, config = make_config(output_dirs=[str(disk_tmp_path)], image_buffer_slots=32, writer={
                **PATHS[path_name], "page_cache": mode, "page_cache_window_mib": 1, "flush_interval_s": 3600})
            agent = agent or Agent(config)
            with writer_running(config):
                write_random_run(agent, out, 24)
                finals[mode] = agent.wait()
            files[mode] = out.read_bytes()
            out.unlink()
    finally:
        if agent is not None:
            agent.close()
    assert finals["bounded"].state == finals["kernel"].state == WriterState.FINISHED
    assert finals["bounded"].details["page_cache"] == "bounded"  # not a fallback: the windows were used
    assert finals["kernel"].details["page_cache"] == "kernel"
    assert len(files["bounded"]) > 24 * MIB // (2 if "lz4" in path_name else 1)
    assert files["bounded"] == files["kernel"]


# --- the page cache stays bounded -------------------------------------------------------------------------

class CacheWatcher:
    """Samples how much of a file is in the page cache (mincore), from its creation until stopped."""

    def __init__(self, path):
        self.path, self.peak, self.samples = path, 0, 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        fd = -1
        try:
            while not self.stopping.is_set():
                if fd < 0:
                    try:
                        fd = os.open(self.path, os.O_RDONLY)
                    except FileNotFoundError:
                        time.sleep(0.001)
                        continue
                self.peak = max(self.peak, cached_bytes(fd))
                self.samples += 1
                time.sleep(0.0005)
        finally:
            if fd >= 0:
                os.close(fd)

    def stop(self):
        self.stopping.set()
        self.thread.join(timeout=10)


@pytest.mark.parametrize("path_name", list(PATHS))
def test_a_bounded_page_cache_keeps_the_files_cached_pages_within_three_windows_and_drops_them_at_close(
        writer_rig, disk_tmp_path, path_name):
    window_mib, n_images = 2, 160
    agent, _ = writer_rig(output_dirs=[str(disk_tmp_path)], image_buffer_slots=n_images,
                          writer={**PATHS[path_name], "page_cache_window_mib": window_mib})
    out = disk_tmp_path / "long.h5"
    watcher = CacheWatcher(out)
    try:
        write_random_run(agent, out, n_images)
        final = agent.wait(timeout_s=60)
    finally:
        watcher.stop()
    assert final.state == WriterState.FINISHED and final.n_written == n_images
    assert final.details["page_cache"] == "bounded"
    assert watcher.samples > 10
    # Two windows (the one written back, the one being written) and the MiB whose writeback is not started
    # yet, with a window to spare for HDF5's metadata and the sampling.
    print(f"\n{path_name}: at most {watcher.peak / MIB:.1f} MiB of {n_images} MiB cached "
          f"({watcher.samples} samples), window {window_mib} MiB")
    assert watcher.peak <= (3 * window_mib + 1) * MIB, watcher.peak / MIB
    fd = os.open(out, os.O_RDONLY)
    try:
        assert cached_bytes(fd) <= 64 << 10  # dropped at close (before anyone reads it)
    finally:
        os.close(fd)


# --- file systems that cannot bound it --------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A 64 MiB tmpfs (needs root to mount)."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_file_system_that_keeps_its_pages_writes_that_file_in_kernel_mode_and_says_so_once(
        writer_rig, disk_tmp_path, tmpfs, caplog):
    agent, writer = writer_rig(output_dirs=[str(tmpfs), str(disk_tmp_path)], image_buffer_slots=16,
                               writer={"page_cache_window_mib": 1})
    with caplog.at_level(logging.WARNING, logger="std_h5_writer"):
        sent = write_random_run(agent, tmpfs / "in-memory.h5", 12)
        final = agent.wait()
        assert final.state == WriterState.FINISHED and final.n_written == 12
        assert final.details["page_cache"] == "kernel"
        assert "still cached after they were written back and dropped" in final.details["page_cache_fallback"]
        said = [r.getMessage() for r in caplog.records if "page cache in kernel mode" in r.getMessage()]
        assert len(said) == 1 and str(tmpfs / "in-memory.h5") in said[0], said
        write_random_run(agent, disk_tmp_path / "on-disk.h5", 12, run_id=2)  # the next file is bounded again
        following = agent.wait(run_id=2)
    assert following.state == WriterState.FINISHED and following.details["page_cache"] == "bounded"
    assert "page_cache_fallback" not in following.details
    assert writer.counters.page_cache_fallbacks == 1
    with h5py.File(tmpfs / "in-memory.h5", "r") as f:
        for row in (0, 11):
            assert f["entry/data/data"][row].tobytes() == sent[row].tobytes()


def test_a_file_that_refuses_sync_file_range_falls_back_to_kernel_mode_instead_of_failing(caplog):
    # A pipe: sync_file_range answers ESPIPE, as a file system that does not do it answers EINVAL.
    read_end, write_end = os.pipe()
    cache = BoundedPageCache(write_end, MIB, "a pipe")
    try:
        with caplog.at_level(logging.WARNING, logger="std_h5_writer"):
            for offset in range(0, 8 * MIB, MIB):
                cache.written(offset, MIB)
            cache.flushed()
            cache.finish()
        assert cache.fallback == "sync_file_range refused: Illegal seek"
        assert sum("page cache in kernel mode" in r.getMessage() for r in caplog.records) == 1
    finally:
        cache.close()
        os.close(read_end)
        os.close(write_end)


# --- chunk placement without holes ------------------------------------------------------------------------

EIGER_500K = {"detector_type": "eiger", "n_modules": 4, "image_pixel_height": 514, "image_pixel_width": 1030,
              "module_positions": {"0": [0, 0, 513, 255], "1": [516, 0, 1029, 255], "2": [0, 513, 513, 258],
                                   "3": [516, 513, 1029, 258]}}
# Every detector geometry and pixel type the project supports (core_buffer/configs and docs/detectors.md):
GEOMETRIES = {
    "jungfrau 1 module": {},
    "jungfrau 8 modules": {"n_modules": 8, "image_pixel_height": 4096},
    "jungfrau converted float32": {"conversion": "converted", "calibration_file": "/nonexistent/gains.h5"},
    "jungfrau 2 interfaces": {"n_modules": 2, "jungfrau_interfaces": 2},
    "eiger 500k 16 bit": {**EIGER_500K, "bit_depth": 16},
    "eiger 500k 8 bit": {**EIGER_500K, "bit_depth": 8},
    "eiger 500k 32 bit": {**EIGER_500K, "bit_depth": 32},
    "gigafrost 2016x2016": {"detector_type": "gigafrost", "n_modules": 8, "image_pixel_height": 2016,
                            "image_pixel_width": 2016},
    "gigafrost 480x96": {"detector_type": "gigafrost", "n_modules": 8, "image_pixel_height": 96,
                         "image_pixel_width": 480},
}


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_the_file_occupies_the_blocks_its_size_says_for_every_detector_geometry(make_config, writer_rig, tmp_path,
                                                                               geometry, path_name):
    _, probe = make_config(**GEOMETRIES[geometry])
    n_images = max(10, math.ceil(24 * MIB / probe.image_bytes))
    agent, _ = writer_rig(**GEOMETRIES[geometry], image_buffer_slots=n_images, writer=PATHS[path_name])
    out = tmp_path / "geometry.h5"
    sent = write_random_run(agent, out, n_images)
    final = agent.wait(timeout_s=60)
    assert final.state == WriterState.FINISHED and final.n_written == n_images, final
    st = os.stat(out)
    occupied = st.st_blocks * 512
    print(f"\n{geometry}, {path_name}: {n_images} images of {probe.image_bytes} bytes, {st.st_size} bytes apparent, "
          f"{occupied} occupied")
    assert abs(st.st_size - occupied) <= 0.01 * st.st_size, (st.st_size, occupied)
    with h5py.File(out, "r") as f:
        data = f["entry/data/data"]
        assert data.shape == (n_images, *probe.image_shape) and data.dtype == np.dtype(probe.image_dtype)
        for row in (0, n_images - 1):
            assert data[row].tobytes() == sent[row].tobytes()
