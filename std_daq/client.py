"""A Python client for control systems: write requests, kills and their statuses over RabbitMQ.

    with DaqClient() as daq:                              # $STD_DAQ_BROKER_URL or the local default
        result = daq.write("/data/run1.h5", 100, tag="JF07T32V01", timeout_s=60)
        print(result.ok, result.message)
        request_id = daq.submit("/data/run2.h5", 1000, tag="JF07T32V01")   # not blocking
        answer = daq.kill_and_confirm(request_id[:8], tag="JF07T32V01")  # a unique prefix will do
        result = daq.wait(answer.request_id, timeout_s=30)
        running_and_queued = daq.list_requests(tag="JF07T32V01")

The client binds its status queue before it publishes, so it never misses the statuses of its own
requests; statuses of other requests that arrive meanwhile are kept for a later `wait`. Errors:
NoAgentError (nothing serves the tag; raised by submit, kill and the queries), RequestNotTaken,
RequestStalled and RequestTimeout (raised by wait), NoAnswer (a kill or query the agent did not answer),
QueryNotUnderstood (an agent older than the query took it for a write), BrokerError (RabbitMQ cannot be
reached, or the connection broke; raised by anything that talks to it) and its BrokerLoginRefused (RabbitMQ
answered but refused the URL's user, password or virtual host), all DaqClientError: no pika exception
leaves this module.

Kill answers and the request listing extend the design document's protocol (docs/writer_agent.md): the
agent answers a kill with kill_accepted (message: the full id of the request it stops) or kill_refused
(message: why), correlation_id = the kill's as sent; a query on the request exchange with the header
{"query": "requests"} is answered with request_list (message: a JSON array of the running request, then
the queued ones in order).
"""
from __future__ import annotations

import collections
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pika

from core_buffer import broker
from core_buffer.broker import KILL_ACCEPTED, KILL_ANSWERS, QUERY_HEADER, QUERY_REQUESTS, REQUEST_LIST, StatusMessage


