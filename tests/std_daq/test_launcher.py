"""The launcher's supervision, with small real child processes standing in for services."""
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from std_daq import launcher as launcher_module
from std_daq.launcher import Launcher, ServiceSpec

CHILD = textwrap.dedent("""
    import signal, sys, time
    label, log = sys.argv[1], sys.argv[2]
    def on_term(*_):
        with open(log, "a") as f:
            f.write(f"stop {label}\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    with open(log, "a") as f:
        f.write(f"start {label}\\n")
    print(f"hello from {label}", flush=True)
    while True:
        time.sleep(0.05)
""")


def spec(label: str, rank: int, log, code: str = CHILD) -> ServiceSpec:
    return ServiceSpec(label, [sys.executable, "-c", code, label, str(log)], rank)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_services_start_downstream_first_and_stop_upstream_first(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher_module, "STAGE_SETTLE_S", 1.5)
    log = tmp_path / "events"
    out = io.StringIO()
    cleaned = []
    launcher = Launcher([spec("recv-0", 0, log), spec("recv-1", 0, log), spec("assembler", 1, log),
                         spec("writer", 4, log)], output=out, cleanup=lambda: cleaned.append(True))
    launcher.start()
    try:
        assert wait_for(lambda: log.exists() and log.read_text().count("start") == 4)
        assert wait_for(lambda: "[recv-1] hello from recv-1" in out.getvalue())
    finally:
        launcher.stop()
    events = log.read_text().split("\n")
    starts = [e.split()[1] for e in events if e.startswith("start")]
    stops = [e.split()[1] for e in events if e.startswith("stop")]
    assert starts.index("writer") < starts.index("assembler") < min(starts.index("recv-0"), starts.index("recv-1"))
    assert max(stops.index("recv-0"), stops.index("recv-1")) < stops.index("assembler") < stops.index("writer")
    assert cleaned == [True]


def test_a_crashed_service_is_restarted_with_backoff_and_the_launcher_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher_module, "BACKOFF_START_S", 0.2)
    crash_once = textwrap.dedent("""
        import os, sys, time
        marker = sys.argv[2] + ".crashed"
        if not os.path.exists(marker):
            open(marker, "w").close()
            sys.exit(3)
        print("second life", flush=True)
        time.sleep(30)
    """)
    out = io.StringIO()
    launcher = Launcher([spec("flaky", 0, tmp_path / "x", crash_once)], output=out)
    stop = threading.Event()
    runner = threading.Thread(target=launcher.run, args=(stop, 0.05))
    runner.start()
    try:
        assert wait_for(lambda: "[flaky] second life" in out.getvalue())
    finally:
        stop.set()
        runner.join(timeout=30)
    text = out.getvalue()
    assert "flaky exited with code 3; restarting in 0.2 s" in text
    assert "restarted flaky" in text and "restart 1)" in text
    assert launcher.children[0].backoff_s == pytest.approx(0.4)


def test_a_service_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher_module, "STOP_GRACE_S", 0.5)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    out = io.StringIO()
    launcher = Launcher([spec("stubborn", 0, tmp_path / "x", stubborn)], output=out)
    launcher.start()
    assert wait_for(lambda: "[stubborn] up" in out.getvalue())
    started = time.monotonic()
    launcher.stop()
    assert time.monotonic() - started < 10
    assert "stubborn did not stop within 0.5 s; killing it" in out.getvalue()
    assert launcher.children[0].process.returncode == -9


