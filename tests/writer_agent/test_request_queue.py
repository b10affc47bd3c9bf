"""Which request a kill names, and the queue of taken requests, as pure logic."""
from __future__ import annotations

import pytest

from writer_agent.broker_link import Delivery
from writer_agent.request import WriteRequest
from core_buffer.broker import KILL_CURRENT
from writer_agent.request_queue import Queued, RequestQueue, resolve_kill

RUNNING = "1a2b3c4d-0000-4000-8000-000000000001"
QUEUED = ["5e6f7a8b-0000-4000-8000-000000000002", "5e6f9999-0000-4000-8000-000000000003"]


def test_a_full_id_names_the_running_or_a_queued_request():
    assert resolve_kill(RUNNING, RUNNING, QUEUED, {}) == (RUNNING, "")
    assert resolve_kill(QUEUED[1], RUNNING, QUEUED, {}) == (QUEUED[1], "")


def test_a_unique_prefix_of_four_or_more_characters_names_its_request():
    assert resolve_kill("1a2b", RUNNING, QUEUED, {}) == (RUNNING, "")
    assert resolve_kill("5e6f7", RUNNING, QUEUED, {}) == (QUEUED[0], "")


def test_an_ambiguous_prefix_is_refused_naming_every_match():
    assert resolve_kill("5e6f", RUNNING, QUEUED, {}) == (
        None, f"prefix 5e6f matches 2 requests: {QUEUED[0]}, {QUEUED[1]}")


def test_many_matches_are_named_up_to_ten_and_counted():
    queued = [f"abcd{i:04d}" for i in range(13)]
    _, why = resolve_kill("abcd", None, queued, {})
    assert why == f"prefix abcd matches 13 requests: {', '.join(queued[:10])} and 3 more"


def test_current_names_the_running_request_or_is_refused_when_none_runs():
    assert resolve_kill(KILL_CURRENT, RUNNING, QUEUED, {}) == (RUNNING, "")
    assert resolve_kill(KILL_CURRENT, None, QUEUED, {}) == (None, "no write is running")


def test_a_prefix_shorter_than_four_characters_is_refused():
    request_id, why = resolve_kill("1a2", RUNNING, QUEUED, {})
    assert request_id is None and "at least 4 characters" in why


def test_a_kill_without_an_id_is_refused():
    request_id, why = resolve_kill("", RUNNING, QUEUED, {})
    assert request_id is None and "no correlation_id" in why


def test_a_finished_request_is_named_as_finished_and_an_unknown_one_as_unknown():
    done = "9f9f9f9f-0000-4000-8000-000000000009"
    finished = {done: "request_success"}
    assert resolve_kill(done, RUNNING, QUEUED, finished) == (
        None, f"no running or queued request {done} (request {done} finished already: request_success)")
    assert resolve_kill("9f9f9f9f", None, [], finished) == (
        None, f"no running or queued request 9f9f9f9f (request {done} finished already: request_success)")
    assert resolve_kill("77777777", RUNNING, QUEUED, finished) == (
        None, "no running or queued request 77777777 (finished already, or unknown)")


def queued(request_id: str) -> Queued:
    return Queued(Delivery(1, 1, request_id, b"{}"), WriteRequest(request_id, "/data/x.h5", 5, 1, 0, {}))


def test_the_queue_keeps_the_order_and_removes_by_id():
    queue = RequestQueue()
    for request_id in ("a", "b", "c"):
        queue.append(queued(request_id))
    assert queue.remove("b").request_id == "b"
    assert queue.ids() == ["a", "c"] and len(queue) == 2
    assert queue.popleft().request_id == "a"
    with pytest.raises(KeyError):
        queue.remove("b")
