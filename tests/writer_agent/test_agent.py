"""writer_agent and std_h5_writer as real processes, the real RabbitMQ, a real ImageBuffer fed by a test
producer, real HDF5 files."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from core_buffer import broker
from std_daq.client import DaqClient, progress_of
from std_daq.launcher import console_script
from tests.e2e.protocol_client import ProtocolClient
from tests.producer import ImageProducer, expected_image

READY_S = 20.0


class Service:
    def __init__(self, name: str, config_path: Path, log_path: Path, url: str) -> None:
        self.name, self.config_path, self.log_path, self.url = name, config_path, log_path, url
        self.proc: subprocess.Popen | None = None

    def start(self, ready_text: str) -> None:
        log = open(self.log_path, "a")
        env = {**os.environ, broker.URL_ENV: self.url}
        self.proc = subprocess.Popen([console_script(self.name), str(self.config_path)], stdout=subprocess.DEVNULL,
                                     stderr=log, stdin=subprocess.DEVNULL, env=env)
        log.close()
        deadline = time.monotonic() + READY_S
        while ready_text not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Rig:
    def __init__(self, config_path, config, tmp_path, url, skip_sequence_every=0):
        self.config, self.url = config, url
        self.out = Path(config.output_dirs[0])
        self.tag = config.detector_name
        self.producer = ImageProducer(config, skip_sequence_every=skip_sequence_every)
        self.writer = Service("std_h5_writer", config_path, tmp_path / "writer.log", url)
        self.agent = Service("writer_agent", config_path, tmp_path / "agent.log", url)
        self.writer.start("std_h5_writer running")
        self.agent.start("serving tag")
        self.client = DaqClient(url)

    def logs(self) -> str:
        return self.agent.log_path.read_text()[-3000:] + "\n" + self.writer.log_path.read_text()[-2000:]

    def close(self):
        self.client.close()
        self.agent.stop()
        self.writer.stop()
        self.producer.close()


@pytest.fixture
def rig(make_config, tmp_path, broker_url):
    made = []

    def factory(rate_hz=200.0, skip_sequence_every=0, **agent_section):
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        path, config = make_config(output_dirs=[str(out)], image_buffer_slots=64,
                                   writer_agent={"writer_timeout_s": 3.0, "max_images": 5000, **agent_section},
                                   writer={"status_interval_s": 0.2})
        made.append(Rig(path, config, tmp_path, broker_url, skip_sequence_every))
        if rate_hz:
            made[-1].producer.start(rate_hz)
        return made[-1]

    yield factory
    for r in made:
        r.close()


def wait_for_progress(r, request_id, n_written, timeout_s=15.0):
    """Until a progress report of `request_id` says at least `n_written` (its statuses stay queued)."""
    deadline = time.monotonic() + timeout_s
    while not any(s.request_id == request_id and s.action == broker.REQUEST_PROGRESS
                  and progress_of(s)[0] >= n_written for s in list(r.client.received)):
        assert time.monotonic() < deadline, r.logs()
        r.client.connection.process_data_events(time_limit=0.1)


def assert_file_holds_pattern(config, path, n_expected=None):
    with h5py.File(path, "r") as f:
        data = f["/entry/data/data"]
        ids = f[f"/{config.detector_name}/image_id"][:]
        if n_expected is not None:
            assert data.shape[0] == n_expected
        assert data.shape[0] == ids.size > 0
        assert np.all(np.diff(ids.astype(np.int64)) == 1)  # the next n images, none skipped
        for i in (0, data.shape[0] // 2, data.shape[0] - 1):
            assert np.array_equal(data[i], expected_image(config, int(ids[i])))
        return dict(f.attrs), data.shape[0]


def test_a_write_succeeds_and_the_file_holds_the_next_n_images(rig):
    r = rig()
    path = r.out / "run1.h5"
    statuses = []
    result = r.client.write(str(path), 40, tag=r.tag, timeout_s=30, on_status=statuses.append)
    assert result.ok, result.message + r.logs()
    summary = result.summary
    assert (summary["images_written"], summary["images_lost"], summary["output_file"]) == (40, 0, str(path))
    actions = [s.action for s in statuses]
    assert actions[0] == broker.REQUEST_START and actions[-1] == broker.REQUEST_SUCCESS
    assert {s.source for s in statuses} == {"writer_agent"}
    assert all(json.loads(s.body)["output_file"] == str(path) for s in statuses)  # the original body
    assert all(0 <= progress_of(s)[0] <= 40 for s in statuses if s.action == broker.REQUEST_PROGRESS)
    attrs, _ = assert_file_holds_pattern(r.config, path, 40)


def test_sequence_gaps_reaching_the_agent_are_counted_and_reported(rig):
    r = rig(skip_sequence_every=10)
    result = r.client.write(str(r.out / "gaps.h5"), 30, tag=r.tag, timeout_s=30)
    assert result.ok, result.message
    assert 2 <= result.summary["sequence_gaps"] <= 4


BAD_REQUESTS = [
    (b"not json at all", "not JSON"),
    (b"\xff\xfe\x00", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"n_images": 5}).encode(), "lacks the key 'output_file'"),
    (json.dumps({"output_file": "{out}/a.h5"}).encode(), "lacks the key 'n_images'"),
    (json.dumps({"output_file": "{out}/a.h5", "n_images": "5"}).encode(), "'n_images' must be an integer"),
    (json.dumps({"output_file": "{out}/a.h5", "n_images": True}).encode(), "'n_images' must be an integer"),
    (json.dumps({"output_file": "{out}/a.h5", "n_images": 0}).encode(), "between 1 and 5000"),
    (json.dumps({"output_file": "{out}/a.h5", "n_images": 10**30}).encode(), "between 1 and 5000"),
    (json.dumps({"output_file": "{out}/a.h5", "n_images": 5, "run_id": -1}).encode(), "'run_id' must be between"),
    (json.dumps({"output_file": "{out}/a.h5", "n_images": 5, "user_id": 1.5}).encode(), "'user_id' must be an integer"),
    (json.dumps({"output_file": 17, "n_images": 5}).encode(), "'output_file' must be a string"),
    (json.dumps({"output_file": "relative/a.h5", "n_images": 5}).encode(), "absolute path"),
    (json.dumps({"output_file": "/etc/std-daq-test.h5", "n_images": 5}).encode(), "outside the allowed"),
    (json.dumps({"output_file": "{out}/../escape.h5", "n_images": 5}).encode(), "outside the allowed"),
    (json.dumps({"output_file": "{out}/missing/a.h5", "n_images": 5}).encode(), "does not exist"),
    (json.dumps({"output_file": "{out}/exists.h5", "n_images": 5}).encode(), "already exists"),
    (json.dumps({"output_file": "{out}/\u00e9t\u00e9/\U0001f600.h5", "n_images": 5}).encode(), "does not exist"),
    (json.dumps({"output_file": "{out}/" + "x" * 5000, "n_images": 5}).encode(), "at most 4096"),
    (b"{" * 100000, "at most 65536"),
]


def test_each_bad_request_fails_with_its_own_reason_and_the_agent_keeps_serving(rig):
    r = rig()
    (r.out / "exists.h5").write_bytes(b"")
    ids = []
    for body, _reason in BAD_REQUESTS:
        ids.append(r.client.submit_raw(body.replace(b"{out}", str(r.out).encode()), tag=r.tag))
    for request_id, (_body, reason) in zip(ids, BAD_REQUESTS):
        result = r.client.wait(request_id, timeout_s=15)
        assert not result.ok and reason in result.message, (reason, result.message)
        assert [s.action for s in result.statuses] == [broker.REQUEST_START, broker.REQUEST_FAIL]
    assert sorted(p.name for p in r.out.iterdir()) == ["exists.h5"]  # nothing else changed
    good = r.client.write(str(r.out / "after.h5"), 5, tag=r.tag, timeout_s=30)
    assert good.ok, good.message


def test_the_existing_protocol_client_works_unchanged(rig, broker_url):
    r = rig()
    client = ProtocolClient(broker_url)
    try:
        request_id = client.send_write(r.tag, {"output_file": str(r.out / "proto.h5"), "n_images": 10,
                                               "user_id": 0, "run_id": 7})
        outcome = client.wait(request_id, timeout_s=30)
    finally:
        client.close()
    assert outcome.succeeded, outcome.message
    assert outcome.actions[0] == "request_start" and outcome.sources == {"writer_agent"}
    with h5py.File(r.out / "proto.h5", "r") as f:
        assert f["/entry/data/data"].shape[0] == 10


def test_kill_mid_write_leaves_a_valid_trimmed_file_and_a_killed_queued_request_fails(rig):
    r = rig(rate_hz=50)
    running = r.client.submit(str(r.out / "long.h5"), 2000, tag=r.tag)
    queued = r.client.submit(str(r.out / "queued.h5"), 5, tag=r.tag)
    wait_for_progress(r, running, 10)
    r.client.kill(queued, tag=r.tag)
    r.client.kill(running, tag=r.tag)
    killed = r.client.wait(running, timeout_s=15)
    assert not killed.ok and "interrupted by a kill" in killed.message
    attrs, n = assert_file_holds_pattern(r.config, r.out / "long.h5")
    assert 10 <= n < 2000 and attrs["state"] == "interrupted"
    later = r.client.wait(queued, timeout_s=15)
    assert not later.ok and "killed before it started" in later.message
    assert not (r.out / "queued.h5").exists()


def test_two_clients_interleaving_requests_each_get_their_own_statuses(rig, broker_url):
    r = rig()
    other = DaqClient(broker_url)
    try:
        mine = [r.client.submit(str(r.out / f"a{i}.h5"), 5, tag=r.tag) for i in range(2)]
        theirs = [other.submit(str(r.out / f"b{i}.h5"), 5, tag=r.tag) for i in range(2)]
        results = [r.client.wait(i, timeout_s=30) for i in reversed(mine)]
        results += [other.wait(i, timeout_s=30) for i in theirs]
    finally:
        other.close()
    assert all(res.ok for res in results), [res.message for res in results]
    for res in results:
        assert {s.request_id for s in res.statuses} == {res.request_id}
    assert sorted(p.name for p in r.out.iterdir()) == ["a0.h5", "a1.h5", "b0.h5", "b1.h5"]


def _close_agent_connection(tag: str) -> None:
    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "--no-table-headers", "pid",
                              "client_properties"], capture_output=True, text=True, timeout=30).stdout
    pids = [line.split("\t")[0] for line in listing.splitlines() if f"writer_agent {tag}" in line]
    assert pids, listing
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "closed by a std-daq test"],
                       check=True, capture_output=True, timeout=30)


def test_a_connection_closed_by_the_broker_does_not_lose_the_running_requests_final_status(rig):
    r = rig(rate_hz=100, reconnect_max_s=0.5)
    request_id = r.client.submit(str(r.out / "through-outage.h5"), 300, tag=r.tag)
    wait_for_progress(r, request_id, 1)
    _close_agent_connection(r.tag)
    result = r.client.wait(request_id, timeout_s=30)
    assert result.ok, result.message + r.logs()
    assert result.summary["images_written"] == 300
    assert "connection lost" in r.agent.log_path.read_text()
    assert_file_holds_pattern(r.config, r.out / "through-outage.h5", 300)
    again = r.client.write(str(r.out / "after-outage.h5"), 5, tag=r.tag, timeout_s=30)  # serving again
    assert again.ok, again.message


def test_a_missing_writer_fails_the_request_after_the_timeout_and_the_agent_recovers(rig):
    r = rig()
    r.writer.stop()
    failed = r.client.write(str(r.out / "nowriter.h5"), 5, tag=r.tag, timeout_s=30)
    assert not failed.ok and "std_h5_writer" in failed.message and "is it running?" in failed.message
    r.writer.start("std_h5_writer running")
    ok = r.client.write(str(r.out / "writer-back.h5"), 5, tag=r.tag, timeout_s=30)
    assert ok.ok, ok.message + r.logs()
