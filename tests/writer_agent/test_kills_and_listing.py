"""Kills by prefix and of the current write, their answers, the request listing, request_start when a request
is taken, and the counters of killed requests (issue 21). writer_agent and std_h5_writer as real processes,
the real RabbitMQ, a real ImageBuffer fed by a test producer, real HDF5 files.

Kills and queries are published here on the client's channel with exactly the correlation_id and headers
of docs/writer_agent.md, and the answers picked from the status exchange by hand: these tests check the
agent's side of the protocol, not a client's."""
from __future__ import annotations

import json
import time
import uuid

import h5py
import pika
import pytest

from core_buffer import broker
from core_buffer.broker import StatusMessage
from tests.writer_agent.rig import Rig, rig, wait_for_progress, wait_for_status  # noqa: F401 - fixture

pytestmark = pytest.mark.broker

KILL_ANSWERS = ("kill_accepted", "kill_refused")  # the protocol's words, spelled out (not imported)
LONG = 2000  # images of a write that runs until it is killed (40 s at 50 Hz)


def publish(r: Rig, exchange: str, correlation_id: str, body: bytes, headers: dict | None = None) -> None:
    r.client.channel.basic_publish(exchange=exchange, routing_key=r.tag, body=body, mandatory=True,
                                   properties=pika.BasicProperties(correlation_id=correlation_id, headers=headers))


def answer(r: Rig, correlation_id: str, actions: tuple[str, ...], timeout_s: float = 10.0) -> StatusMessage:
    """The first status with `correlation_id` and one of `actions` (it stays in the client's queue)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for status in list(r.client.received):
            if status.request_id == correlation_id and status.action in actions:
                return status
        assert time.monotonic() < deadline, f"no {'/'.join(actions)} for {correlation_id!r}\n" + r.logs()
        r.client.connection.process_data_events(time_limit=0.05)


def kill(r: Rig, target: str) -> StatusMessage:
    """Send a kill with correlation_id `target` and return the agent's answer to it."""
    publish(r, broker.KILL_EXCHANGE, target, b"")
    return answer(r, target, KILL_ANSWERS)


def final(r: Rig, request_id: str, timeout_s: float = 15.0) -> StatusMessage:
    return answer(r, request_id, broker.FINAL_ACTIONS, timeout_s)


def submit_with_id(r: Rig, request_id: str, name: str, n_images: int) -> str:
    publish(r, broker.REQUEST_EXCHANGE, request_id,
            json.dumps({"output_file": str(r.out / name), "n_images": n_images}).encode())
    return request_id


def running_and_queued(r: Rig, n_queued: int = 1) -> tuple[str, list[str]]:
    """A long write running (some images written), and `n_queued` short ones submitted behind it."""
    running = r.client.submit(str(r.out / "running.h5"), LONG, tag=r.tag)
    wait_for_progress(r, running, 2)
    queued = [r.client.submit(str(r.out / f"queued{i}.h5"), 5, tag=r.tag) for i in range(n_queued)]
    for request_id in queued:
        wait_for_status(r, request_id, broker.REQUEST_START)
    return running, queued


def has_final(r: Rig, request_id: str) -> bool:
    return any(s.request_id == request_id and s.action in broker.FINAL_ACTIONS for s in list(r.client.received))


def test_a_kill_by_a_unique_prefix_stops_the_running_write_and_names_its_full_id(rig):
    r = rig(rate_hz=50)
    running = r.client.submit(str(r.out / "prefix.h5"), LONG, tag=r.tag)
    wait_for_progress(r, running, 5)
    accepted = kill(r, running[:8])  # what std-daq monitor shows
    assert (accepted.action, accepted.message, accepted.source) == ("kill_accepted", running, "writer_agent")
    ended = final(r, running)
    assert ended.action == broker.REQUEST_FAIL and "interrupted by a kill" in ended.message, ended.message
    with h5py.File(r.out / "prefix.h5", "r") as f:
        assert 5 <= f["/entry/data/data"].shape[0] < LONG and f.attrs["state"] == "interrupted"


def test_a_kill_by_prefix_ends_a_queued_request_at_once_and_the_running_write_goes_on(rig):
    r = rig(rate_hz=50)
    running, (queued,) = running_and_queued(r)
    accepted = kill(r, queued[:6])
    assert (accepted.action, accepted.message) == ("kill_accepted", queued)
    ended = final(r, queued)  # at once, not when its turn would have come
    assert ended.action == broker.REQUEST_FAIL and "killed before it started" in ended.message, ended.message
    assert not has_final(r, running)
    wait_for_progress(r, running, 10)  # still writing
    assert kill(r, running).action == "kill_accepted"
    assert "interrupted by a kill" in final(r, running).message
    assert not (r.out / "queued0.h5").exists()


