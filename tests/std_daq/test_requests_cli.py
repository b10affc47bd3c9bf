"""`std-daq write`, `kill`, `requests` and `monitor` through the installed console script, against the real
RabbitMQ and, where a request must be served, a real writer_agent and std_h5_writer fed by a test producer.

The kill answers and the request listing are the agent's side of docs/writer_agent.md ("Kills", and the
`request_list` query): the tests of `kill` and `requests` that a writer_agent must answer need an agent
that has them."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import h5py
import pytest

from core_buffer import broker
from std_daq.client import progress_of
from std_daq.launcher import console_script
from tests.writer_agent.rig import proxy, rig, wait_for_progress  # noqa: F401 - fixtures

pytestmark = pytest.mark.broker


def std_daq_env(url: str) -> dict[str, str]:
    env = {**os.environ, broker.URL_ENV: url}
    env.pop("STD_DAQ_TAG", None)
    return env


def std_daq(url: str, *args: str, timeout_s: float = 60.0, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("std-daq"), *args], capture_output=True, text=True, env=std_daq_env(url),
                          timeout=timeout_s, cwd=cwd)


class LineReader:
    """The lines a process writes to one of its pipes, read by a thread as they come."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(pipe.readline, "")), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in list(self.lines)):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(self.lines)
            time.sleep(0.05)

    def text(self) -> str:
        self.thread.join(5)  # the process has ended: the rest of its output is in
        return "".join(self.lines)


def request_id_of(stdout: str) -> str:
    found = re.search(r"^request ([0-9a-f-]{36}):", stdout, re.MULTILINE)
    assert found, stdout
    return found.group(1)


