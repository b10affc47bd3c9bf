"""The shared run loop: stops on signals, survives exceptions, reports statistics."""
import io
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from core_buffer.service import Counters, StatsReporter, influx_line, run


class FlakyService:
    """Raises on some polls; counts the polls that worked."""

    name = "flaky"

    def __init__(self, stop: threading.Event, fail_every: int, stop_after: int) -> None:
        self.counters = Counters("polls", "raised")
        self.stop_event = stop
        self.fail_every = fail_every
        self.stop_after = stop_after
        self.order: list[str] = []

    def poll(self, timeout_s: float) -> None:
        self.counters.polls += 1
        if self.counters.polls >= self.stop_after:
            self.stop_event.set()
        if self.counters.polls % self.fail_every == 0:
            self.counters.raised += 1
            raise ValueError("bad input")

    def stop(self) -> None:
        self.order.append("stop")

    def close(self) -> None:
        self.order.append("close")

    def stats(self):
        return self.counters.snapshot()


def test_the_loop_outlives_exceptions_and_shuts_down_in_order(caplog):
    stop = threading.Event()
    service = FlakyService(stop, fail_every=3, stop_after=30)
    out = io.StringIO()
    reporter = StatsReporter("flaky", {"detector_name": "d"}, interval_s=1000, out=out)
    assert run(service, stop, reporter, poll_timeout_s=0.001) == 0
    assert service.counters.polls == 30
    assert service.order == ["stop", "close"]
    final = out.getvalue().strip().splitlines()[-1]
    assert final.startswith("flaky,detector_name=d polls=30i,raised=10i,loop_errors=10i ")
    # The traceback is logged once, not ten times.
    assert sum("unexpected ValueError" in r.message for r in caplog.records) == 1


