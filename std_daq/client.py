"""A Python client for control systems: write requests, kills and their statuses over RabbitMQ.

    with DaqClient() as daq:                              # $STD_DAQ_BROKER_URL or the local default
        result = daq.write("/data/run1.h5", 100, tag="JF07T32V01", timeout_s=60)
        print(result.ok, result.message)
        request_id = daq.submit("/data/run2.h5", 1000, tag="JF07T32V01")   # not blocking
        daq.kill(request_id, tag="JF07T32V01")
        result = daq.wait(request_id, timeout_s=30)

The client binds its status queue before it publishes, so it never misses the statuses of its own
requests; statuses of other requests that arrive meanwhile are kept for a later `wait`.
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
from core_buffer.broker import StatusMessage


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


class RequestTimeout(TimeoutError):
    pass


class DaqClient:
    def __init__(self, url: str | None = None, *, name: str = "std-daq client") -> None:
        self.url = url or broker.broker_url()
        self.connection = broker.connect(self.url, connection_name=name)
        self.channel = self.connection.channel()
        broker.declare_exchanges(self.channel)
        self.queue = self.channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
        self.channel.queue_bind(queue=self.queue, exchange=broker.STATUS_EXCHANGE)
        # Statuses not yet asked for; bounded, so a client that never waits does not grow without end.
        self.received: collections.deque[StatusMessage] = collections.deque(maxlen=RECEIVED_MAX)
        self.channel.basic_consume(queue=self.queue, auto_ack=True, on_message_callback=self._on_status)

    def _on_status(self, _channel: Any, _method: Any, properties: Any, body: bytes) -> None:
        self.received.append(StatusMessage.from_delivery(properties, body))

    def submit(self, output_file: str, n_images: int, *, tag: str, run_id: int | None = None,
               user_id: int | None = None, **extra: Any) -> str:
        """Publish a write request; returns its request id at once."""
        body: dict[str, Any] = {**extra, "output_file": output_file, "n_images": n_images}
        if run_id is not None:
            body["run_id"] = run_id
        if user_id is not None:
            body["user_id"] = user_id
        return self.submit_raw(json.dumps(body).encode(), tag=tag)

    def submit_raw(self, body: bytes, *, tag: str) -> str:
        request_id = str(uuid.uuid4())
        self.channel.basic_publish(exchange=broker.REQUEST_EXCHANGE, routing_key=tag, body=body,
                                   properties=pika.BasicProperties(correlation_id=request_id,
                                                                   content_type="application/json"))
        return request_id

    def kill(self, request_id: str, *, tag: str) -> None:
        self.channel.basic_publish(exchange=broker.KILL_EXCHANGE, routing_key=tag, body=b"",
                                   properties=pika.BasicProperties(correlation_id=request_id))

    def statuses(self, timeout_s: float | None = None) -> Iterator[StatusMessage]:
        """Every status on the exchange as it arrives, until `timeout_s` passes without one (None: forever)."""
        last = time.monotonic()
        while True:
            while self.received:
                yield self.received.popleft()
                last = time.monotonic()
            if timeout_s is not None and time.monotonic() - last > timeout_s:
                return
            self.connection.process_data_events(time_limit=0.1)

    def wait(self, request_id: str, timeout_s: float | None = None,
             on_status: Callable[[StatusMessage], None] | None = None) -> RequestResult:
        """Collect the statuses of `request_id` until its final one; RequestTimeout after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        seen: list[StatusMessage] = []
        while True:
            for status in [s for s in self.received if s.request_id == request_id]:
                self.received.remove(status)
                seen.append(status)
                if on_status is not None:
                    on_status(status)
                if status.action in broker.FINAL_ACTIONS:
                    return RequestResult(request_id, status.action, status.message, seen)
            if deadline is not None and time.monotonic() > deadline:
                actions = ", ".join(s.action for s in seen) or "nothing"
                raise RequestTimeout(f"request {request_id}: no final status within {timeout_s:g} s "
                                     f"(received: {actions})")
            self.connection.process_data_events(time_limit=0.05)

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
    """One write through the broker, reporting (written, asked for) to `progress` as it goes."""

    def on_status(status: StatusMessage) -> None:
        if progress is not None and status.action == broker.REQUEST_PROGRESS:
            progress(*progress_of(status))

    with DaqClient(url) as daq:
        return daq.write(output_file, n_images, tag=tag, timeout_s=timeout_s, on_status=on_status)
