"""Storage that fails under a running pipeline: a full disk, a read-only directory, a directory removed
during a write. Each ends the request with request_fail naming the problem, and the next write succeeds.

The full disk and the read-only directory are real mounts (a small tmpfs, a read-only bind mount), so
these tests need root (CI runs as root); without it they are skipped with the reason, and under CI (the
environment variable CI set) they fail instead: there a check that cannot run is a broken CI, not a pass."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import h5py
import pytest

from tests.conftest import skip_or_fail

pytestmark = pytest.mark.broker


@pytest.fixture
def root():
    """Root, which mounting needs."""
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs or a read-only bind needs root")


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def mounted(tmp_path):
    """mount(kind, dir): a small tmpfs ("tmpfs"), a small ext4 on a loop device ("ext4": a file system that
    writes its pages back to a disk, where std_h5_writer's page cache can be bounded; a tmpfs keeps them,
    and the writer falls back to kernel mode) or a read-only bind ("ro") at dir, unmounted afterwards."""
    mounts = []

    def make(kind: str, directory) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if kind == "tmpfs":
            mount("-t", "tmpfs", "-o", "size=6m,mode=0777", "tmpfs", str(directory))
        elif kind == "ext4":
            if shutil.which("mkfs.ext4") is None:
                skip_or_fail("mkfs.ext4 is not installed")
            image = tmp_path / f"{directory.name}.ext4"
            with open(image, "wb") as f:
                f.truncate(10 << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True,
                           capture_output=True, timeout=30)
            mount("-o", "loop", str(image), str(directory))  # the loop device goes with the umount
        else:
            mount("--bind", str(directory), str(directory))
            mounts.append(directory)
            mount("-o", "remount,bind,ro", str(directory))
            return
        mounts.append(directory)

    yield make
    for directory in reversed(mounts):
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30)


def write(client, config, path, n):
    return client.send_write(config.detector_name, {"output_file": str(path), "n_images": n})


def then_a_good_write_succeeds(client, config, pipe, tmp_path):
    outcome = client.wait(write(client, config, tmp_path / "out" / "after.h5", 10), timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    with h5py.File(tmp_path / "out" / "after.h5", "r") as f:
        assert f["entry/data/data"].shape[0] == 10


def a_write_into(directory, n_images, pipeline_config, pipelines, client, tmp_path, expect: str,
                 writer: dict | None = None) -> None:
    """A pipeline (its writer configured with `writer`) writes n_images into `directory`: the request fails
    with `expect` in its reason, and the next write elsewhere succeeds."""
    path, config = pipeline_config(writer=writer or {})
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "50", "--n-images", "forever")
    outcome = client.wait(write(client, config, directory / "x.h5", n_images), timeout_s=60)
    assert outcome.final_action == "request_fail", outcome
    assert expect in outcome.message, outcome.message
    then_a_good_write_succeeds(client, config, pipe, tmp_path)


# With std_h5_writer's page cache bounded (1 MiB windows, so windows are dropped before the disk is full) or
# left to the kernel; on a tmpfs the bounded one falls back to kernel mode for the file.
@pytest.mark.parametrize("page_cache", ["bounded", "kernel"])
@pytest.mark.parametrize("file_system", ["tmpfs", "ext4"])
def test_a_full_disk_fails_the_request_with_the_error_and_the_next_write_succeeds(
        root, pipeline_config, pipelines, client, tmp_path, mounted, file_system, page_cache):
    small = tmp_path / "out" / "small"
    mounted(file_system, small)  # 6 MiB of tmpfs, 10 MiB of ext4: room for a few 1 MiB images
    a_write_into(small, 40, pipeline_config, pipelines, client, tmp_path, expect="No space left on device",
                 writer={"page_cache": page_cache, "page_cache_window_mib": 1})


def test_a_read_only_directory_fails_the_request_with_the_error(root, pipeline_config, pipelines, client,
                                                                  tmp_path, mounted):
    read_only = tmp_path / "out" / "ro"
    mounted("ro", read_only)
    a_write_into(read_only, 5, pipeline_config, pipelines, client, tmp_path, expect="Read-only file system")
    assert not (read_only / "x.h5").exists()


def test_a_directory_removed_during_the_write_fails_the_request_saying_so(pipeline_config, pipelines, client,
                                                                           tmp_path):
    doomed = tmp_path / "out" / "doomed"
    doomed.mkdir(parents=True)
    path, config = pipeline_config(writer={"flush_interval_s": 0.2, "status_interval_s": 0.2})
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "50", "--n-images", "forever")
    request_id = write(client, config, doomed / "gone.h5", 150)
    client.wait(request_id, timeout_s=30, until="request_progress")
    shutil.rmtree(doomed)
    time.sleep(0.5)
    outcome = client.wait(request_id, timeout_s=60)
    assert outcome.final_action == "request_fail", outcome
    assert "removed" in outcome.message, outcome.message
    then_a_good_write_succeeds(client, config, pipe, tmp_path)
