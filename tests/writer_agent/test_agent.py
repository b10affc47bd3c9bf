"""writer_agent and std_h5_writer as real processes, the real RabbitMQ, a real ImageBuffer fed by a test
producer, real HDF5 files."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from core_buffer import broker
from std_daq.client import DaqClient, NoAgentError, RequestNotTaken, RequestTimeout, progress_of
from tests.e2e.protocol_client import ProtocolClient
from tests.producer import expected_image
from tests.writer_agent.rig import proxy, rig, wait_for_progress, wait_for_status  # noqa: F401 - fixtures

pytestmark = pytest.mark.broker


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
    summary = result.summary
    assert 2 <= summary["sequence_gaps"] <= 4
    # The producer skips sequence numbers, not image ids: the file's ids are consecutive, so no image id
    # is skipped, and the warning names the agent's misses, not images that never reached the ImageBuffer.
    assert (summary["image_id_gaps"], summary["image_ids_skipped"]) == (0, 0), summary
    assert summary["warning"] == f"{summary['sequence_gaps']} images missed by writer_agent (sequence gaps)"


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


def raw_stream(client: DaqClient, request_ids: list[str], timeout_s: float = 30.0) -> list:
    """The client's statuses of `request_ids` in arrival order, as received, until each has had a final one
    (other detectors' statuses on the shared exchange are left out)."""
    stream, open_ids = [], set(request_ids)
    deadline = time.monotonic() + timeout_s
    for status in client.statuses(timeout_s=timeout_s):
        if status.request_id in request_ids:
            stream.append(status)
            if status.action in broker.FINAL_ACTIONS:
                open_ids.discard(status.request_id)
        if not open_ids or time.monotonic() > deadline:
            break
    assert not open_ids, f"no final status for {open_ids}"
    return stream


def test_two_clients_interleaving_requests_each_get_their_own_statuses(rig, broker_url):
    r = rig()
    a, b = r.client, DaqClient(broker_url)
    try:
        order, files = [], {}
        for i in range(2):  # a0, b0, a1, b1: each publish is confirmed before the next one goes
            for name, client in (("a", a), ("b", b)):
                path = str(r.out / f"{name}{i}.h5")
                request_id = client.submit(path, 5, tag=r.tag)
                order.append(request_id)
                files[request_id] = path
        streams = {"a": raw_stream(a, order), "b": raw_stream(b, order)}
    finally:
        b.close()
    for name, stream in streams.items():
        for request_id in order:
            own = [s for s in stream if s.request_id == request_id]
            actions = [s.action for s in own]
            assert actions[0] == broker.REQUEST_START, (name, actions)
            assert actions[-1] == broker.REQUEST_SUCCESS, (name, actions, own[-1].message)
            assert set(actions[1:-1]) <= {broker.REQUEST_PROGRESS}, (name, actions)  # one final, at the end
            assert all(json.loads(s.body)["output_file"] == files[request_id] for s in own)  # its own body
        # Taken in the order submitted (request_start when taken, also behind a running write), and ended
        # in that order.
        starts = [s.request_id for s in stream if s.action == broker.REQUEST_START]
        finals = [s.request_id for s in stream if s.action in broker.FINAL_ACTIONS]
        assert starts == order and finals == order, [(s.request_id[:8], s.action) for s in stream]
    # The status exchange is a fanout: both clients saw the same statuses in the same order.
    as_seen = {name: [(s.request_id, s.action, s.message) for s in stream] for name, stream in streams.items()}
    assert as_seen["a"] == as_seen["b"]
    assert sorted(p.name for p in r.out.iterdir()) == ["a0.h5", "a1.h5", "b0.h5", "b1.h5"]
    # One write at a time, in the order submitted: each file holds images that came after the previous one's.
    id_ranges = []
    for request_id in order:
        with h5py.File(files[request_id], "r") as f:
            ids = f[f"/{r.tag}/image_id"][:]
        id_ranges.append((int(ids.min()), int(ids.max())))
    assert all(id_ranges[k][1] < id_ranges[k + 1][0] for k in range(len(order) - 1)), id_ranges


def test_a_request_queued_behind_a_running_write_is_not_reported_as_not_taken(rig):
    r = rig()
    first = r.client.submit(str(r.out / "first.h5"), 400, tag=r.tag)  # 2 s at 200 Hz
    second = r.client.submit(str(r.out / "second.h5"), 5, tag=r.tag)
    result = r.client.wait(second, timeout_s=30, start_timeout_s=1.0)  # its start comes after the first ends
    assert result.ok, result.message + r.logs()
    assert r.client.wait(first, timeout_s=30).ok


def test_a_request_queued_behind_a_write_whose_writer_hangs_is_not_reported_as_not_taken(rig, broker_url):
    # std_h5_writer's default status interval (1 s): in normal running, between its statuses, the agent's
    # own reports (at least one a second) must not say that it waits for the writer
    r = rig(rate_hz=100, writer_timeout_s=30.0, writer_status_interval_s=1.0)
    first = r.client.submit(str(r.out / "stalled.h5"), 3000, tag=r.tag)
    wait_for_progress(r, first, 150)  # about 2 s of writing
    before = [json.loads(s.message) for s in r.client.received
              if s.request_id == first and s.action == broker.REQUEST_PROGRESS]
    assert not any("waiting_for" in report for report in before if report["state"] == "writing"), before
    os.kill(r.writer.proc.pid, signal.SIGSTOP)  # no writer statuses from here on
    # start_timeout_s 5 s (std_daq.client's default) against the agent's reports every second
    with DaqClient(broker_url, start_timeout_s=5.0) as other:
        try:
            second = other.submit(str(r.out / "queued.h5"), 5, tag=r.tag)
            with pytest.raises(RequestTimeout) as waited:
                other.wait(second, timeout_s=6.0)  # queued all along, behind the hung write
            assert not isinstance(waited.value, RequestNotTaken), str(waited.value)
        finally:
            os.kill(r.writer.proc.pid, signal.SIGCONT)
        busy = [json.loads(s.message) for s in other.received
                if s.request_id == first and s.action == broker.REQUEST_PROGRESS]
        # all sent while the writer was stopped (the client subscribed after the SIGSTOP): from 2 s of its
        # silence on, each says so, about once a second
        waiting = [report for report in busy if report.get("waiting_for") == "std_h5_writer"]
        assert len(waiting) >= 3, busy
        assert len({report["n_written"] for report in waiting}) == 1, waiting  # nothing written meanwhile
        r.client.kill(first, tag=r.tag)
        assert not r.client.wait(first, timeout_s=30).ok
        result = other.wait(second, timeout_s=30)  # its turn came: it was queued, not lost
    assert result.ok, result.message + r.logs()
    assert_file_holds_pattern(r.config, r.out / "queued.h5", 5)


def test_a_client_that_waits_only_after_its_request_succeeded_gets_the_success(rig):
    r = rig()
    request_id = r.client.submit(str(r.out / "late-wait.h5"), 5, tag=r.tag)
    time.sleep(2.5)  # the control system does other things; the statuses wait unread on the connection
    result = r.client.wait(request_id, timeout_s=30, start_timeout_s=1.0)  # not RequestNotTaken
    assert result.ok, result.message + r.logs()
    assert [s.action for s in result.statuses][0] == broker.REQUEST_START


def test_a_writer_that_connects_late_gets_the_images_that_come_after_it_is_ready(rig):
    r = rig(rate_hz=200, writer_timeout_s=30.0)
    r.writer.stop()
    path = r.out / "late-writer.h5"
    request_id = r.client.submit(str(path), 50, tag=r.tag)
    wait_for_status(r, request_id, broker.REQUEST_START)
    time.sleep(1.0)  # 200 images while the agent waits: the buffer (64 slots) no longer holds the first ones
    first_after_ready = r.producer.next_id
    r.writer.start("std_h5_writer running")
    result = r.client.wait(request_id, timeout_s=30)
    assert result.ok, result.message + r.logs()
    summary = result.summary
    assert (summary["images_written"], summary["images_lost"], summary["sequence_gaps"]) == (50, 0, 0), summary
    assert_file_holds_pattern(r.config, path, 50)
    with h5py.File(path, "r") as f:
        assert f[f"/{r.tag}/image_id"][0] >= first_after_ready  # not the images queued while it waited


def test_wait_raises_request_timeout_when_the_final_status_does_not_come_in_time(rig):
    r = rig(rate_hz=0)  # no images: the write is started and never ends
    request_id = r.client.submit(str(r.out / "no-images.h5"), 5, tag=r.tag)
    with pytest.raises(RequestTimeout, match=r"no final status within 1.5 s \(received: request_start") as waited:
        r.client.wait(request_id, timeout_s=1.5)
    assert not isinstance(waited.value, RequestNotTaken)  # it was taken
    r.client.kill(request_id, tag=r.tag)
    killed = r.client.wait(request_id, timeout_s=15)  # the statuses before the timeout are not lost
    assert not killed.ok and "interrupted by a kill after 0 of 5" in killed.message, killed.message


def test_a_request_for_a_tag_nobody_serves_fails_at_once(broker_url, detector_name):
    with DaqClient(broker_url) as daq:
        with pytest.raises(NoAgentError, match=f"no writer_agent serves tag '{detector_name}'"):
            daq.submit("/tmp/x.h5", 5, tag=detector_name)
        with pytest.raises(NoAgentError, match="the kill was returned"):
            daq.kill("some-request", tag=detector_name)


def test_a_queued_request_that_no_agent_takes_raises_request_not_taken(broker_url, detector_name):
    with DaqClient(broker_url) as stuck, DaqClient(broker_url, start_timeout_s=1.0) as daq:
        # A queue bound to the tag that nobody consumes: the request is routed, and then nothing happens,
        # as when an agent's connection breaks while the request waits in its queue.
        queue = stuck.channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
        stuck.channel.queue_bind(queue=queue, exchange=broker.REQUEST_EXCHANGE, routing_key=detector_name)
        request_id = daq.submit("/tmp/x.h5", 5, tag=detector_name)
        with pytest.raises(RequestNotTaken, match="no writer_agent took it within 1 s"):
            daq.wait(request_id, timeout_s=30)


def test_a_kill_before_the_writer_took_the_start_ends_the_request_at_once(rig):
    r = rig(writer_timeout_s=60.0)
    r.writer.stop()
    request_id = r.client.submit(str(r.out / "never.h5"), 5, tag=r.tag)
    wait_for_status(r, request_id, broker.REQUEST_START)
    r.client.kill(request_id, tag=r.tag)
    result = r.client.wait(request_id, timeout_s=15)  # long before writer_timeout_s
    assert not result.ok and "killed before the write started" in result.message, result.message
    assert "std_h5_writer is not connected" not in result.message
    assert not (r.out / "never.h5").exists()
    r.writer.start("std_h5_writer running")
    again = r.client.write(str(r.out / "after-kill.h5"), 5, tag=r.tag, timeout_s=30)
    assert again.ok, again.message + r.logs()


def test_on_sigterm_the_running_and_the_queued_requests_each_get_a_final_status(rig):
    r = rig(rate_hz=50)
    running = r.client.submit(str(r.out / "running.h5"), 2000, tag=r.tag)
    queued = [r.client.submit(str(r.out / f"queued{i}.h5"), 5, tag=r.tag) for i in range(2)]
    wait_for_progress(r, running, 5)
    r.agent.stop()  # SIGTERM, and waits for the agent to exit
    stopped = r.client.wait(running, timeout_s=15)
    assert not stopped.ok and "stopped (SIGTERM) during the write" in stopped.message, stopped.message
    for request_id in queued:
        refused = r.client.wait(request_id, timeout_s=15)
        assert not refused.ok and "writer_agent is stopping" in refused.message, refused.message
        assert [s.action for s in refused.statuses] == [broker.REQUEST_START, broker.REQUEST_FAIL]
    assert sorted(p.name for p in r.out.iterdir()) == ["running.h5"]
    with pytest.raises(NoAgentError):  # the agent is gone: nothing is queued for it any more
        r.client.submit(str(r.out / "after.h5"), 5, tag=r.tag)


def wait_for_agent_log(r, text: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in r.agent.log_path.read_text():
        assert time.monotonic() < deadline, r.logs()
        time.sleep(0.05)


def test_a_write_runs_on_while_the_broker_is_a_blackhole_and_its_final_status_follows(rig, proxy):
    r = rig(rate_hz=200, agent_url=proxy.url(), reconnect_max_s=0.5)
    path = r.out / "blackhole.h5"
    request_id = r.client.submit(str(path), 400, tag=r.tag)  # 2 s at 200 Hz; the buffer holds 0.3 s
    wait_for_status(r, request_id, broker.REQUEST_START)
    proxy.blackhole()  # the agent's connection drops, and its reconnection attempts hang unanswered
    wait_for_agent_log(r, f"request {request_id}: done")
    r.client.connection.process_data_events(time_limit=0.3)
    assert not any(s.request_id == request_id and s.action in broker.FINAL_ACTIONS for s in r.client.received)
    proxy.restore()
    result = r.client.wait(request_id, timeout_s=30)
    assert result.ok, result.message + r.logs()
    summary = result.summary
    assert (summary["images_written"], summary["images_lost"], summary["sequence_gaps"]) == (400, 0, 0), summary
    assert_file_holds_pattern(r.config, path, 400)


def test_a_final_status_owed_when_the_agent_dies_is_published_by_the_next_agent(rig, proxy):
    r = rig(rate_hz=200, agent_url=proxy.url(), reconnect_max_s=0.5)
    request_id = r.client.submit(str(r.out / "owed.h5"), 200, tag=r.tag)  # 1 s at 200 Hz
    wait_for_status(r, request_id, broker.REQUEST_START)
    proxy.blackhole()
    wait_for_agent_log(r, f"request {request_id}: done")
    r.agent.kill_9()  # with the success still unpublished
    r.client.connection.process_data_events(time_limit=0.3)
    assert not any(s.request_id == request_id and s.action in broker.FINAL_ACTIONS for s in r.client.received)
    proxy.restore()
    r.agent.start("serving tag")
    result = r.client.wait(request_id, timeout_s=30)
    assert result.ok and result.summary["images_written"] == 200, result.message + r.logs()
    assert "publishing the request_success the previous writer_agent could not" in r.agent.log_path.read_text()
    record = Path(r.config.ipc_dir) / f"{r.config.namespace}-{r.tag}-writer_agent.inflight.json"
    deadline = time.monotonic() + 10
    while record.exists():  # removed once the broker confirmed the owed status
        assert time.monotonic() < deadline, record.read_text()
        time.sleep(0.05)
    again = r.client.write(str(r.out / "after-restart.h5"), 5, tag=r.tag, timeout_s=30)
    assert again.ok, again.message


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


def test_images_that_cannot_be_handed_to_a_dead_writer_are_counted_in_the_failure(rig):
    r = rig(rate_hz=200, writer_timeout_s=2.0)
    request_id = r.client.submit(str(r.out / "writer-dies.h5"), 3000, tag=r.tag)
    wait_for_progress(r, request_id, 5)
    r.writer.kill_9()  # the StoreStream has no peer from here on: each image the agent gets is dropped
    result = r.client.wait(request_id, timeout_s=30)
    assert not result.ok and "std_h5_writer sent no status for 2 s" in result.message, result.message
    dropped = re.search(r"(\d+) more could not be handed to it", result.message)
    assert dropped and int(dropped.group(1)) > 0, result.message
    r.writer.start("std_h5_writer running")
    again = r.client.write(str(r.out / "after-crash.h5"), 5, tag=r.tag, timeout_s=30)
    assert again.ok and again.summary["images_dropped"] == 0, again.message + r.logs()


def test_a_missing_writer_fails_the_request_after_the_timeout_and_the_agent_recovers(rig):
    r = rig()
    r.writer.stop()
    failed = r.client.write(str(r.out / "nowriter.h5"), 5, tag=r.tag, timeout_s=30)
    assert not failed.ok and "std_h5_writer" in failed.message and "is it running?" in failed.message
    r.writer.start("std_h5_writer running")
    ok = r.client.write(str(r.out / "writer-back.h5"), 5, tag=r.tag, timeout_s=30)
    assert ok.ok, ok.message + r.logs()