class BrokenOut(io.StringIO):
    """Standard output whose reader has gone (the launcher that piped it died)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_statistics_line_that_cannot_be_written_does_not_stop_the_loop(caplog):
    stop = threading.Event()
    service = FlakyService(stop, fail_every=10**6, stop_after=20)
    reporter = StatsReporter("flaky", {"detector_name": "d"}, interval_s=0, out=BrokenOut())
    assert run(service, stop, reporter, poll_timeout_s=0.001) == 0
    assert service.counters.polls == 20  # every poll ran although every report failed
    assert service.order == ["stop", "close"]
    assert any("BrokenPipeError" in r.message for r in caplog.records)
    assert any("no final statistics line" in r.message for r in caplog.records)


def test_the_reporter_reports_rates_at_its_interval():
    now = [100.0]
    out = io.StringIO()
    reporter = StatsReporter("svc", {"detector_name": "d", "module_id": "1"}, 2.0, rates=("frames",), out=out,
                             clock=lambda: now[0])
    assert not reporter.due()
    now[0] = 102.0
    assert reporter.due()
    fields = reporter.report({"frames": 4000, "lost": 1})
    assert fields["frames_per_s"] == 2000.0
    now[0] = 103.0
    assert reporter.report({"frames": 4500, "lost": 1})["frames_per_s"] == 500.0
    first = out.getvalue().splitlines()[0]
    assert first.startswith("svc,detector_name=d,module_id=1 frames=4000i,lost=1i,frames_per_s=2000.0 ")


def test_the_receivers_influx_line_is_the_one_existing_std_daq_dashboards_read():
    """Pinned: measurement std_udp_recv, tags detector_name and module_id, the legacy integer fields over
    the interval (n_missed_packets, n_corrupted_frames, repetition_rate), then our counters, then ns."""
    from std_udp_recv.receiver import UdpReceiver

    now = [10.0]
    out = io.StringIO()
    reporter = StatsReporter("std_udp_recv", {"detector_name": "JF07T32V01", "module_id": "3"}, 2.0,
                             rates=("frames",), out=out, clock=lambda: now[0],
                             interval_fields=UdpReceiver.interval_fields, time_ns=lambda: 1700000000123456789)
    now[0] = 12.0
    reporter.report({"frames": 200, "incomplete_frames": 3, "lost_packets": 7})
    now[0] = 14.0
    reporter.report({"frames": 401, "incomplete_frames": 4, "lost_packets": 135})
    assert out.getvalue().splitlines() == [
        "std_udp_recv,detector_name=JF07T32V01,module_id=3 n_missed_packets=7i,n_corrupted_frames=3i,"
        "repetition_rate=100i,frames=200i,incomplete_frames=3i,lost_packets=7i,frames_per_s=100.0 "
        "1700000000123456789",
        "std_udp_recv,detector_name=JF07T32V01,module_id=3 n_missed_packets=128i,n_corrupted_frames=1i,"
        "repetition_rate=100i,frames=401i,incomplete_frames=4i,lost_packets=135i,frames_per_s=100.5 "
        "1700000000123456789",
    ]


def test_run_daemon_keeps_prometheus_labels_and_gives_influx_its_own_tags(make_config, monkeypatch, capsys):
    """std-daq status reads the Prometheus labels detector/module; the InfluxDB line has the legacy tags."""
    import argparse
    import os

    from core_buffer import service

    class Receiverish:
        name = "std_udp_recv"
        stats_tags = {"module": "2"}
        influx_tags = {"module_id": "2"}
        rate_counters = ()

        def __init__(self) -> None:
            self.counters = Counters("frames")

        def poll(self, timeout_s: float) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own stop handler ends the loop

        def stop(self) -> None:
            pass

        def close(self) -> None:
            pass

        def stats(self):
            return self.counters.snapshot()

        @staticmethod
        def interval_fields(now, before, elapsed_s):
            return {"n_missed_packets": 0}

    labels = []
    monkeypatch.setattr("core_buffer.metrics.serve_metrics",
                        lambda config, name, tags, snapshot: labels.append(dict(tags)))
    path, config = make_config()
    args = argparse.Namespace(config=str(path), log_level="INFO", stats_interval=1000.0)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert service.run_daemon("std_udp_recv", args, lambda config: Receiverish()) == 0
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert labels == [{"detector": config.detector_name, "module": "2"}]
    assert capsys.readouterr().out.startswith(
        f"std_udp_recv,detector_name={config.detector_name},module_id=2 n_missed_packets=0i,frames=0i,")


def test_influx_line_escapes_tags_and_types_fields():
    line = influx_line("m", {"det name": "a,b"}, {"n": 3, "rate": 1.5, "flag": True}, 17)
    assert line == r"m,det\ name=a\,b n=3i,rate=1.5,flag=1.0 17"


def test_a_signal_during_the_handler_does_not_deadlock():
    """A second SIGTERM while the first handler is inside Event.set (which holds the Event's lock)."""
    from core_buffer.service import install_stop_handlers

    class ReenteredEvent(threading.Event):
        def set(self) -> None:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the next signal arrives right now
            super().set()

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = ReenteredEvent()
    try:
        install_stop_handlers(stop)
        done = threading.Event()

        def deliver() -> None:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
            done.set()

        worker = threading.Thread(target=deliver, daemon=True)
        worker.start()
        assert done.wait(5), "the handler deadlocked on a signal that arrived while it ran"
        assert stop.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_daemon_process_cleanly(signum, tmp_path):
    code = """
        import threading, sys
        from core_buffer.service import Counters, StatsReporter, install_stop_handlers, run, setup_logging
        setup_logging("INFO")

        class Idle:
            name = "idle"
            def __init__(self): self.c = Counters("polls")
            def poll(self, timeout_s):
                self.c.polls += 1
                threading.Event().wait(timeout_s)
            def stop(self): print("stopping", flush=True)
            def close(self): print("closed", flush=True)
            def stats(self): return self.c.snapshot()

        stop = threading.Event()
        install_stop_handlers(stop)
        print("ready", flush=True)
        sys.exit(run(Idle(), stop, StatsReporter("idle", {}, 0.05)))
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines.index("stopping") < lines.index("closed")
    assert lines[-1].startswith("idle polls=")
    assert "idle stopped" in err


@pytest.mark.parametrize("form", ["influx", "keyvalue"])
def test_the_statistics_line_is_printed_in_the_one_form_the_config_names(form, make_config, monkeypatch, capsys):
    """stats_log: the InfluxDB line on stdout (the default, what the dashboards read) or the key=value log
    line, never both (the same figures twice were half of a pipeline's log)."""
    import argparse
    import os

    from core_buffer import service

    class Quiet:
        name = "quiet"

        def __init__(self) -> None:
            self.counters = Counters("frames")

        def poll(self, timeout_s: float) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

        def stop(self) -> None:
            pass

        def close(self) -> None:
            pass

        def stats(self):
            return self.counters.snapshot()

    monkeypatch.setattr("core_buffer.metrics.serve_metrics", lambda *args: None)
    path, config = make_config(**({} if form == "influx" else {"stats_log": form}))
    assert config.stats_log == form
    args = argparse.Namespace(config=str(path), log_level="INFO", stats_interval=1000.0)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert service.run_daemon("quiet", args, lambda config: Quiet()) == 0
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    captured = capsys.readouterr()  # run_daemon's logging goes to stderr
    logged = [line.split(" INFO: ", 1)[1] for line in captured.err.splitlines() if " INFO: stats " in line]
    if form == "influx":
        assert captured.out.startswith(f"quiet,detector_name={config.detector_name} frames=0i,loop_errors=0i ")
        assert logged == []
    else:
        assert captured.out == ""
        assert logged == ["stats frames=0 loop_errors=0"]


def test_a_config_with_an_unknown_statistics_form_is_refused_naming_the_key(make_config):
    from core_buffer.errors import ConfigError

    with pytest.raises(ConfigError, match="config key 'stats_log' = 'both' is invalid; expected one of 'influx', "
                                          "'keyvalue'"):
        make_config(stats_log="both")


@pytest.mark.parametrize("service,role", [("std_h5_writer", "h5_writer"), ("std_assembler", "image_producer")])
def test_a_second_daemon_of_a_role_is_refused_before_it_binds_and_the_first_cleans_up_when_it_stops(
        service, role, make_config):
    """A second copy of a service of one detector: refused at start naming the first, which keeps its socket
    file (a bind would have replaced it) and its segment; the first, stopped, leaves no socket or lock file.
    (std_h5_writer has a lock of its own besides, on its record directory; std_assembler has none.)"""
    import os

    from core_buffer.locks import role_lock, service_role
    from core_buffer.ringbuffer import SHM_DIR, shm_name
    from std_daq.launcher import console_script, remove_buffers

    path, config = make_config()
    (socket_file,) = service_role(service).socket_files(config)
    lock_file = role_lock(config, service_role(service)).path
    segment = os.path.join(SHM_DIR, shm_name(config, "images"))
    first = subprocess.Popen([console_script(service), str(path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (os.path.exists(socket_file) and os.path.exists(segment)) and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        bound = os.stat(socket_file).st_ino
        created = os.stat(segment).st_ino
        second = subprocess.run([console_script(service), str(path)], capture_output=True, text=True, timeout=60)
        assert second.returncode == 1, second.stderr
        assert (f"{service}: not starting: the {role} role of detector {config.detector_name} is held by "
                f"pid {first.pid} (") in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None
        assert os.stat(socket_file).st_ino == bound  # not replaced by a second bind
        assert os.stat(segment).st_ino == created
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=30)
        remove_buffers(config)
    assert first.returncode == 0, err
    assert not os.path.exists(socket_file), f"{service} left its ipc socket file"
    assert not os.path.exists(lock_file), f"{service} left its role lock file"