def test_kill_current_stops_the_running_write_and_the_queued_one_runs_next(rig):
    r = rig(rate_hz=50)
    running, (queued,) = running_and_queued(r)
    accepted = kill(r, "current")
    assert (accepted.action, accepted.message) == ("kill_accepted", running)
    assert "interrupted by a kill" in final(r, running).message
    ended = final(r, queued)
    assert ended.action == broker.REQUEST_SUCCESS, ended.message + r.logs()
    with h5py.File(r.out / "queued0.h5", "r") as f:
        assert f["/entry/data/data"].shape[0] == 5


def test_kills_of_a_finished_an_unknown_and_no_running_request_are_refused_saying_why(rig):
    r = rig()
    done = r.client.write(str(r.out / "done.h5"), 5, tag=r.tag, timeout_s=30)
    assert done.ok, done.message
    refused = kill(r, done.request_id)
    assert refused.action == "kill_refused", refused.message
    assert refused.message == (f"no running or queued request {done.request_id} (request {done.request_id} "
                               "finished already: request_success)")
    unknown = str(uuid.uuid4())
    refused = kill(r, unknown)
    assert (refused.action, refused.message) == (
        "kill_refused", f"no running or queued request {unknown} (finished already, or unknown)")
    refused = kill(r, "current")
    assert (refused.action, refused.message) == ("kill_refused", "no write is running")
    refused = kill(r, "abc")
    assert refused.action == "kill_refused" and "at least 4 characters" in refused.message
    with h5py.File(r.out / "done.h5", "r") as f:  # the finished file is untouched
        assert f["/entry/data/data"].shape[0] == 5


def test_an_ambiguous_prefix_is_refused_naming_the_requests_it_matches(rig):
    r = rig(rate_hz=50)
    first = submit_with_id(r, f"feedbeef-{uuid.uuid4()}", "first.h5", LONG)
    wait_for_progress(r, first, 2)
    second = submit_with_id(r, f"feedbeef-{uuid.uuid4()}", "second.h5", 5)
    wait_for_status(r, second, broker.REQUEST_START)
    refused = kill(r, "feedbeef")
    assert (refused.action, refused.message) == (
        "kill_refused", f"prefix feedbeef matches 2 requests: {first}, {second}")
    assert not has_final(r, first) and not has_final(r, second)  # neither was stopped
    assert kill(r, second).action == "kill_accepted"
    assert kill(r, first[:12]).action == "kill_accepted"
    assert "killed before it started" in final(r, second).message
    assert "interrupted by a kill" in final(r, first).message


def query_requests(r: Rig) -> tuple[str, list[dict]]:
    query_id = str(uuid.uuid4())
    publish(r, broker.REQUEST_EXCHANGE, query_id, b"{}", headers={"query": "requests"})
    listed = answer(r, query_id, ("request_list", *broker.FINAL_ACTIONS))
    assert listed.action == "request_list", f"{listed.action}: {listed.message}"
    assert listed.source == "writer_agent"
    return query_id, json.loads(listed.message)


def test_the_listing_shows_the_running_request_then_the_queued_ones_in_order(rig):
    r = rig(rate_hz=50)
    _, idle = query_requests(r)
    assert idle == []
    running, queued = running_and_queued(r, n_queued=2)
    query_id, listed = query_requests(r)
    assert [(item["request_id"], item["state"]) for item in listed] == [
        (running, "running"), (queued[0], "queued"), (queued[1], "queued")]
    assert listed[0]["output_file"] == str(r.out / "running.h5") and listed[0]["n_images"] == LONG
    assert 0 <= listed[0]["n_written"] <= LONG
    assert [(item["output_file"], item["n_images"], item["n_written"]) for item in listed[1:]] == [
        (str(r.out / "queued0.h5"), 5, 0), (str(r.out / "queued1.h5"), 5, 0)]
    assert set(listed[0]) == {"request_id", "state", "output_file", "n_images", "n_written"}
    # the query is not a write: no request_start, nothing counted as a request
    assert not any(s.request_id == query_id and s.action == broker.REQUEST_START for s in list(r.client.received))
    assert r.agent_stats()["requests"] == 3
    for request_id in (*queued, running):
        assert kill(r, request_id).action == "kill_accepted"
    assert "interrupted by a kill" in final(r, running).message