def test_write_wait_shows_a_progress_bar_exits_0_and_prints_the_file(rig):
    r = rig()
    path = r.out / "cli.h5"
    result = std_daq(r.url, "write", str(path), "200", "--tag", r.tag, "--wait")  # 1 s at 200 Hz
    assert result.returncode == 0, result.stdout + result.stderr + r.logs()
    assert "started by writer_agent" in result.stdout
    # Not a terminal: each progress report on a line of its own. The writer reports every 0.2 s.
    bars = re.findall(r"^  \[([#.]{40})\] (\d+)/200$", result.stdout, re.MULTILINE)
    assert bars, result.stdout
    assert [int(n) for _, n in bars] == sorted(int(n) for _, n in bars)
    assert all(bar.count("#") == 40 * int(n) // 200 for bar, n in bars), bars
    assert "done: 200 images written, 0 lost, 0 missed by the agent" in result.stdout
    assert result.stdout.rstrip().endswith(f"-> {path}")
    with h5py.File(path, "r") as f:
        assert f["/entry/data/data"].shape[0] == 200


def test_write_wait_prints_the_warning_of_a_write_that_missed_images(rig):
    r = rig(skip_sequence_every=10)  # the agent sees a sequence gap every 10 images
    path = r.out / "gaps.h5"
    result = std_daq(r.url, "write", str(path), "30", "--tag", r.tag, "--wait")
    assert result.returncode == 0, result.stdout + result.stderr + r.logs()
    assert re.search(r"^warning: .*\d+ images missed by writer_agent \(sequence gaps\)", result.stdout,
                     re.MULTILINE), result.stdout


def test_write_wait_of_a_bad_request_exits_1_printing_the_reason(rig):
    r = rig(rate_hz=0)
    result = std_daq(r.url, "write", "/etc/std-daq-cli-test.h5", "5", "--tag", r.tag, "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED:" in result.stderr and "outside the allowed" in result.stderr
    # Above the agent's max_images: only the agent knows its config, so the command line sends it.
    result = std_daq(r.url, "write", str(r.out / "many.h5"), "6000", "--tag", r.tag, "--wait")
    assert result.returncode == 1 and "'n_images' must be between 1 and 5000" in result.stderr


def test_write_to_a_tag_nobody_serves_exits_1_at_once(broker_url, detector_name):
    result = std_daq(broker_url, "write", "/tmp/x.h5", "5", "--tag", detector_name, "--wait")
    assert result.returncode == 1
    assert f"no writer_agent serves tag '{detector_name}'" in result.stderr
    assert "request " not in result.stdout  # nothing was sent that could still run


def test_write_without_a_tag_is_a_usage_error(broker_url):
    result = std_daq(broker_url, "write", "/tmp/x.h5", "5")
    assert result.returncode == 2 and "--tag" in result.stderr


def test_write_wait_gives_up_when_no_image_is_written_though_progress_reports_repeat(rig):
    r = rig(rate_hz=0)  # no images: the write stays at 0/100, and the agent says so every second or less
    result = std_daq(r.url, "write", str(r.out / "stuck.h5"), "100", "--tag", r.tag, "--wait", "--timeout", "3",
                     timeout_s=30)  # a wait that counts reports as news never ends: subprocess.TimeoutExpired
    request_id = request_id_of(result.stdout)
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"request {request_id}: no image written for 3 s (0 of 100 so far" in result.stderr, result.stderr
    assert f"`std-daq kill {request_id[:8]} --tag {r.tag}` stops it" in result.stderr
    assert "Traceback" not in result.stderr
    reports = progress_reports(r, request_id)
    assert len(reports) >= 2 and {written for written, _ in reports} == {0}, reports  # they did repeat
    r.client.kill(request_id, tag=r.tag)
    assert "interrupted by a kill after 0 of 100" in r.client.wait(request_id, timeout_s=15).message


def progress_reports(r, request_id: str) -> list[tuple[int, int]]:
    """(written, asked for) of every progress report of `request_id` that r.client received so far."""
    r.client.connection.process_data_events(time_limit=0.5)
    return [progress_of(s) for s in list(r.client.received)
            if s.request_id == request_id and s.action == broker.REQUEST_PROGRESS]


def test_write_resolves_a_relative_path_against_the_current_directory_and_says_so(rig):
    r = rig()
    absolute = r.out.resolve() / "relative.h5"
    result = std_daq(r.url, "write", "relative.h5", "10", "--tag", r.tag, "--wait", cwd=str(r.out))
    assert result.returncode == 0, result.stdout + result.stderr + r.logs()
    assert f"output file relative.h5 is relative: sending {absolute}" in result.stdout
    assert f"10 images to {absolute} (tag {r.tag})" in result.stdout
    with h5py.File(absolute, "r") as f:
        assert f["/entry/data/data"].shape[0] == 10


def test_kill_of_a_running_write_ends_it_with_a_closed_file(rig):  # needs the agent's kill answers
    r = rig(rate_hz=50)
    path = r.out / "long.h5"
    started = std_daq(r.url, "write", str(path), "2000", "--tag", r.tag)  # without --wait: returns at once
    assert started.returncode == 0, started.stderr
    request_id = request_id_of(started.stdout)
    wait_for_progress(r, request_id, 5)
    killed = std_daq(r.url, "kill", request_id, "--tag", r.tag, "--wait")
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert f"kill accepted by writer_agent of tag {r.tag}: stopping request {request_id}" in killed.stdout
    assert "request_fail: interrupted by a kill after" in killed.stdout
    with h5py.File(path, "r") as f:
        assert 5 <= f["/entry/data/data"].shape[0] < 2000 and f.attrs["state"] == "interrupted"


def test_kill_by_the_prefix_that_monitor_shows_stops_the_write(rig):  # needs the agent's kill answers
    r = rig(rate_hz=50)
    request_id = r.client.submit(str(r.out / "prefix.h5"), 2000, tag=r.tag)
    wait_for_progress(r, request_id, 5)
    killed = std_daq(r.url, "kill", request_id[:8], "--tag", r.tag, "--wait")
    assert killed.returncode == 0, killed.stdout + killed.stderr + r.logs()
    assert f"stopping request {request_id}" in killed.stdout  # the agent names the full id
    assert "request_fail: interrupted by a kill after" in killed.stdout


def test_kill_current_stops_the_write_running_now(rig):  # needs the agent's kill answers
    r = rig(rate_hz=50)
    request_id = r.client.submit(str(r.out / "current.h5"), 2000, tag=r.tag)
    wait_for_progress(r, request_id, 5)
    killed = std_daq(r.url, "kill", "--current", "--tag", r.tag)
    assert killed.returncode == 0, killed.stdout + killed.stderr + r.logs()
    assert f"stopping request {request_id}" in killed.stdout
    result = r.client.wait(request_id, timeout_s=15)
    assert not result.ok and "interrupted by a kill" in result.message, result.message


def test_kills_that_stop_nothing_say_so_and_exit_1(rig):  # needs the agent's kill answers
    r = rig()
    done = r.client.write(str(r.out / "done.h5"), 5, tag=r.tag, timeout_s=30)
    assert done.ok, done.message
    finished = std_daq(r.url, "kill", done.request_id, "--tag", r.tag)
    assert finished.returncode == 1, finished.stdout + finished.stderr
    assert f"kill {done.request_id} refused by writer_agent of tag {r.tag}: " in finished.stderr
    assert "kill accepted" not in finished.stdout
    nothing_running = std_daq(r.url, "kill", "--current", "--tag", r.tag)
    assert nothing_running.returncode == 1, nothing_running.stdout + nothing_running.stderr
    assert f"kill current refused by writer_agent of tag {r.tag}: " in nothing_running.stderr


def test_requests_lists_the_running_request_then_the_queued_ones(rig):  # needs the agent's request_list
    r = rig(rate_hz=50)
    idle = std_daq(r.url, "requests", "--tag", r.tag)
    assert idle.returncode == 0, idle.stdout + idle.stderr + r.logs()
    assert idle.stdout.strip() == f"tag {r.tag}: no running or queued requests"
    running = r.client.submit(str(r.out / "running.h5"), 2000, tag=r.tag)
    wait_for_progress(r, running, 2)
    queued = [r.client.submit(str(r.out / f"queued-{i}.h5"), 10, tag=r.tag) for i in range(2)]
    listed = std_daq(r.url, "requests", "--tag", r.tag)
    assert listed.returncode == 0, listed.stdout + listed.stderr + r.logs()
    lines = listed.stdout.splitlines()
    assert lines[0] == f"tag {r.tag}: 1 running, 2 queued", listed.stdout
    assert re.fullmatch(rf"  running  {running}  \d+/2000  {re.escape(str(r.out / 'running.h5'))}", lines[1])
    assert [line.split()[:2] for line in lines[2:]] == [["queued", queued[0]], ["queued", queued[1]]]
    assert lines[2].endswith(f"  0/10  {r.out / 'queued-0.h5'}"), lines[2]
    for request_id in (*queued, running):  # queued ones first, so none of them starts a write
        r.client.kill(request_id, tag=r.tag)
    assert not r.client.wait(running, timeout_s=15).ok


def test_kill_and_requests_without_an_answer_exit_3_saying_so(broker_url, detector_name):
    # An agent older than the answers: the tag is served (a queue is bound), but nothing answers.
    connection = broker.connect(broker_url, connection_name="silent agent (test)")
    try:
        channel = connection.channel()
        broker.declare_exchanges(channel)
        silent = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
        for exchange in (broker.KILL_EXCHANGE, broker.REQUEST_EXCHANGE):
            channel.queue_bind(queue=silent, exchange=exchange, routing_key=detector_name)
        killed = std_daq(broker_url, "kill", "1a2b3c4d", "--tag", detector_name, "--timeout", "1")
        listed = std_daq(broker_url, "requests", "--tag", detector_name, "--timeout", "1")
    finally:
        connection.close()
    assert killed.returncode == 3, killed.stdout + killed.stderr
    assert (f"kill 1a2b3c4d: no answer from the writer_agent of tag '{detector_name}' within 1 s"
            in killed.stderr), killed.stderr
    assert listed.returncode == 3, listed.stdout + listed.stderr
    assert f"no answer from the writer_agent of tag '{detector_name}' within 1 s" in listed.stderr


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


def test_write_wait_that_loses_the_broker_exits_3_with_a_message_not_a_traceback(rig, proxy):
    r = rig(rate_hz=50)
    writing = subprocess.Popen([console_script("std-daq"), "write", str(r.out / "cut.h5"), "2000", "--tag", r.tag,
                                "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=std_daq_env(proxy.url()))  # the command's connection goes through the proxy
    try:
        request_id = request_id_of(writing.stdout.readline())
        wait_for_progress(r, request_id, 5)
        proxy.blackhole()
        _, err = writing.communicate(timeout=30)
    finally:
        if writing.poll() is None:
            writing.kill()
            writing.communicate()
    assert writing.returncode == 3, err
    assert "lost the connection to RabbitMQ" in err and f"request {request_id}; it may still run" in err, err
    assert "Traceback" not in err
    r.client.kill(request_id, tag=r.tag)  # it did run on: the agent's connection was not cut
    killed = r.client.wait(request_id, timeout_s=15)
    assert not killed.ok and "interrupted by a kill" in killed.message, killed.message


def test_monitor_that_loses_the_broker_says_so_and_reconnects(rig, proxy):
    r = rig()
    monitor = subprocess.Popen([console_script("std-daq"), "monitor"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=std_daq_env(proxy.url()))
    readers: list[LineReader] = []
    try:
        assert "watching the status exchange" in monitor.stdout.readline()
        out, err = readers = [LineReader(monitor.stdout), LineReader(monitor.stderr)]
        proxy.blackhole()
        err.wait_for("lost the connection to RabbitMQ", monitor)
        err.wait_for("reconnecting", monitor)
        proxy.restore()
        err.wait_for("reconnected", monitor)
        ok = r.client.write(str(r.out / "after-reconnect.h5"), 5, tag=r.tag, timeout_s=30)
        assert ok.ok, ok.message
        out.wait_for(f"{ok.request_id[:8]} ", monitor)
        monitor.send_signal(signal.SIGINT)
        monitor.wait(15)
        errors = err.text()
    finally:
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
        for reader in readers:
            reader.thread.join(5)  # before their pipes are closed under them
        monitor.stdout.close()
        monitor.stderr.close()
    assert monitor.returncode == 0, errors
    assert "Traceback" not in errors, errors
