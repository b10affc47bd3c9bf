"""The requests writer_agent has taken and not started yet, and which request a kill names. Pure logic.

Why the agent holds its queue itself rather than leaving the requests in its broker queue (prefetch 1, as
before issue 21): a request waiting in the broker is invisible to the agent, so it could neither send
`request_start` when the request arrived (only when its turn came, just before its final status), nor
list it, nor find it by a prefix of its id; and every request cost a round trip to the broker (the ack of
the previous one's final status, then the delivery) before it could start. The broker still bounds the
queue: the agent's prefetch (MAX_HELD in broker_link) is the most requests it holds unacked; more wait
in the broker queue until one ends.
"""
from __future__ import annotations

import base64
import collections
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

from core_buffer.broker import KILL_CURRENT, KILL_PREFIX_MIN
from writer_agent.broker_link import Delivery
from writer_agent.request import WriteRequest

MATCHES_NAMED = 10  # an ambiguous prefix's refusal names at most this many of its matches


@dataclass
class Queued:
    """A request taken (request_start sent) and waiting for its turn."""

    delivery: Delivery
    request: WriteRequest
    # Its entry in the agent's record file, made once: the record is rewritten on every change of the
    # queue, and encoding every body again each time would make a long queue quadratic.
    record: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.record = {"request_id": self.request.request_id,
                       "body": base64.b64encode(self.delivery.body).decode()}

    @property
    def request_id(self) -> str:
        return self.request.request_id


class RequestQueue:
    """Taken requests in the order they arrived. At most the agent's prefetch of them (MAX_HELD): a list,
    searched from the front, serves a kill as well as an index would."""

    def __init__(self) -> None:
        self._items: collections.deque[Queued] = collections.deque()

    def append(self, item: Queued) -> None:
        self._items.append(item)

    def popleft(self) -> Queued:
        return self._items.popleft()

    def remove(self, request_id: str) -> Queued:
        """The first request with this id, taken out of the queue (KeyError if there is none)."""
        for item in self._items:
            if item.request_id == request_id:
                self._items.remove(item)
                return item
        raise KeyError(request_id)

    def ids(self) -> list[str]:
        return [item.request_id for item in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Queued]:
        return iter(list(self._items))


def resolve_kill(target: str, running: str | None, queued: Iterable[str],
                 finished: Mapping[str, str]) -> tuple[str | None, str]:
    """Which request a kill's correlation_id names: (its full id, "") or (None, why none).

    `target` is a full id, a prefix of at least KILL_PREFIX_MIN characters that only one of the running
    and queued requests starts with, or KILL_CURRENT (the running one). `finished` maps the ids of requests
    that ended recently to their final action, so that a kill of one says it finished rather than that it
    is unknown."""
    if target == KILL_CURRENT:
        return (running, "") if running is not None else (None, "no write is running")
    if not target:
        return None, (f"the kill has no correlation_id (a request id, a prefix of at least {KILL_PREFIX_MIN} "
                      f"characters of one, or '{KILL_CURRENT}')")
    known = ([running] if running is not None else []) + list(queued)
    if target in known:
        return target, ""
    if len(target) < KILL_PREFIX_MIN:
        return None, (f"{target!r} is too short to name a request: give at least {KILL_PREFIX_MIN} characters "
                      "of its id")
    matches = [request_id for request_id in known if request_id.startswith(target)]
    if len(matches) == 1:
        return matches[0], ""
    if matches:
        named = ", ".join(matches[:MATCHES_NAMED])
        more = f" and {len(matches) - MATCHES_NAMED} more" if len(matches) > MATCHES_NAMED else ""
        return None, f"prefix {target} matches {len(matches)} requests: {named}{more}"
    return None, f"no running or queued request {target} ({_finished_note(target, finished)})"


def _finished_note(target: str, finished: Mapping[str, str]) -> str:
    done = [request_id for request_id in finished if request_id == target or request_id.startswith(target)]
    if len(done) == 1:
        return f"request {done[0]} finished already: {finished[done[0]]}"
    return "finished already, or unknown"