def test_a_queued_request_gets_its_request_start_when_taken_before_the_running_write_ends(rig):
    r = rig(rate_hz=50)
    running = r.client.submit(str(r.out / "running.h5"), LONG, tag=r.tag)
    wait_for_progress(r, running, 2)
    queued = r.client.submit(str(r.out / "queued.h5"), 5, tag=r.tag)
    wait_for_status(r, queued, broker.REQUEST_START, timeout_s=10)  # the running write has 38 s to go
    assert not has_final(r, running)
    start = answer(r, queued, (broker.REQUEST_START,))
    assert start.message == "request taken by writer_agent; 1 request ahead of it"
    assert kill(r, running).action == "kill_accepted"
    result = r.client.wait(queued, timeout_s=30)  # then it runs, with exactly one start and one final
    assert result.ok, result.message + r.logs()
    actions = [s.action for s in result.statuses]
    assert actions[0] == broker.REQUEST_START and actions.count(broker.REQUEST_START) == 1
    assert [a for a in actions if a in broker.FINAL_ACTIONS] == [broker.REQUEST_SUCCESS]


def test_a_request_killed_while_queued_is_counted_as_killed_not_rejected(rig):
    r = rig(rate_hz=50)
    running = r.client.submit(str(r.out / "running.h5"), LONG, tag=r.tag)
    wait_for_progress(r, running, 2)
    queued = r.client.submit(str(r.out / "queued.h5"), 5, tag=r.tag)
    # (The broker has the request queued for the agent before it confirms it to the client, and delivers it
    # before the kill that is published after that confirm.)
    r.client.kill(queued, tag=r.tag)
    r.client.kill(running, tag=r.tag)
    assert "killed before it started" in r.client.wait(queued, timeout_s=15).message
    assert "interrupted by a kill" in r.client.wait(running, timeout_s=15).message
    stats = r.agent_stats()
    assert (stats["requests"], stats["requests_killed"], stats["requests_rejected"], stats["requests_failed"],
            stats["requests_succeeded"]) == (2, 2, 0, 2, 0), stats
    bad = r.client.write("relative.h5", 5, tag=r.tag, timeout_s=30)  # a rejected one, for contrast
    assert not bad.ok
    stats = r.agent_stats()
    assert (stats["requests_killed"], stats["requests_rejected"], stats["requests_failed"]) == (2, 1, 3), stats


def test_queued_requests_of_an_agent_killed_9_get_their_final_status_from_the_next_agent(rig):
    r = rig(rate_hz=50)
    running, queued = running_and_queued(r, n_queued=2)  # each has had its request_start
    r.agent.kill_9()
    r.agent.start("serving tag")
    for request_id in queued:
        result = r.client.wait(request_id, timeout_s=30)
        assert not result.ok and result.message.startswith("writer_agent restarted before this request started"), \
            result.message
        assert [s.action for s in result.statuses] == [broker.REQUEST_START, broker.REQUEST_FAIL]
    result = r.client.wait(running, timeout_s=30)
    assert not result.ok and "writer_agent restarted during the write" in result.message, result.message
    assert not any((r.out / f"queued{i}.h5").exists() for i in range(2))
    again = r.client.write(str(r.out / "after-restart.h5"), 5, tag=r.tag, timeout_s=30)  # serving again
    assert again.ok, again.message + r.logs()


def test_two_queued_requests_for_one_file_the_later_fails_when_its_turn_comes(rig):
    r = rig(rate_hz=50)
    running = r.client.submit(str(r.out / "running.h5"), LONG, tag=r.tag)
    wait_for_progress(r, running, 2)
    first = r.client.submit(str(r.out / "same.h5"), 5, tag=r.tag)
    second = r.client.submit(str(r.out / "same.h5"), 5, tag=r.tag)  # the file does not exist yet: taken
    wait_for_status(r, second, broker.REQUEST_START)
    assert kill(r, "current").action == "kill_accepted"
    assert r.client.wait(first, timeout_s=30).ok
    later = r.client.wait(second, timeout_s=30)
    assert not later.ok and "already exists" in later.message, later.message
    with h5py.File(r.out / "same.h5", "r") as f:  # the first one's file, untouched
        assert f["/entry/data/data"].shape[0] == 5
