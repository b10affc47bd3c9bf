"""core_buffer.locks: real flocks held by real processes, as a second std-daq process meets them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from core_buffer.locks import (
    LockHeld,
    PidLock,
    detector_lock,
    detector_roles,
    holder_of,
    role_lock,
    service_role,
)

HOLD = textwrap.dedent("""
    import sys, time
    from core_buffer.locks import PidLock
    lock = PidLock(sys.argv[1], "the test lock").acquire()
    print("held", flush=True)
    sys.stdin.readline()  # until the test closes our stdin
    lock.release()
    print("released", flush=True)
""")


def hold_in_another_process(path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "marker-of-the-holder"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_is_refused_naming_the_holders_pid_and_command_line(tmp_path):
    path = tmp_path / "std-daq-d.lock"
    holder = hold_in_another_process(path)
    try:
        with pytest.raises(LockHeld) as refused:
            PidLock(str(path), "detector d").acquire()
        assert refused.value.holder.pid == holder.pid
        assert "marker-of-the-holder" in refused.value.holder.command
        assert str(refused.value).startswith(f"detector d is held by pid {holder.pid} (")
        assert holder_of(str(path)).pid == holder.pid
    finally:
        holder.stdin.close()
        assert holder.stdout.readline().strip() == "released"
        holder.wait(timeout=10)
        holder.stdout.close()
    assert holder_of(str(path)) is None
    assert not path.exists()  # the holder removed its lock file as it let go


def test_a_killed_holders_lock_is_free_at_once(tmp_path):
    path = tmp_path / "std-daq-d.lock"
    holder = hold_in_another_process(path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    holder.stdin.close()
    holder.stdout.close()
    assert path.exists()  # it could not remove it ...
    assert holder_of(str(path)) is None  # ... but the kernel dropped its lock
    with PidLock(str(path), "detector d") as lock:
        assert lock.held
        record = path.read_text()
        assert f'"pid": {os.getpid()}' in record
    assert not path.exists()


def test_looking_at_a_lock_never_takes_it(tmp_path):
    path = tmp_path / "std-daq-d.lock"
    with PidLock(str(path), "x"):
        assert holder_of(str(path)).pid == os.getpid()
    assert holder_of(str(path)) is None
    holder_of(str(path))
    assert not path.exists()  # looking created nothing


def test_a_lock_file_that_is_a_symbolic_link_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("not a lock")
    link = tmp_path / "std-daq-d.lock"
    link.symlink_to(target)
    with pytest.raises(Exception, match="symbolic link"):
        PidLock(str(link), "x").acquire()
    assert target.read_text() == "not a lock"


def test_roles_are_what_a_second_copy_would_take_from_the_first(make_config):
    _, config = make_config(n_modules=2, image_pixel_height=1024)
    # The same buffer and the same address: one role, one lock, whichever of the two runs.
    assert service_role("std_assembler").lock_path(config) == service_role("std_stream_recv").lock_path(config)
    assert service_role("std_assembler").socket_files(config) == service_role("std_stream_recv").socket_files(config)
    assert service_role("std_udp_recv", 0) != service_role("std_udp_recv", 1)
    assert [role.name for role in detector_roles(config)] == [
        "udp_recv-0", "udp_recv-1", "image_producer", "stream_send", "writer_agent", "h5_writer", "web"]
    assert service_role("std_udp_recv", 1).socket_files(config) == [
        f"/tmp/std-daq-{config.detector_name}-frames-1"]
    assert role_lock(config, service_role("std_h5_writer")).path == f"/tmp/std-daq-{config.detector_name}-h5_writer.lock"
    assert detector_lock(config).path == f"/tmp/std-daq-{config.detector_name}.lock"
