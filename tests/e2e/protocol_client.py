"""A beamline-side client written from DESIGN.md §5 alone, as an existing std-daq client would be.

The end-to-end tests send their write requests with it rather than with `std-daq write`, so they also
check that writer_agent speaks the documented protocol to a client that knows nothing of this project.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import pika

FINAL_ACTIONS = ("request_success", "request_fail")


@dataclass
class RequestOutcome:
    request_id: str
    actions: list[str] = field(default_factory=list)
    final_action: str | None = None
    message: str = ""
    sources: set[str] = field(default_factory=set)

    @property
    def succeeded(self) -> bool:
        return self.final_action == "request_success"


class ProtocolClient:
    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        for exchange, kind in (("request", "topic"), ("status", "fanout"), ("kill", "topic")):
            self.channel.exchange_declare(exchange=exchange, exchange_type=kind)
        result = self.channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        self.status_queue = result.method.queue
        self.channel.queue_bind(queue=self.status_queue, exchange="status")

    def send_write(self, tag: str, body: dict | bytes) -> str:
        request_id = str(uuid.uuid4())
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.channel.basic_publish(exchange="request", routing_key=tag, body=payload,
                                   properties=pika.BasicProperties(correlation_id=request_id))
        return request_id

    def kill(self, tag: str, request_id: str) -> None:
        self.channel.basic_publish(exchange="kill", routing_key=tag, body=b"",
                                   properties=pika.BasicProperties(correlation_id=request_id))

    def wait(self, request_id: str, timeout_s: float = 60.0, until: str | None = None) -> RequestOutcome:
        """Collect the statuses of `request_id` until its final action (or the action `until`)."""
        outcome = RequestOutcome(request_id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            method, properties, _body = self.channel.basic_get(self.status_queue, auto_ack=True)
            if method is None:
                self.connection.process_data_events(time_limit=0.05)
                continue
            if properties.correlation_id != request_id:
                continue
            headers = properties.headers or {}
            action = headers.get("action")
            outcome.actions.append(action)
            outcome.sources.add(headers.get("source"))
            if action == until:
                return outcome
            if action in FINAL_ACTIONS:
                outcome.final_action = action
                outcome.message = headers.get("message", "")
                return outcome
        raise TimeoutError(f"request {request_id}: no final status within {timeout_s} s "
                           f"(saw {outcome.actions})")

    def close(self) -> None:
        try:
            self.connection.close()
        except pika.exceptions.AMQPError:
            pass
