"""Whole pipelines of real processes: the launcher starts the services from their console scripts,
std_udp_sim sends real UDP on loopback, writes go through the real RabbitMQ, files are real HDF5."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from core_buffer.config import DetectorConfig
from std_daq import status
from std_daq.launcher import Launcher, ServiceSpec, console_script, pipeline_services, remove_buffers
from tests.conftest import free_tcp_port_block
from tests.e2e.protocol_client import ProtocolClient

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0  # a safety limit: every service stops well within its 15 s grace period


class Pipeline:
    """One detector's services under the launcher, plus the simulator and a protocol client."""

    def __init__(self, config_path: Path, config: DetectorConfig, workdir: Path) -> None:
        self.config_path, self.config, self.workdir = config_path, config, workdir
        self.log_path = workdir / f"{config.detector_name}-services.log"
        self._log = open(self.log_path, "w", buffering=1)
        self.launcher: Launcher | None = None
        self.sims: list[subprocess.Popen] = []
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, without: tuple[str, ...] = (), specs: list[ServiceSpec] | None = None) -> None:
        if specs is None:
            specs = [s for s in pipeline_services(str(self.config_path), self.config) if s.label not in without]
        self.launcher = Launcher(specs, output=self._log, cleanup=lambda: remove_buffers(self.config))
        self.launcher.start()
        self._watcher = threading.Thread(target=self._watch, daemon=True)  # restarts crashed services
        self._watcher.start()
        self.wait_ready()

    def _watch(self) -> None:
        while not self._stop_watching.wait(0.2):
            self.launcher.watch_once()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until every service of the pipeline answers on its metrics endpoint."""
        labels = {c.spec.label for c in self.launcher.children}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            down = [m.label for m in status.scrape(self.config)
                    if m.values is None and _launcher_label(m.label) in labels]
            if not down:
                return
            time.sleep(0.2)
        raise AssertionError(f"services not up after {timeout_s} s: {down}\n{self.log_tail()}")

    def pid(self, label: str) -> int:
        return next(c.process.pid for c in self.launcher.children if c.spec.label == label)

    def metrics(self) -> dict[str, dict[str, float]]:
        return {m.label: m.values or {} for m in status.scrape(self.config)}

    def simulate(self, *args: str) -> subprocess.Popen:
        sim = subprocess.Popen([console_script("std_udp_sim"), str(self.config_path), *args],
                               stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.sims.append(sim)
        return sim

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-n:])

    def stop(self) -> None:
        for sim in self.sims:
            if sim.poll() is None:
                sim.terminate()
            try:
                sim.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()
        self._stop_watching.set()
        if self._watcher is not None:
            self._watcher.join()
        if self.launcher is not None:
            self.launcher.stop()
            self.launcher = None
        self._log.close()


class Output:
    """A process's output, read line by line in a thread so the pipe never fills."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = READY_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text())
            if match:
                return match
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in the output:\n{self.text()[-4000:]}")

    def join(self) -> None:
        self._thread.join(timeout=10)


def wait_until_up(config: DetectorConfig, output: Output, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until every service the config runs answers on its metrics endpoint."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        down = [m.label for m in status.scrape(config) if m.values is None]
        if not down:
            return
        time.sleep(0.2)
    raise AssertionError(f"services not answering after {timeout_s} s: {down}\n{output.text()[-6000:]}")


class StdDaqUp:
    """`std-daq up CONFIG` as an operator runs it: the installed console script, a process of its own."""

    def __init__(self, config_path: Path, broker_url: str) -> None:
        std_daq = shutil.which("std-daq")
        assert std_daq, "the std-daq console script is not installed (pip install -e .)"
        self.process = subprocess.Popen([std_daq, "up", str(config_path)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                        env={**os.environ, "STD_DAQ_BROKER_URL": broker_url})
        self.output = Output(self.process.stdout)

    def stop(self) -> int:
        """SIGTERM, as systemd or an operator's kill sends it; the launcher's exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.output.join()
        self.process.stdout.close()
        return code


@pytest.fixture
def std_daq_up(broker_url: str) -> Iterator[Any]:
    """Starts `std-daq up CONFIG` processes; any still running at the end is stopped with SIGTERM."""
    started: list[StdDaqUp] = []

    def factory(config_path: Path) -> StdDaqUp:
        up = StdDaqUp(config_path, broker_url)
        started.append(up)
        return up

    yield factory
    for up in started:
        if not up.process.stdout.closed:
            up.stop()


def _launcher_label(metrics_label: str) -> str:
    """The launcher's label of a service from its metrics label (std_udp_recv-0 -> udp_recv-0)."""
    return {"std_assembler": "assembler", "std_h5_writer": "h5_writer", "std_stream_send": "stream_send",
            "std_stream_recv": "stream_recv"}.get(metrics_label, metrics_label.removeprefix("std_"))


@pytest.fixture
def pipeline_config(make_config: Any, tmp_path: Path) -> Any:
    """make_config for pipelines: output into tmp_path, metrics on free ports, short stats interval."""

    def factory(**overrides: Any) -> tuple[Path, DetectorConfig]:
        n_modules = overrides.get("n_modules", 1)
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        overrides.setdefault("output_dirs", [str(out)])
        overrides.setdefault("metrics", {"host": "127.0.0.1", "base_port": free_tcp_port_block(11 + n_modules)})
        overrides.setdefault("frame_buffer_slots", 32)
        overrides.setdefault("image_buffer_slots", 64)
        return make_config(**overrides)

    return factory


@pytest.fixture
def pipelines(tmp_path: Path) -> Iterator[Any]:
    started: list[Pipeline] = []

    def factory(config_path: Path, config: DetectorConfig, **start_args: Any) -> Pipeline:
        pipe = Pipeline(config_path, config, tmp_path)
        started.append(pipe)
        pipe.start(**start_args)
        return pipe

    yield factory
    for pipe in reversed(started):
        pipe.stop()


@pytest.fixture
def client(broker_url: str) -> Iterator[ProtocolClient]:
    c = ProtocolClient(broker_url)
    yield c
    c.close()