def test_children_are_stopped_when_the_launcher_itself_is_killed(tmp_path):
    log = tmp_path / "events"
    script = textwrap.dedent(f"""
        import sys, time
        from std_daq.launcher import Launcher, ServiceSpec
        launcher = Launcher([ServiceSpec("orphan", [sys.executable, "-c", {CHILD!r}, "orphan", {str(log)!r}], 0)])
        launcher.start()  # says "started orphan (pid N)"
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        line = parent.stdout.readline()
        assert "started orphan (pid " in line, line
        child = psutil.Process(int(line.split("(pid ")[1].rstrip(")\n")))
        assert wait_for(lambda: log.exists() and "start orphan" in log.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        child.wait(timeout=10)  # psutil.TimeoutExpired here: the child outlived its launcher
        assert "stop orphan" in log.read_text()  # it got SIGTERM, a clean stop, not a kill
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        if child is not None and child.is_running():  # no longer ours once orphaned: the leak guard misses it
            child.kill()


def test_a_replica_config_runs_std_stream_recv_in_place_of_the_receivers_and_the_assembler(make_config):
    from std_daq.launcher import is_replica, pipeline_services

    _, detector = make_config(n_modules=2, image_pixel_height=1024, stream_send={"to": "tcp://127.0.0.1:9610"})
    _, replica = make_config(n_modules=2, image_pixel_height=1024, namespace="replica",
                             stream_recv={"bind": "tcp://127.0.0.1:9610"})
    assert not is_replica(detector) and is_replica(replica)
    assert [s.label for s in pipeline_services("d.json", detector)] == \
        ["udp_recv-0", "udp_recv-1", "assembler", "stream_send", "writer_agent", "h5_writer"]
    specs = pipeline_services("r.json", replica)
    assert [s.label for s in specs] == ["stream_recv", "writer_agent", "h5_writer"]
    assert os.path.basename(specs[0].argv[0]) == "std_stream_recv" and specs[0].argv[1] == "r.json"
    # The stream receiver is the replica's producer: it stops before the agent and the writer.
    assert specs[0].stop_rank < specs[1].stop_rank < specs[2].stop_rank


# -- one pipeline per detector ------------------------------------------------------------------------

CLAIM = textwrap.dedent("""
    import sys
    from core_buffer.config import load_config
    from core_buffer.locks import role_lock, service_role
    from std_daq.launcher import claim_detector
    config = load_config(sys.argv[1])
    lock = claim_detector(config) if sys.argv[2] == "detector" else role_lock(config, service_role(sys.argv[2])).acquire()
    print("held", flush=True)
    sys.stdin.readline()
    lock.release()
""")


class Holder:
    """Another process holding the detector's lock (as `std-daq up` does) or a role's (as a service does)."""

    def __init__(self, config_path, what: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CLAIM, str(config_path), what], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0
        self.proc.stdout.close()


def test_a_second_claim_of_a_detector_is_refused_naming_the_holder(make_config):
    from std_daq.launcher import PipelineRunning, claim_detector

    path, config = make_config()
    holder = Holder(path, "detector")
    try:
        with pytest.raises(PipelineRunning, match=rf"detector {config.detector_name} is held by pid "
                                                   rf"{holder.proc.pid} \(.*{path.name} detector\)"):
            claim_detector(config)
    finally:
        holder.stop()
    claim_detector(config).release()  # free once the holder is gone
    assert not os.path.exists(f"/tmp/std-daq-{config.detector_name}.lock")


def test_a_claim_is_refused_while_a_service_of_the_detector_runs_without_a_launcher(make_config):
    from std_daq.launcher import PipelineRunning, claim_detector

    path, config = make_config()
    holder = Holder(path, "std_assembler")  # as a systemd unit's std_assembler holds its role
    try:
        with pytest.raises(PipelineRunning, match=rf"run already, without a launcher .*: image_producer by pid "
                                                   rf"{holder.proc.pid} "):
            claim_detector(config)
    finally:
        holder.stop()
    assert not [name for name in os.listdir("/tmp") if name.startswith(f"std-daq-{config.detector_name}")]


MAP = textwrap.dedent("""
    import sys
    from core_buffer import FrameBuffer, load_config
    frames = FrameBuffer.for_config(load_config(sys.argv[1]))
    print("mapped", flush=True)
    sys.stdin.readline()
    frames.close()
""")


def test_segments_a_live_process_maps_are_never_removed_and_block_a_claim(make_config):
    from std_daq.launcher import PipelineRunning, claim_detector, remove_buffers

    path, config = make_config()
    user = subprocess.Popen([sys.executable, "-c", MAP, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    frames = f"std-daq-{config.detector_name}-frames"
    try:
        assert user.stdout.readline().strip() == "mapped"
        with pytest.raises(PipelineRunning, match=rf"shared memory of detector {config.detector_name} is in use: "
                                                   rf"{frames} by pid {user.pid} "):
            claim_detector(config)
        removal = remove_buffers(config)
        assert removal.removed == [] and removal.in_use == {frames: [user.pid]}
        assert f"left {frames}: in use by pid {user.pid} (" in removal.describe()
        assert os.path.exists(f"/dev/shm/{frames}")
    finally:
        user.stdin.close()
        user.wait(timeout=10)
        user.stdout.close()
    assert remove_buffers(config).removed == [frames]


def test_stale_socket_files_go_only_where_nobody_holds_the_role(make_config):
    import socket

    from core_buffer.locks import role_lock, service_role
    from std_daq.launcher import remove_stale_sockets

    _, config = make_config()
    paths = {name: f"/tmp/std-daq-{config.detector_name}-{name}" for name in ("frames-0", "assembler", "writer_status")}
    for name in ("frames-0", "assembler"):
        with socket.socket(socket.AF_UNIX) as sock:  # a socket file as a killed service leaves it
            sock.bind(paths[name])
    with open(paths["writer_status"], "w") as f:  # not a socket: never ours to remove
        f.write("x")
    try:
        with role_lock(config, service_role("std_assembler")):
            assert remove_stale_sockets(config) == [paths["frames-0"]]
            assert os.path.exists(paths["assembler"])  # its role is held: the holder's socket
        assert remove_stale_sockets(config) == [paths["assembler"]]
        assert os.path.exists(paths["writer_status"])
    finally:
        for path in paths.values():
            if os.path.lexists(path):
                os.unlink(path)


def test_up_says_at_start_when_writes_will_be_refused(make_config, tmp_path):
    from std_daq.launcher import output_warnings

    _, without = make_config()
    assert output_warnings(without) == [
        f"no output_dirs in {without.source}: every write will be refused; set config key output_dirs, e.g. "
        f'"output_dirs": ["/data/{without.detector_name}"]']
    _, missing = make_config(output_dirs=[str(tmp_path), str(tmp_path / "not-made")])
    assert output_warnings(missing) == [f"output_dirs entry {tmp_path / 'not-made'} is not an existing directory: "
                                        "writes into it will be refused until it is"]


@pytest.mark.parametrize("name", ["demo_jungfrau_2m", "eiger_500k", "gigafrost_2016", "jungfrau_1m", "jungfrau_4m"])
def test_every_bundled_config_can_write_on_a_first_try(name):
    from importlib import resources

    from core_buffer.config import load_config
    from std_daq.launcher import output_warnings

    config = load_config(resources.files("core_buffer") / "configs" / f"{name}.json")
    assert config.output_dirs and output_warnings(config) == []
