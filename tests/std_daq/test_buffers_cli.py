"""`std-daq buffers list|rm` against real segments, through the installed console script."""
import os
import shutil
import subprocess

import pytest

from core_buffer import FrameBuffer, ImageBuffer
from core_buffer.ringbuffer import SHM_DIR

STD_DAQ = shutil.which("std-daq")


def std_daq(*args: str) -> subprocess.CompletedProcess:
    assert STD_DAQ, "the std-daq console script is not installed (pip install -e .)"
    return subprocess.run([STD_DAQ, *args], capture_output=True, text=True, timeout=30)


def test_list_shows_each_segment_with_its_layout(make_config):
    _, config = make_config(frame_buffer_slots=4, image_buffer_slots=6)
    frames = FrameBuffer.for_config(config)
    images = ImageBuffer.for_config(config)
    result = std_daq("buffers", "list")
    assert result.returncode == 0
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "4 slots x 1 modules, 64 B meta + 1048576 B data per module" in rows[frames.name]
    assert "6 slots x 1 modules, 56 B meta + 1048576 B data per module" in rows[images.name]
    frames.close()
    images.close()


def test_rm_removes_named_segments_and_reports_unknown_ones(make_config):
    _, config = make_config()
    FrameBuffer.for_config(config).close()
    name = f"std-daq-{config.detector_name}-frames"
    result = std_daq("buffers", "rm", name, "std-daq-no-such-thing")
    assert result.returncode == 1
    assert f"removed {name}" in result.stdout
    assert "not found (or not a std-daq* segment): std-daq-no-such-thing" in result.stderr
    assert not os.path.exists(os.path.join(SHM_DIR, name))


def test_rm_never_touches_segments_of_other_programs():
    result = std_daq("buffers", "rm", "PostgreSQL.1")
    assert result.returncode == 1
    assert "not a std-daq* segment" in result.stderr


def test_rm_all_with_a_prefix_removes_only_that_prefix(make_config):
    _, config = make_config()
    FrameBuffer.for_config(config).close()
    ImageBuffer.for_config(config).close()
    result = std_daq("buffers", "rm", "--all", "--prefix", f"std-daq-{config.detector_name}")
    assert result.returncode == 0
    assert sorted(result.stdout.split()) == sorted(
        ["removed", "removed", f"std-daq-{config.detector_name}-frames", f"std-daq-{config.detector_name}-images"])


@pytest.mark.parametrize("args", [["buffers", "rm"], []])
def test_incomplete_commands_exit_with_usage_errors(args):
    assert std_daq(*args).returncode == 2
