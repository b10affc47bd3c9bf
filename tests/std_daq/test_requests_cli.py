"""`std-daq write`, `kill` and `monitor` through the installed console script, against the real RabbitMQ and,
where a request must be served, a real writer_agent and std_h5_writer fed by a test producer."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import h5py

from core_buffer import broker
from std_daq.launcher import console_script
from tests.writer_agent.rig import rig, wait_for_progress  # noqa: F401 - rig is a fixture


def std_daq(url: str, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    env = {**os.environ, broker.URL_ENV: url}
    env.pop("STD_DAQ_TAG", None)
    return subprocess.run([console_script("std-daq"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s)


def request_id_of(stdout: str) -> str:
    found = re.search(r"^request ([0-9a-f-]{36}):", stdout, re.MULTILINE)
    assert found, stdout
    return found.group(1)


def test_write_wait_succeeds_exits_0_and_prints_the_file(rig):
    r = rig()
    path = r.out / "cli.h5"
    result = std_daq(r.url, "write", str(path), "20", "--tag", r.tag, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr + r.logs()
    assert "started by writer_agent" in result.stdout
    assert "done: 20 images written, 0 lost, 0 missed by the agent" in result.stdout
    assert result.stdout.rstrip().endswith(f"-> {path}")
    with h5py.File(path, "r") as f:
        assert f["/entry/data/data"].shape[0] == 20


def test_write_wait_of_a_bad_request_exits_1_printing_the_reason(rig):
    r = rig(rate_hz=0)
    result = std_daq(r.url, "write", "/etc/std-daq-cli-test.h5", "5", "--tag", r.tag, "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED:" in result.stderr and "outside the allowed" in result.stderr
    result = std_daq(r.url, "write", str(r.out / "zero.h5"), "0", "--tag", r.tag, "--wait")
    assert result.returncode == 1 and "'n_images' must be between 1 and 5000" in result.stderr


def test_write_to_a_tag_nobody_serves_exits_1_at_once(broker_url, detector_name):
    result = std_daq(broker_url, "write", "/tmp/x.h5", "5", "--tag", detector_name, "--wait")
    assert result.returncode == 1
    assert f"no writer_agent serves tag '{detector_name}'" in result.stderr
    assert "request " not in result.stdout  # nothing was sent that could still run


def test_write_without_a_tag_is_a_usage_error(broker_url):
    result = std_daq(broker_url, "write", "/tmp/x.h5", "5")
    assert result.returncode == 2 and "--tag" in result.stderr


def test_kill_of_a_running_write_ends_it_with_a_closed_file(rig):
    r = rig(rate_hz=50)
    path = r.out / "long.h5"
    started = std_daq(r.url, "write", str(path), "2000", "--tag", r.tag)  # without --wait: returns at once
    assert started.returncode == 0, started.stderr
    request_id = request_id_of(started.stdout)
    wait_for_progress(r, request_id, 5)
    killed = std_daq(r.url, "kill", request_id, "--tag", r.tag, "--wait")
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert f"kill sent for request {request_id}" in killed.stdout
    assert "request_fail: interrupted by a kill after" in killed.stdout
    with h5py.File(path, "r") as f:
        assert 5 <= f["/entry/data/data"].shape[0] < 2000 and f.attrs["state"] == "interrupted"


def test_monitor_shows_a_line_per_request_with_the_services_state(rig):
    r = rig()
    env = {**os.environ, broker.URL_ENV: r.url}
    monitor = subprocess.Popen([console_script("std-daq"), "monitor"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []  # other tests on the shared broker may add lines too: only ours are looked at
    reader = threading.Thread(target=lambda: lines.extend(iter(monitor.stdout.readline, "")), daemon=True)
    try:
        first_line = monitor.stdout.readline()  # printed once its status queue is bound
        assert "watching the status exchange" in first_line, first_line
        reader.start()
        ok = r.client.write(str(r.out / "watched.h5"), 10, tag=r.tag, timeout_s=30)
        bad = r.client.write("relative.h5", 10, tag=r.tag, timeout_s=30)
        assert ok.ok and not bad.ok

        def last_line_of(request_id: str) -> str:
            mine = [line for line in list(lines) if request_id[:8] in line]
            return mine[-1] if mine else ""

        deadline = time.monotonic() + 15
        while "FAIL" not in last_line_of(bad.request_id) or "success" not in last_line_of(ok.request_id):
            assert time.monotonic() < deadline and monitor.poll() is None, "".join(lines)
            time.sleep(0.05)
        monitor.send_signal(signal.SIGINT)  # Ctrl-C: the way an operator ends it
        _, err = monitor.communicate(timeout=15)
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.communicate()
        reader.join(5)
    assert monitor.returncode == 0, err
    ok_lines = [line for line in lines if ok.request_id[:8] in line]
    assert "watched.h5 (10 images)" in ok_lines[0] and "writer_agent: start" in ok_lines[0], ok_lines
    assert "writer_agent: success, 10 written" in ok_lines[-1], ok_lines
    assert any("writer_agent: writing " in line for line in ok_lines), ok_lines
    assert "writer_agent: FAIL: output_file must be an absolute path" in last_line_of(bad.request_id)