@dataclass
class RequestResult:
    request_id: str
    action: str  # request_success or request_fail
    message: str
    statuses: list[StatusMessage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.action == broker.REQUEST_SUCCESS

    @property
    def summary(self) -> dict[str, Any]:
        """The success summary (output_file, images_written, images_lost, ...); {} for a failure."""
        if not self.ok:
            return {}
        try:
            parsed = json.loads(self.message)
        except ValueError:
            return {}
        return parsed if isinstance(parsed, dict) else {}

    @property
    def n_written(self) -> int:
        if self.ok:
            return int(self.summary.get("images_written", 0))
        progress = [progress_of(s) for s in self.statuses if s.action == broker.REQUEST_PROGRESS]
        return progress[-1][0] if progress else 0


def progress_of(status: StatusMessage) -> tuple[int, int]:
    """(images written, images asked for) from a request_progress status."""
    try:
        report = json.loads(status.message)
        return int(report["n_written"]), int(report["n_images"])
    except (ValueError, KeyError, TypeError):
        return 0, 0


RECEIVED_MAX = 100_000
# Default: how long a request may go without its request_start while the agent of its tag sends no status
# at all. writer_agent reports at least once a second while a request runs (its BUSY_REPORT_S), so a
# request queued behind a running write, even one whose writer hangs, never gets this far.
START_TIMEOUT_S = 5.0
ANSWER_TIMEOUT_S = 5.0  # default wait for the answer to a kill or a query (the agent answers at once)
DRAIN_PASSES_MAX = 1000  # _read_waiting: at most this many reads of what waits on the connection


class DaqClientError(Exception):
    """Base of the client's own errors."""


class BrokerError(DaqClientError):
    """RabbitMQ could not be reached, or the connection to it broke (the client is unusable then)."""


class BrokerLoginRefused(BrokerError):
    """RabbitMQ answered, but refused the user name, password or virtual host of the URL: it is running,
    and starting it again will not help."""


class NoAgentError(DaqClientError):
    """Nothing on the broker serves the tag: the request (or kill) was returned, not queued."""


class RequestTimeout(DaqClientError, TimeoutError):
    pass


class RequestNotTaken(RequestTimeout):
    """No request_start came, and the agent of the tag sent no status about any other request either."""


class RequestStalled(RequestTimeout):
    """No image was written for `stall_timeout_s`, however many progress reports said so meanwhile."""


class NoAnswer(RequestTimeout):
    """A kill or query got no answer in time: the agent of the tag predates the answers, or hangs."""


class QueryNotUnderstood(DaqClientError):
    """The agent took a query for a write request and refused it: it is older than the query."""


@dataclass(frozen=True)
class KillAnswer:
    accepted: bool
    request_id: str  # the full id of the request stopped ("" when refused)
    message: str  # the full id when accepted, the agent's reason when refused
    source: str


@dataclass(frozen=True)
class ListedRequest:
    """One running or queued request as the agent lists it (state "running" or "queued")."""

    request_id: str
    state: str
    output_file: str
    n_images: int
    n_written: int

    @classmethod
    def from_json(cls, item: Any) -> ListedRequest:
        entry = item if isinstance(item, dict) else {}

        def count(key: str) -> int:
            value = entry.get(key, 0)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        return cls(str(entry.get("request_id", "")), str(entry.get("state", "")),
                   str(entry.get("output_file", "")), count("n_images"), count("n_written"))


def stall_reason(request_id: str, seen: list[StatusMessage], tag: str | None, stall_timeout_s: float) -> str:
    """Why a wait gave up for want of progress, with the last progress report's counts and state."""
    if not any(s.action == broker.REQUEST_START for s in seen):
        whose = f"no request of tag {tag!r}" if tag is not None else "it"
        return (f"request {request_id}: not started yet, and {whose} moved on for {stall_timeout_s:g} s "
                f"(received: {', '.join(s.action for s in seen) or 'nothing'})")
    reports = [s for s in seen if s.action == broker.REQUEST_PROGRESS]
    if not reports:
        return f"request {request_id}: started, but no progress report for {stall_timeout_s:g} s"
    n_written, n_images = progress_of(reports[-1])
    return (f"request {request_id}: no image written for {stall_timeout_s:g} s ({n_written} of {n_images} so "
            f"far, {len(reports)} progress reports received{_report_state(reports[-1])})")


def _report_state(status: StatusMessage) -> str:
    """', state S, waiting for W' from a request_progress report, as far as it says them."""
    try:
        report = json.loads(status.message)
    except ValueError:
        return ""
    if not isinstance(report, dict):
        return ""
    parts = [f"state {report['state']}"] if report.get("state") else []
    if report.get("waiting_for"):
        parts.append(f"waiting for {report['waiting_for']}")
    return "".join(f", {part}" for part in parts)


def _connect_error(url: str, exc: BaseException) -> BrokerError:
    """The BrokerError for a failed connection attempt: a refused login or virtual host is told apart
    from a broker that does not answer, since only the second is helped by starting RabbitMQ."""
    where = broker.describe_url(url)
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return BrokerLoginRefused(f"RabbitMQ at {where} refused access to the virtual host of the URL (it does not "
                                  f"exist, or the user may not use it): {exc}")
    if isinstance(exc, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError)):
        return BrokerLoginRefused(f"RabbitMQ at {where} refused the login: wrong user name or password in the "
                                  f"broker URL (${broker.URL_ENV}, or the file named by ${broker.URL_FILE_ENV})")
    return BrokerError(f"cannot reach RabbitMQ at {where} ({exc!r})")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value or "")


