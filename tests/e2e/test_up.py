"""`std-daq up CONFIG` as an operator runs it: the console script as a process of its own, the assembler
killed under it in the middle of a write while the simulator sends, then SIGTERM to the launcher; a second
`std-daq up` of the same detector refused while the first runs on untouched; nothing left behind."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from core_buffer.ipc import detector_socket_files
from core_buffer.ringbuffer import SHM_DIR
from std_daq import status
from std_daq.launcher import console_script
from tests.conftest import free_tcp_port_block
from tests.e2e.conftest import READY_TIMEOUT_S, wait_until_up
from tests.e2e.expected import raw_image


def assembler_metric(config, name: str) -> float | None:
    return next(((m.values or {}).get(name) for m in status.scrape(config) if m.label == "std_assembler"), None)


@pytest.mark.broker
def test_up_restarts_the_assembler_killed_mid_write_the_run_recovers_and_sigterm_stops_everything(
        make_config, std_daq_up, client, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config_path, config = make_config(output_dirs=[str(out)], frame_buffer_slots=64, image_buffer_slots=128,
                                      writer={"status_interval_s": 0.2},
                                      metrics={"host": "127.0.0.1", "base_port": free_tcp_port_block(12)})
    segments = [Path(SHM_DIR) / f"{config.namespace}-{config.detector_name}-{kind}" for kind in ("frames", "images")]
    up = std_daq_up(config_path)
    output = up.output
    sim = None
    try:
        wait_until_up(config, output)
        deadline = time.monotonic() + READY_TIMEOUT_S  # a service creates its segment as it starts its loop
        while not all(seg.exists() for seg in segments) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(seg.exists() for seg in segments), [str(seg) for seg in segments if not seg.exists()]

        sim = subprocess.Popen([console_script("std_udp_sim"), str(config_path), "--rate", "100",
                                "--n-images", "forever"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out_file = out / "across-the-crash.h5"
        request_id = client.send_write(config.detector_name, {"output_file": str(out_file), "n_images": 200})
        client.wait(request_id, timeout_s=30, until="request_progress")  # the write is open and under way

        killed = int(output.wait_for(r"started assembler \(pid (\d+)\)").group(1))
        last_before = assembler_metric(config, "last_image_id")
        os.kill(killed, signal.SIGKILL)
        output.wait_for(r"assembler exited with code -9; restarting in")
        restarted = int(output.wait_for(r"restarted assembler \(pid (\d+), restart 1\)").group(1))
        assert restarted != killed

        outcome = client.wait(request_id, timeout_s=60)
        assert outcome.final_action in ("request_success", "request_fail"), outcome
        assert outcome.succeeded, f"{outcome}\n{output.text()[-6000:]}"
        assert assembler_metric(config, "images") > 0  # the new assembler's own counters, on the same endpoint
        with h5py.File(out_file, "r") as f:
            data, ids = f["entry/data/data"][:], f[f"{config.detector_name}/image_id"][:]
            statuses = f[f"{config.detector_name}/status"][:]
        # Well past the kill (0.1 s at 100 Hz): only the restarted assembler can have assembled these.
        after = [i for i, image_id in enumerate(ids) if image_id > last_before + 10]
        assert after, f"no image after the restart in the file: ids {ids.min()}..{ids.max()}, killed at {last_before}"
        for i in after:
            assert statuses[i] == 0 and np.array_equal(data[i], raw_image(config, int(ids[i]))), int(ids[i])

        children = psutil.Process(up.process.pid).children(recursive=True)
        assert {restarted} <= {c.pid for c in children}
        assert len(children) == 4  # udp_recv-0, assembler, writer_agent, h5_writer

        assert up.stop() == 0  # SIGTERM
        gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"services left running: {[p.pid for p in alive]}"
        assert not any(seg.exists() for seg in segments)
        text = output.text()
        stops = [text.index(f"stopped {label} (exit code 0)")
                 for label in ("udp_recv-0", "assembler", "writer_agent", "h5_writer")]
        assert stops == sorted(stops), text  # receivers first, the writer last
        assert f"removed shared memory: {segments[0].name}, {segments[1].name}" in text
    finally:
        if sim is not None:
            sim.terminate()
            sim.wait(timeout=10)


@pytest.fixture
def ipc_dir():
    """An ipc_dir of the test's own, to see every file the pipeline leaves there; short, since an ipc socket
    path holds at most 107 bytes (pytest's tmp_path is too long)."""
    path = tempfile.mkdtemp(prefix="sdq-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def wait_for_segments(segments: list[Path]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S  # a service creates its segment as it starts its loop
    while not all(seg.exists() for seg in segments) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(seg.exists() for seg in segments), [str(seg) for seg in segments if not seg.exists()]


@pytest.mark.broker
def test_a_second_up_of_the_detector_is_refused_and_the_first_runs_on_untouched(make_config, std_daq_up, client,
                                                                                  tmp_path, ipc_dir, broker_url):
    out = tmp_path / "out"
    out.mkdir()
    config_path, config = make_config(ipc_dir=str(ipc_dir), output_dirs=[str(out)], frame_buffer_slots=64,
                                      image_buffer_slots=128, writer={"status_interval_s": 0.2},
                                      metrics={"host": "127.0.0.1", "base_port": free_tcp_port_block(12)})
    segments = [Path(SHM_DIR) / f"{config.namespace}-{config.detector_name}-{kind}" for kind in ("frames", "images")]
    first = std_daq_up(config_path)
    sim = None
    try:
        wait_until_up(config, first.output)
        wait_for_segments(segments)
        sockets = {path: os.stat(path).st_ino for path in detector_socket_files(config)}
        inodes = {seg: seg.stat().st_ino for seg in segments}
        services = psutil.Process(first.process.pid).children(recursive=True)
        assert len(services) == 4

        second = subprocess.run([shutil.which("std-daq"), "up", str(config_path)], capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL,
                                env={**os.environ, "STD_DAQ_BROKER_URL": broker_url})
        assert second.returncode == 1, second.stdout + second.stderr
        assert second.stderr.startswith(f"std-daq up: not starting: detector {config.detector_name} is held by pid "
                                        f"{first.process.pid} (")
        assert second.stderr.rstrip().endswith("Nothing was started or removed.")
        assert "started" not in second.stdout and "removed shared memory" not in second.stdout

        # The first pipeline: the same sockets (no bind replaced one), segments and processes ...
        assert {path: os.stat(path).st_ino for path in sockets} == sockets
        assert {seg: seg.stat().st_ino for seg in segments} == inodes
        assert all(p.is_running() for p in services)
        assert {p.pid for p in psutil.Process(first.process.pid).children(recursive=True)} == {p.pid for p in services}
        # ... and it still writes.
        sim = subprocess.Popen([console_script("std_udp_sim"), str(config_path), "--rate", "100",
                                "--n-images", "forever"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out_file = out / "after-the-refusal.h5"
        outcome = client.wait(client.send_write(config.detector_name, {"output_file": str(out_file), "n_images": 20}),
                              timeout_s=60)
        assert outcome.succeeded, f"{outcome}\n{first.output.text()[-6000:]}"
        with h5py.File(out_file, "r") as f:
            assert f["entry/data/data"].shape[0] == 20
    finally:
        if sim is not None:
            sim.terminate()
            sim.wait(timeout=10)
    assert first.stop() == 0
    assert sorted(os.listdir(ipc_dir)) == [], "socket or lock files left in ipc_dir after a clean stop"
    assert not any(seg.exists() for seg in segments)


@pytest.mark.broker
def test_up_warns_at_start_that_writes_will_be_refused_and_leaves_nothing_behind(make_config, std_daq_up, ipc_dir):
    config_path, config = make_config(ipc_dir=str(ipc_dir),
                                      metrics={"host": "127.0.0.1", "base_port": free_tcp_port_block(12)})
    up = std_daq_up(config_path)
    up.output.wait_for(r"\[std-daq up\] WARNING: no output_dirs in .*: every write will be refused; set config "
                       r"key output_dirs")
    wait_until_up(config, up.output)
    assert sorted(os.listdir(ipc_dir)) == sorted(
        [f"std-daq-{config.detector_name}{suffix}" for suffix in (
            ".lock", "-udp_recv-0.lock", "-image_producer.lock", "-writer_agent.lock", "-h5_writer.lock",
            "-frames-0", "-assembler", "-writer_agent", "-writer_status", "-std_h5_writer")])
    assert up.stop() == 0
    assert sorted(os.listdir(ipc_dir)) == [], "socket or lock files left in ipc_dir after a clean stop"
    assert not [name for name in os.listdir(SHM_DIR) if name.startswith(f"std-daq-{config.detector_name}-")]
