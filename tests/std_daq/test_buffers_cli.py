"""`std-daq buffers list|rm` against real segments, through the installed console script."""
import os
import shutil
import subprocess
import uuid

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
    for buffer in (frames, images):
        buffer.close()
        buffer.unlink()


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


def in_private_dev_shm(script: str) -> subprocess.CompletedProcess:
    """Run a shell script in a mount namespace of its own with a fresh tmpfs on /dev/shm: a command under
    test that removed too much could only remove what the script made there, never the segments of the
    machine (other test runs, a running pipeline, a database)."""
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if shutil.which("unshare") is None or subprocess.run([*unshare, "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (unshare --mount needs root or user namespaces)")
    assert STD_DAQ, "the std-daq console script is not installed (pip install -e .)"
    setup = f"mount -t tmpfs -o size=16m std-daq-test {SHM_DIR}\nSTD_DAQ={STD_DAQ}\n"
    return subprocess.run([*unshare, "sh", "-c", setup + script], capture_output=True, text=True, timeout=60)


def test_rm_refuses_an_empty_prefix_and_removes_nothing():
    result = in_private_dev_shm(f"""
        touch {SHM_DIR}/std-daq-a-frames {SHM_DIR}/other-b-images {SHM_DIR}/PostgreSQL.1
        "$STD_DAQ" buffers rm --all --prefix ""; echo "rc=$?"
        "$STD_DAQ" buffers rm --prefix "" std-daq-a-frames; echo "rc=$?"
        ls {SHM_DIR}
    """)
    out = result.stdout.split()
    assert out[:2] == ["rc=2", "rc=2"], result.stdout + result.stderr  # a usage error, said in one line
    assert sorted(out[2:]) == ["PostgreSQL.1", "other-b-images", "std-daq-a-frames"]
    assert "std-daq buffers rm: an empty prefix would select every std-daq segment" in result.stderr
    assert "Traceback" not in result.stderr


def test_rm_all_touches_only_names_of_std_daq_segments():
    result = in_private_dev_shm(f"""
        cd {SHM_DIR} && touch std-daq-a-frames std-daq-a-images std-daq-a.lock std-daq-notes std-daq-a-frames.bak
        "$STD_DAQ" buffers rm --all; echo "rc=$?"
        "$STD_DAQ" buffers rm std-daq-notes; echo "rc=$?"
        ls {SHM_DIR}
    """)
    lines = result.stdout.split("\n")
    assert sorted(lines[:2]) == ["removed std-daq-a-frames", "removed std-daq-a-images"], result.stdout
    assert lines[2:4] == ["rc=0", "rc=1"]
    assert sorted(lines[4:-1]) == ["std-daq-a-frames.bak", "std-daq-a.lock", "std-daq-notes"]
    assert "not a std-daq* segment): std-daq-notes" in result.stderr


def test_list_shows_only_std_daq_segments():
    result = in_private_dev_shm(f"""
        touch {SHM_DIR}/std-daq-a-frames {SHM_DIR}/std-daq-lockfile {SHM_DIR}/PostgreSQL.1
        "$STD_DAQ" buffers list --prefix ""
    """)
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names == ["std-daq-a-frames"], result.stdout + result.stderr


def test_rm_by_name_never_touches_a_segment_called_otherwise(make_config):
    _, config = make_config()
    import posix_ipc

    name = f"std-daq-{config.detector_name}-scratch"  # the prefix, but not a ring buffer's name
    posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, size=4096).close_fd()
    try:
        result = std_daq("buffers", "rm", name)
        assert result.returncode == 1
        assert os.path.exists(os.path.join(SHM_DIR, name))
    finally:
        posix_ipc.unlink_shared_memory("/" + name)


def test_rm_refuses_a_segment_a_live_process_maps_naming_it_and_removes_nothing(make_config):
    """Removing the name would not free the memory of the process that maps it, but the next service would
    create a new segment under that name, splitting the pipeline in two that each look healthy."""
    import sys
    import textwrap

    path, config = make_config()
    ImageBuffer.for_config(config).close()  # unused: it may go
    mapper = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from core_buffer import FrameBuffer, load_config
        frames = FrameBuffer.for_config(load_config(sys.argv[1]))
        print("mapped", flush=True)
        sys.stdin.readline()
    """), str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    frames, images = (f"std-daq-{config.detector_name}-{kind}" for kind in ("frames", "images"))
    try:
        assert mapper.stdout.readline().strip() == "mapped"
        result = std_daq("buffers", "rm", "--all", "--prefix", f"std-daq-{config.detector_name}")
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith(f"std-daq buffers rm: removed nothing: {frames} is used by pid {mapper.pid} (")
        assert "Traceback" not in result.stderr
        assert os.path.exists(os.path.join(SHM_DIR, frames)) and os.path.exists(os.path.join(SHM_DIR, images))
    finally:
        mapper.stdin.close()
        mapper.wait(timeout=10)
        mapper.stdout.close()
    result = std_daq("buffers", "rm", frames, images)
    assert result.returncode == 0 and result.stdout.split() == ["removed", frames, "removed", images]