class DaqClient:
    """Write requests and kills out, statuses in, over one RabbitMQ connection (not thread-safe).

    Requests and kills are published with `mandatory` and publisher confirms: when nothing is bound to
    the tag (no writer_agent serves it), `submit` and `kill` raise NoAgentError at once instead of the
    broker dropping the message. A request can still be lost after it was queued (the agent's connection
    broke while it waited: its exclusive queue goes with it). What a queued request's client can see of
    the agent is the status exchange: writer_agent's statuses carry a `tag` header, and while it runs a
    request it sends one at least every second. So `wait` raises RequestNotTaken when, for
    `start_timeout_s`, neither the request's request_start nor any status of its tag arrived: the agent
    is then not running anything and has not taken the request, so the request is gone (or the agent hangs).
    """

    def __init__(self, url: str | None = None, *, name: str = "std-daq client",
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.url = url or broker.broker_url()
        self.start_timeout_s = start_timeout_s
        try:
            self.connection = broker.connect(self.url, connection_name=name)
            self.channel = self.connection.channel()
            broker.declare_exchanges(self.channel)
            self.channel.confirm_delivery()  # a returned mandatory message then raises UnroutableError
            self.queue = self.channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
            self.channel.queue_bind(queue=self.queue, exchange=broker.STATUS_EXCHANGE)
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise _connect_error(self.url, exc) from exc
        # Statuses not yet asked for; bounded, so a client that never waits does not grow without end.
        self.received: collections.deque[StatusMessage] = collections.deque(maxlen=RECEIVED_MAX)
        self.submitted: dict[str, tuple[str, float]] = {}  # request id -> (tag, when), for the start check
        self.tag_news: dict[str, float] = {}  # tag -> when any status of it last arrived
        # Progress, as opposed to news: request id -> (most images reported written, when a status of it
        # last moved it on: its start, more images written, its end); bounded like `received`.
        self.advances: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
        self.tag_advanced: dict[str, float] = {}  # tag -> when any request of it last moved on
        self.n_received = 0  # statuses received so far (_read_waiting stops when a read adds none)
        self.channel.basic_consume(queue=self.queue, auto_ack=True, on_message_callback=self._on_status)

    def _on_status(self, _channel: Any, _method: Any, properties: Any, body: bytes) -> None:
        status = StatusMessage.from_delivery(properties, body)
        self.received.append(status)
        self.n_received += 1
        tag = _text((properties.headers or {}).get("tag"))
        now = time.monotonic()
        if tag:
            self.tag_news[tag] = now
        if self._note_advance(status, now) and tag:
            self.tag_advanced[tag] = now

    def _note_advance(self, status: StatusMessage, now: float) -> bool:
        """Whether `status` moves its request on (started, more images written, ended), noted in
        `advances`. A progress report that repeats the count is news, but not progress."""
        if status.action in broker.FINAL_ACTIONS or status.action == broker.REQUEST_START:
            n_written = self.advances.get(status.request_id, (0, 0.0))[0]
        elif status.action == broker.REQUEST_PROGRESS:
            n_written = progress_of(status)[0]
            if n_written <= self.advances.get(status.request_id, (0, 0.0))[0]:
                return False
        else:
            return False
        self.advances[status.request_id] = (n_written, now)
        self.advances.move_to_end(status.request_id)
        if len(self.advances) > RECEIVED_MAX:
            self.advances.popitem(last=False)
        return True

    def submit(self, output_file: str, n_images: int, *, tag: str, run_id: int | None = None,
               user_id: int | None = None, **extra: Any) -> str:
        """Publish a write request; returns its request id at once. NoAgentError if no agent serves `tag`."""
        body: dict[str, Any] = {**extra, "output_file": output_file, "n_images": n_images}
        if run_id is not None:
            body["run_id"] = run_id
        if user_id is not None:
            body["user_id"] = user_id
        return self.submit_raw(json.dumps(body).encode(), tag=tag)

    def submit_raw(self, body: bytes, *, tag: str) -> str:
        request_id = str(uuid.uuid4())
        self._publish(broker.REQUEST_EXCHANGE, tag, body, request_id,
                      f"no writer_agent serves tag {tag!r}: the request was returned by the broker "
                      "(is writer_agent running for this detector, and connected?)")
        self.submitted[request_id] = (tag, time.monotonic())
        if len(self.submitted) > RECEIVED_MAX:  # a client that submits and never waits
            del self.submitted[next(iter(self.submitted))]
        return request_id

    def kill(self, request_id: str, *, tag: str) -> None:
        """Ask the agent of `tag` to stop `request_id` (a full id, a unique prefix of at least
        KILL_PREFIX_MIN characters, or KILL_CURRENT) without waiting for its answer. NoAgentError if no
        agent serves `tag`."""
        self._publish(broker.KILL_EXCHANGE, tag, b"", request_id,
                      f"no writer_agent serves tag {tag!r}: the kill was returned by the broker")

    def kill_and_confirm(self, target: str, *, tag: str, timeout_s: float = ANSWER_TIMEOUT_S) -> KillAnswer:
        """Kill `target` (as in `kill`) and return the agent's answer: accepted, with the full id of the
        request it stops, or refused, with its reason. NoAnswer when none comes within `timeout_s`: an
        agent older than the kill answers (the kill may then still have worked) or a hung one."""
        self.kill(target, tag=tag)
        answer = self._await_answer(target, KILL_ANSWERS, timeout_s)
        if answer is None:
            raise NoAnswer(f"kill {target}: no answer from the writer_agent of tag {tag!r} within {timeout_s:g} s "
                           "(an agent older than the kill answers, which may still have stopped the request, "
                           "or a hung one; std-daq monitor shows what runs)")
        accepted = answer.action == KILL_ACCEPTED
        return KillAnswer(accepted, answer.message if accepted else "", answer.message, answer.source)

    def list_requests(self, *, tag: str, timeout_s: float = ANSWER_TIMEOUT_S) -> list[ListedRequest]:
        """The running request of `tag`'s agent, then its queued ones in order. NoAgentError if no agent
        serves `tag`, NoAnswer when none answers within `timeout_s`, QueryNotUnderstood when an agent
        older than the query took it for a write (and refused it)."""
        query_id = str(uuid.uuid4())
        self._publish(broker.REQUEST_EXCHANGE, tag, b"{}", query_id,
                      f"no writer_agent serves tag {tag!r}: the query was returned by the broker",
                      headers={QUERY_HEADER: QUERY_REQUESTS})
        # An old agent answers with request_start and then request_fail ('n_images' missing): wait for
        # the final one, whose message says why.
        answer = self._await_answer(query_id, (REQUEST_LIST, *broker.FINAL_ACTIONS), timeout_s)
        if answer is None:
            raise NoAnswer(f"no answer from the writer_agent of tag {tag!r} within {timeout_s:g} s: it is "
                           "older than the request listing, or hung")
        if answer.action != REQUEST_LIST:
            raise QueryNotUnderstood(f"the {answer.source or 'agent'} of tag {tag!r} is older than the request "
                                     f"listing: it took the query for a write request ({answer.action}: "
                                     f"{answer.message})")
        try:
            listed = json.loads(answer.message)
        except ValueError:
            listed = None
        if not isinstance(listed, list):
            raise QueryNotUnderstood(f"the request list of tag {tag!r} is not a JSON array: {answer.message!r}")
        return [ListedRequest.from_json(item) for item in listed]

    def _await_answer(self, correlation_id: str, actions: tuple[str, ...],
                      timeout_s: float) -> StatusMessage | None:
        """The first status with `correlation_id` and one of `actions`, taken out of `received` (the
        statuses of a request that share the id stay for `wait`); None after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._read_waiting()
            for status in self.received:
                if status.request_id == correlation_id and status.action in actions:
                    self.received.remove(status)
                    return status
            if time.monotonic() > deadline:
                return None
            self._process_events(0.05)

    def _publish(self, exchange: str, tag: str, body: bytes, request_id: str, unroutable: str,
                 headers: dict[str, str] | None = None) -> None:
        try:
            self.channel.basic_publish(exchange=exchange, routing_key=tag, body=body, mandatory=True,
                                       properties=pika.BasicProperties(correlation_id=request_id,
                                                                       content_type="application/json",
                                                                       headers=headers))
        except pika.exceptions.UnroutableError:
            raise NoAgentError(unroutable) from None
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise self._lost(exc) from exc

    def _lost(self, exc: BaseException) -> BrokerError:
        return BrokerError(f"lost the connection to RabbitMQ at {broker.describe_url(self.url)} ({exc!r})")

    def _process_events(self, time_limit: float) -> None:
        try:
            self.connection.process_data_events(time_limit=time_limit)
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise self._lost(exc) from exc

    def statuses(self, timeout_s: float | None = None) -> Iterator[StatusMessage]:
        """Every status on the exchange as it arrives, until `timeout_s` passes without one (None: forever)."""
        last = time.monotonic()
        while True:
            while self.received:
                yield self.received.popleft()
                last = time.monotonic()
            if timeout_s is not None and time.monotonic() - last > timeout_s:
                return
            self._process_events(0.1)

    def _read_waiting(self) -> None:
        """Take in every status already waiting on the connection, without waiting for more. One
        process_data_events(0) reads one chunk from the socket; after a pause (the caller did something
        else for a while) many may be waiting, and a verdict taken before reading them would be stale."""
        for _ in range(DRAIN_PASSES_MAX):
            before = self.n_received
            self._process_events(0)
            if self.n_received == before:
                return

    def wait(self, request_id: str, timeout_s: float | None = None,
             on_status: Callable[[StatusMessage], None] | None = None, *,
             idle_timeout_s: float | None = None, start_timeout_s: float | None = None,
             stall_timeout_s: float | None = None) -> RequestResult:
        """Collect the statuses of `request_id` until its final one.

        RequestTimeout after `timeout_s` in all, or after `idle_timeout_s` without news of the request (while
        it waits for its turn, any status of its tag counts as news). RequestStalled after `stall_timeout_s`
        without progress: no more images written, however many progress reports came (while a request
        submitted here waits for its turn, any request of its tag that starts, writes or ends counts as
        progress; the clock also starts at the call). For a request submitted by this client,
        RequestNotTaken when `start_timeout_s` (default: the client's) passed after the submit, and after
        the last status of its tag, without its request_start (see the class docstring). BrokerError when
        the connection breaks: the request may still run (std-daq monitor shows it)."""
        now = time.monotonic()
        waited_since = now
        deadline = None if timeout_s is None else now + timeout_s
        start_limit = self.start_timeout_s if start_timeout_s is None else start_timeout_s
        tag, submitted_at = self.submitted.get(request_id, (None, None))
        last_news = now
        seen: list[StatusMessage] = []
        while True:
            self._read_waiting()  # first: what arrived while the caller was not waiting decides below
            for status in [s for s in self.received if s.request_id == request_id]:
                self.received.remove(status)
                seen.append(status)
                last_news = time.monotonic()
                if on_status is not None:
                    on_status(status)
                if status.action in broker.FINAL_ACTIONS:
                    self.submitted.pop(request_id, None)
                    return RequestResult(request_id, status.action, status.message, seen)
            now = time.monotonic()
            actions = ", ".join(s.action for s in seen) or "nothing"
            if deadline is not None and now > deadline:
                raise RequestTimeout(f"request {request_id}: no final status within {timeout_s:g} s "
                                     f"(received: {actions})")
            started = any(s.action == broker.REQUEST_START for s in seen)
            if tag is not None and not started:
                tag_news = self.tag_news.get(tag, 0.0)
                last_news = max(last_news, tag_news)
                if now - max(submitted_at, tag_news) > start_limit:
                    raise RequestNotTaken(
                        f"request {request_id}: no writer_agent took it within {start_limit:g} s, and the agent "
                        f"of tag {tag!r} sent no status meanwhile, so it is not busy with another request "
                        f"(received: {actions}); the request was lost with the agent's broker connection "
                        "(its queue goes with it): send it again (were the agent hung instead, with its "
                        "connection up, it would still run the request once it recovers)")
            if idle_timeout_s is not None and now - last_news > idle_timeout_s:
                raise RequestTimeout(f"request {request_id}: no news of it for {idle_timeout_s:g} s "
                                     f"(received: {actions}); it may still finish (std-daq monitor shows it)")
            if stall_timeout_s is not None:
                last_advance = max(waited_since, self.advances.get(request_id, (0, 0.0))[1])
                if tag is not None and not started:  # queued: the writes ahead of it moving on is progress
                    last_advance = max(last_advance, self.tag_advanced.get(tag, 0.0))
                if now - last_advance > stall_timeout_s:
                    raise RequestStalled(stall_reason(request_id, seen, tag, stall_timeout_s))
            self._process_events(0.05)

    def write(self, output_file: str, n_images: int, *, tag: str, timeout_s: float | None = None,
              on_status: Callable[[StatusMessage], None] | None = None, **request: Any) -> RequestResult:
        """Submit a write and wait for its final status."""
        request_id = self.submit(output_file, n_images, tag=tag, **request)
        return self.wait(request_id, timeout_s, on_status)

    def close(self) -> None:
        try:
            self.connection.close()
        except (pika.exceptions.AMQPError, OSError):
            pass

    def __enter__(self) -> DaqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_write_and_wait(tag: str, output_file: str, n_images: int, *,
                        progress: Callable[[int, int], None] | None = None,
                        timeout_s: float | None = None, url: str | None = None) -> RequestResult:
    """One write through the broker, reporting (written, asked for) to `progress` as it goes. A request
    that no agent takes comes back as a failed result; RequestTimeout if no final status in `timeout_s`."""

    def on_status(status: StatusMessage) -> None:
        if progress is not None and status.action == broker.REQUEST_PROGRESS:
            progress(*progress_of(status))

    with DaqClient(url) as daq:
        try:
            return daq.write(output_file, n_images, tag=tag, timeout_s=timeout_s, on_status=on_status)
        except (NoAgentError, RequestNotTaken) as exc:  # nobody took it: a failed write, not a crash
            return RequestResult("", broker.REQUEST_FAIL, str(exc))
