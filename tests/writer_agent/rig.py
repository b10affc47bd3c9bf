"""writer_agent and std_h5_writer as real processes around a real ImageBuffer fed by a test producer, for
the writer_agent tests and the std-daq write/kill/monitor tests."""
from __future__ import annotations

import os
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core_buffer import broker
from core_buffer.ipc import image_metadata_address, ipc_path, store_stream_address, writer_status_address
from core_buffer.metrics import metrics_endpoint
from std_daq.client import DaqClient, progress_of
from std_daq.launcher import console_script
from tests.conftest import free_tcp_port_block
from tests.producer import ImageProducer
from tests.writer_agent.broker_proxy import BrokerProxy

READY_S = 20.0


class Service:
    def __init__(self, name: str, config_path: Path, log_path: Path, url: str) -> None:
        self.name, self.config_path, self.log_path, self.url = name, config_path, log_path, url
        self.proc: subprocess.Popen | None = None

    def start(self, ready_text: str) -> None:
        """Start the console script and wait until its log shows `ready_text` (in this run's part of the log)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "a")
        env = {**os.environ, broker.URL_ENV: self.url}
        self.proc = subprocess.Popen([console_script(self.name), str(self.config_path)], stdout=subprocess.DEVNULL,
                                     stderr=log, stdin=subprocess.DEVNULL, env=env)
        log.close()
        deadline = time.monotonic() + READY_S
        while ready_text not in self.log_since(offset):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill_9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


class Rig:
    """The producer, std_h5_writer and writer_agent of one test detector, and a DaqClient on the broker.
    `agent_url` lets the agent reach the broker another way than the client (through a proxy)."""

    def __init__(self, config_path, config, tmp_path, url, skip_sequence_every=0, agent_url=None):
        self.config, self.url = config, url
        self.out = Path(config.output_dirs[0])
        self.tag = config.detector_name
        self.producer = ImageProducer(config, skip_sequence_every=skip_sequence_every)
        self.writer = Service("std_h5_writer", config_path, tmp_path / "writer.log", url)
        self.agent = Service("writer_agent", config_path, tmp_path / "agent.log", agent_url or url)
        self.client: DaqClient | None = None
        try:
            self.writer.start("std_h5_writer running")
            self.agent.start("serving tag")
            self.client = DaqClient(url)
        except BaseException:
            self.close()
            raise

    def logs(self) -> str:
        return self.agent.log_path.read_text()[-3000:] + "\n" + self.writer.log_path.read_text()[-2000:]

    def agent_stats(self) -> dict[str, int]:
        """writer_agent's counters now, from its Prometheus endpoint (the same as its statistics line)."""
        host, port = metrics_endpoint(self.config, "writer_agent")
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        prefix = "std_daq_writer_agent_"
        return {sample.name[len(prefix):]: int(sample.value) for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name.startswith(prefix)}

    def close(self):
        if self.client is not None:
            self.client.close()
        self.agent.stop()
        self.writer.stop()
        self.producer.images.unlink()  # the producer created the ImageBuffer; services never unlink
        self.producer.close()
        remove_socket_files(self.config)


def remove_socket_files(config) -> None:
    """The detector's ipc socket files, once nothing binds them: ZMQ leaves the producer's behind, and a
    service killed -9 its own."""
    for address in (image_metadata_address(config), store_stream_address(config), writer_status_address(config)):
        path = ipc_path(address)
        if path is not None and os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)


@pytest.fixture
def rig(make_config, tmp_path, broker_url):
    """rig(rate_hz=200, skip_sequence_every=0, agent_url=None, writer_status_interval_s=0.2,
    **writer_agent_section) -> a running Rig."""
    made = []

    def factory(rate_hz=200.0, skip_sequence_every=0, agent_url=None, writer_status_interval_s=0.2,
                **agent_section):
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        path, config = make_config(output_dirs=[str(out)], image_buffer_slots=64,
                                   writer_agent={"writer_timeout_s": 3.0, "max_images": 5000, **agent_section},
                                   writer={"status_interval_s": writer_status_interval_s},
                                   metrics={"host": "127.0.0.1", "base_port": free_tcp_port_block(5)})
        made.append(Rig(path, config, tmp_path, broker_url, skip_sequence_every, agent_url))
        if rate_hz:
            made[-1].producer.start(rate_hz)
        return made[-1]

    yield factory
    for r in made:
        r.close()


@pytest.fixture
def proxy():
    """A BrokerProxy to the real broker, for the side of a test that should lose its connection."""
    relay = BrokerProxy()
    yield relay
    relay.close()


def wait_for_status(r: Rig, request_id: str, action: str, n_written: int = 0, timeout_s: float = 15.0) -> None:
    """Until `action` of `request_id` arrived (a progress report saying at least `n_written`); the statuses
    stay queued in the client for a later wait."""
    deadline = time.monotonic() + timeout_s
    while not any(s.request_id == request_id and s.action == action
                  and (action != broker.REQUEST_PROGRESS or progress_of(s)[0] >= n_written)
                  for s in list(r.client.received)):
        assert time.monotonic() < deadline, r.logs()
        r.client.connection.process_data_events(time_limit=0.1)


def wait_for_progress(r: Rig, request_id: str, n_written: int, timeout_s: float = 15.0) -> None:
    wait_for_status(r, request_id, broker.REQUEST_PROGRESS, n_written, timeout_s)
