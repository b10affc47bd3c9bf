"""`std-daq demo`, the README's main job, as a newcomer runs it: the installed console script, from a
directory that is not the repository, with and without a broker."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - the demo's file may use the registered filters
import psutil
import pytest

from core_buffer.ringbuffer import SHM_DIR
from std_daq import demo

N_IMAGES = 20
DEMO_DETECTOR = "demo-JF2"  # the bundled config's detector_name


def run_demo(workdir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    std_daq = shutil.which("std-daq")
    assert std_daq, "the std-daq console script is not installed (pip install -e .)"
    result = subprocess.run([std_daq, "demo", "--images", str(N_IMAGES), "--rate", "50", "--dir", str(workdir)],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=150)
    print(result.stdout, result.stderr)  # shown by pytest when an assertion fails
    return result


def written_file(stdout: str) -> Path:
    match = re.search(r"^  file: +(\S+\.h5) \(", stdout, re.M)
    assert match, "the summary names no file"
    return Path(match.group(1))


def assert_nothing_left_behind() -> None:
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(f"std-daq-{DEMO_DETECTOR}-")]
    # ipc sockets and lock files in the bundled config's ipc_dir, /tmp (the writer's record directory too)
    assert not [n for n in os.listdir("/tmp") if n.startswith(f"std-daq-{DEMO_DETECTOR}-")
                or n == f"std-daq-{DEMO_DETECTOR}.lock"]
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        if any("demo-config.json" in part for part in proc.info["cmdline"] or ()):
            left.append(proc)
    assert not left, f"demo services still running: {[p.pid for p in left]}"


@pytest.mark.broker
def test_demo_writes_through_the_broker_and_rechecks_the_file(broker_url, tmp_path):
    result = run_demo(tmp_path, {**os.environ, "STD_DAQ_BROKER_URL": broker_url})
    assert result.returncode == 0
    assert "Traceback" not in result.stderr
    assert "write path:        RabbitMQ -> writer_agent -> std_h5_writer" in result.stdout
    assert f"images written:    {N_IMAGES} of {N_IMAGES}" in result.stdout
    assert (f"re-opened:         {N_IMAGES} images, {N_IMAGES} equal to the simulator's pattern pixel for pixel"
            in result.stdout)
    path = written_file(result.stdout)
    assert path.parent == tmp_path
    with h5py.File(path, "r") as f:
        assert f["entry/data/data"].shape == (N_IMAGES, 1024, 1024)
        assert not f[f"{DEMO_DETECTOR}/status"][:].any()
    assert_nothing_left_behind()


def closed_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with block ends; nothing listens there


def occupy(kind: int, port: int) -> socket.socket | None:
    """Hold `port` (None if someone else already does)."""
    sock = socket.socket(socket.AF_INET, kind)
    try:
        sock.bind(("0.0.0.0" if kind == socket.SOCK_DGRAM else "127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


def test_demo_without_a_broker_says_so_and_writes_straight_to_the_writer(tmp_path):
    url = f"amqp://guest:guest@127.0.0.1:{closed_local_port()}/%2F"
    # The bundled config's ports are taken (as by another pipeline on a shared machine): the demo uses others.
    held = [s for s in (occupy(socket.SOCK_STREAM, demo.METRICS_BASE_PORT), occupy(socket.SOCK_DGRAM, 51020)) if s]
    try:
        result = run_demo(tmp_path, {**os.environ, "STD_DAQ_BROKER_URL": url})
    finally:
        for sock in held:
            sock.close()
    used = json.loads((tmp_path / "demo-config.json").read_text())
    assert used["metrics"]["base_port"] != demo.METRICS_BASE_PORT and used["start_udp_port"] != 51020
    assert result.returncode == 0
    assert "Traceback" not in result.stderr
    assert "no usable RabbitMQ" in result.stdout and "nothing answers there" in result.stdout
    assert "the write goes straight to std_h5_writer (no RabbitMQ, no writer_agent)" in result.stdout
    assert "write path:        direct to std_h5_writer" in result.stdout
    # The one command that starts a broker works from here, a directory outside the repository.
    hint = re.search(r"start one with:  (.+)$", result.stdout, re.M)
    assert hint, "no command to start a broker"
    command = shlex.split(hint.group(1).split("   (")[0])
    assert shutil.which(command[0]), f"{command[0]} is not a command on this machine"
    for arg in command[1:]:
        if arg.endswith(".sh"):
            assert Path(arg).is_absolute() and Path(arg).is_file(), f"{arg} does not exist from {tmp_path}"
    with h5py.File(written_file(result.stdout), "r") as f:
        assert f["entry/data/data"].shape[0] == N_IMAGES
    assert f"re-opened:         {N_IMAGES} images, {N_IMAGES} equal" in result.stdout
    assert_nothing_left_behind()


@pytest.mark.broker
def test_a_refused_broker_login_is_explained_and_not_raised(broker_url, monkeypatch):
    monkeypatch.setenv("STD_DAQ_BROKER_URL", broker_url.replace("guest:guest@", "guest:wrong-password@"))
    check = demo.check_broker()
    assert not check.usable
    assert check.problem == "it refused the login"
    assert "wrong-password" not in check.where


@pytest.mark.parametrize("error,message,expected", [
    ("RequestTimeout", "request 1234: no final status within 5 s (received: request_start)",
     ["no final status within 5 s", "writer_agent"]),  # nobody answers
    ("NoAgentError", "no writer_agent serves tag 'x': the request was returned by the broker",
     ["no writer_agent serves"]),  # nobody takes the request
])
def test_a_broker_write_that_fails_is_a_failed_write_not_a_traceback(make_config, monkeypatch, error, message,
                                                                      expected):
    from std_daq import client

    def failing(*_args, **_kwargs):
        raise getattr(client, error)(message)

    monkeypatch.setattr(client, "send_write_and_wait", failing)
    _, config = make_config()
    outcome = demo.write_via_broker(config, "/nowhere/x.h5", 10, timeout_s=5)
    assert not outcome.ok
    assert all(text in outcome.detail for text in expected), outcome.detail


def test_the_broker_hint_says_what_to_install_without_rabbitmq_server_or_a_docker_engine(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A docker client with no engine behind it, as on these machines: `docker info` fails.
    (bin_dir / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert demo.broker_start_command().startswith("sudo apt-get install rabbitmq-server")
    (bin_dir / "docker").unlink()
    assert demo.broker_start_command().startswith("sudo apt-get install rabbitmq-server")


def test_sigterm_stops_the_demo_mid_write_and_removes_its_shared_memory(tmp_path):
    """A real demo process (direct write, no broker), SIGTERM while it writes: services stopped in order,
    segments removed, exit 143; and the file of an earlier demo run in the directory was replaced."""
    earlier = tmp_path / "demo-20260101-120000.h5"
    earlier.write_bytes(b"\0" * 4096)
    mine = tmp_path / "mine.h5"  # not a name the demo gives its files: kept
    mine.write_bytes(b"\0")
    url = f"amqp://guest:guest@127.0.0.1:{closed_local_port()}/%2F"
    proc = subprocess.Popen([shutil.which("std-daq"), "demo", "--images", "100000", "--rate", "50", "--dir",
                             str(tmp_path)], cwd=tmp_path, env={**os.environ, "STD_DAQ_BROKER_URL": url},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("writing [" in line for line in lines) and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        assert any("asking for 100000 images" in line for line in lines), "".join(lines)
        time.sleep(0.5)  # images under way
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    proc.stdout.close()
    output = "".join(lines)
    assert "terminated (SIGTERM); the services are stopped and their shared memory removed" in output
    assert "Traceback" not in output
    assert f"removed the previous demo file {earlier}" in output
    assert not earlier.exists() and mine.exists()
    services_log = (tmp_path / "services.log").read_text()
    assert "[std-daq up] stopped udp_recv-0 (exit code 0)" in services_log, services_log[-3000:]
    assert_nothing_left_behind()


def test_demo_refuses_a_count_of_no_images_before_starting_anything(tmp_path):
    result = subprocess.run([shutil.which("std-daq"), "demo", "--images", "0", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--images: must be more than 0" in result.stderr
    assert not (tmp_path / "services.log").exists()


def test_a_demo_is_refused_while_the_detector_is_held_naming_the_holder(tmp_path):
    """As by another demo, or a `std-daq up` of the bundled config: refused before it writes anything into
    its directory (the running one's demo-config.json names its ports) or starts anything."""
    import sys
    import textwrap

    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from core_buffer.config import load_config
        from std_daq.demo import bundled_config_path
        from std_daq.launcher import claim_detector
        lock = claim_detector(load_config(bundled_config_path()))
        print("held", flush=True)
        sys.stdin.readline()
        lock.release()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = subprocess.run([shutil.which("std-daq"), "demo", "--images", "5", "--dir", str(tmp_path / "demo")],
                                capture_output=True, text=True, timeout=60)
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
        holder.stdout.close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith(f"std-daq demo: not starting: detector {DEMO_DETECTOR} is held by pid "
                                    f"{holder.pid} (")
    assert "Nothing was started or removed." in result.stdout
    assert not (tmp_path / "demo").exists()
    assert_nothing_left_behind()
