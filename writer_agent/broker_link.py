"""The agent's RabbitMQ connection, owned by a thread of its own.

Why a thread. pika's BlockingConnection blocks: in connecting (up to the socket timeout when the broker's
address is a blackhole), in basic_publish when RabbitMQ throttles a connection (up to
blocked_connection_timeout), and in waiting for publisher confirms. The data path cannot afford any of
that: images arrive at hundreds per second and the ImageBuffer holds a second or less of them, so a stall
of the agent's loop loses images. Shorter timeouts would only make the stalls shorter, and "no broker I/O
while a write runs" would also stop kills and progress reports. pika's asynchronous SelectConnection
could share one loop with the ZMQ poller, but it needs its own ioloop and callbacks for every step; one
thread that owns a BlockingConnection outright (pika connections are not thread-safe, so nothing else
touches it) is less code and keeps the agent's loop free of the broker entirely.

The agent and the link talk through two queues. The agent appends `Outgoing` items (a status to publish,
and/or a delivery to ack) to the outbox; the link publishes them in order with publisher confirms and
keeps an item until the broker has confirmed it, reconnecting with backoff meanwhile. The link puts what
it receives (`Delivery`, `Kill`) and what it has done (`Published` for a confirmed final status) in the
inbox, and sends a byte on an inproc PAIR socket so the agent's poller wakes up at once. The other way
round, `publish` wakes the link out of pika's process_data_events (add_callback_threadsafe, pika's one
thread-safe call), so a status goes out as soon as it is queued, not at the end of the link's slice of
EVENTS_SLICE_S (with which every request used to wait up to that long for its final status to go out, and
the next request for the ack that freed the prefetch: a floor of 50 ms per request, issue 21).

Requests: the link consumes with a prefetch of MAX_HELD, so the agent holds every request it has been
sent and not finished (it queues them itself: writer_agent/request_queue.py says why). A message on the
request exchange with the AMQP header `query` is a question, not a write: it reaches the agent as a
Delivery with `query` set.

Delivery guarantee for statuses: at least once. A status whose publish was cut off before the confirm
arrived is published again after the reconnect; clients take the first final status of a request.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import pika
import zmq

from core_buffer import broker
from core_buffer.broker import QUERY_HEADER

log = logging.getLogger("writer_agent")
# pika logs every failed connection attempt at ERROR with a traceback; the link says once per outage what
# happened (with the exception), so these would only repeat it every few seconds.
for _noisy in ("pika.adapters.utils.connection_workflow", "pika.adapters.blocking_connection"):
    logging.getLogger(_noisy).setLevel(logging.CRITICAL)

CONNECT_TIMEOUT_S = 3.0  # one connection attempt; only the link thread waits for it
# The link serves the broker in slices this long, then looks at its flags (stop, stop_intake). Not a
# latency: a status queued by the agent wakes the link at once (`_nudge`).
EVENTS_SLICE_S = 0.05
# The most requests the agent holds (delivered, not yet acked: running, queued, or their final status not
# yet confirmed). Bodies are at most 64 KiB, so at most 64 MiB of them; more wait in the broker queue.
MAX_HELD = 1000
# When the intake ends, the link keeps reading the connection until this long passes without a new request
# (up to INTAKE_SETTLE_MAX_S): a request the broker pushed to the consumer after the last ack freed the
# prefetch may still be on its way, and it must reach the agent while the agent can still answer it.
INTAKE_SETTLE_S = 0.1
INTAKE_SETTLE_MAX_S = 1.0
FIRST_BACKOFF_S = 0.5


@dataclass(frozen=True)
class Delivery:
    generation: int  # which broker connection it came on; an ack only makes sense on that one
    tag: int
    request_id: str
    body: bytes
    query: str | None = None  # the `query` header's value: a question, not a write request


@dataclass(frozen=True)
class Kill:
    request_id: str


@dataclass(frozen=True)
class Published:
    """A final status the broker has confirmed."""

    request_id: str


@dataclass
class Outgoing:
    status: broker.StatusMessage | None
    ack: Delivery | None = None
    final: bool = False  # report Published once the broker has confirmed it
    published: bool = False  # the status is out; only the ack is left (never publish it twice)


class BrokerLink:
    """RabbitMQ for one agent: requests and kills of `tag` in, statuses out, in its own thread.

    Lifecycle: `start`, then `publish`/`events` from the agent's thread, `stop_intake` when the agent is
    going to stop (no request is taken any more; those still queued are handed over to be refused),
    `flush` to wait for the outbox, `stop` (sets the flag; the thread closes the connection and ends) and
    `join`."""

    def __init__(self, url: str, tag: str, connection_name: str, reconnect_max_s: float,
                 context: zmq.Context, wake_address: str) -> None:
        self.url, self.tag, self.connection_name = url, tag, connection_name
        self.reconnect_max_s = reconnect_max_s
        self.context, self.wake_address = context, wake_address
        self.inbox: queue.SimpleQueue[Delivery | Kill | Published] = queue.SimpleQueue()
        # Appended by the agent, read and popped only by the link thread (deque appends and pops are atomic).
        self.outbox: collections.deque[Outgoing] = collections.deque()
        self.connected = threading.Event()
        self.intake_stopped = threading.Event()  # set once stop_intake is done (see there)
        self._stop_intake = threading.Event()
        self.generation = 0
        self.reconnects = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-link", daemon=True)
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._requests_queue: str | None = None  # while requests are taken
        self._next_connect = 0.0
        self._backoff_s = FIRST_BACKOFF_S
        self._outage_logged = False
        self._errors: dict[str, int] = {}
        self._wake: zmq.Socket | None = None
        self._deliveries = 0  # requests received (for the settling wait of _end_intake)

    # --- the agent's side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def publish(self, status: broker.StatusMessage | None, ack: Delivery | None = None, final: bool = False) -> None:
        self.outbox.append(Outgoing(status, ack, final))
        self._nudge()

    def events(self) -> list[Delivery | Kill | Published]:
        found = []
        while True:
            try:
                found.append(self.inbox.get_nowait())
            except queue.Empty:
                return found

    def pending(self) -> int:
        return len(self.outbox)

    def flush(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty (published and confirmed); False after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.outbox and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.outbox

    def stop_intake(self) -> None:
        """Take no more requests: once the outbox is empty (the running request's ack is out), the link
        unbinds the request queue (new requests are then returned to their senders as unroutable) and
        hands over as Deliveries the requests still in the queue, and any the broker pushed to it meanwhile
        (it reads on until INTAKE_SETTLE_S passes without one), so the agent can answer each;
        `intake_stopped` is set then. Without a connection there is nothing to hand over: the queue went
        with the connection."""
        self._stop_intake.set()
        self._nudge()

    def stop(self) -> None:
        self._stopping.set()
        self._nudge()

    def _nudge(self) -> None:
        """Wake the link thread out of process_data_events now (from the agent's thread). Without a
        connection there is nothing to wake: the link is then not in process_data_events, and it looks at
        the outbox as soon as it has connected."""
        connection = self._connection  # set and cleared by the link thread; a stale one is harmless here
        if connection is None:
            return
        try:
            connection.add_callback_threadsafe(_nothing)
        except Exception:  # noqa: BLE001 - closed or closing: the link notices and reconnects by itself
            pass

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # --- the link thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        self._wake = self.context.socket(zmq.PAIR)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.setsockopt(zmq.SNDHWM, 1)  # one pending wake-up is enough
        self._wake.connect(self.wake_address)
        try:
            while not self._stopping.is_set():
                try:
                    self._turn()
                except (pika.exceptions.AMQPError, OSError) as exc:
                    self._lost(f"connection lost: {exc!r}")
                except Exception as exc:  # noqa: BLE001 - the link must outlive anything it receives
                    self._log_unexpected(exc)
                    self._lost(f"unexpected {type(exc).__name__}")
        finally:
            self._close_connection()
            self._wake.close()

    def _turn(self) -> None:
        if self._connection is None:
            if self._stop_intake.is_set():
                self.intake_stopped.set()  # the request queue went with the connection
            delay = self._next_connect - time.monotonic()
            if delay > 0:
                self._stopping.wait(min(delay, 0.1))
            else:
                self._connect()
            return
        self._flush_outbox()
        if self._stop_intake.is_set() and not self.intake_stopped.is_set() and not self.outbox:
            self._end_intake()
            self.intake_stopped.set()
        self._connection.process_data_events(time_limit=EVENTS_SLICE_S)
        self._flush_outbox()

    def _connect(self) -> None:
        try:
            connection = broker.connect(self.url, connection_name=self.connection_name, timeout_s=CONNECT_TIMEOUT_S)
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._lost(f"cannot connect: {exc!r}")
            return
        self._connection = connection
        channel = connection.channel()
        broker.declare_exchanges(channel)
        channel.confirm_delivery()  # basic_publish returns once the broker has the status
        channel.basic_qos(prefetch_count=MAX_HELD)
        kills = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue=kills, exchange=broker.KILL_EXCHANGE, routing_key=self.tag)
        channel.basic_consume(queue=kills, on_message_callback=self._on_kill, auto_ack=True)
        self._requests_queue = None
        if not self._stop_intake.is_set():  # a stopping agent takes no requests, also after a reconnect
            requests = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue=requests, exchange=broker.REQUEST_EXCHANGE, routing_key=self.tag)
            channel.basic_consume(queue=requests, on_message_callback=self._on_request)
            self._requests_queue = requests
        self._channel = channel
        self.generation += 1
        if self.generation > 1:
            self.reconnects += 1
        self._backoff_s = FIRST_BACKOFF_S
        self._outage_logged = False
        self.connected.set()
        log.info("connected to %s (connection %d), serving tag %r", broker.describe_url(self.url),
                 self.generation, self.tag)

    def _lost(self, reason: str) -> None:
        self._close_connection()
        if not self._outage_logged:
            log.warning("broker %s: %s; the running write goes on, statuses are kept until it is back "
                        "(retrying every %.1f s and up to %.0f s)", broker.describe_url(self.url), reason,
                        self._backoff_s, self.reconnect_max_s)
            self._outage_logged = True
        self._next_connect = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self.reconnect_max_s)

    def _end_intake(self) -> None:
        """See stop_intake. Order: unbind, so nothing enters the queue any more; get what is left; then
        dispatch what the broker pushed to the consumer meanwhile (the acks of the last final statuses
        freed some of its prefetch). The consumer stays: cancelling it would delete the queue (auto-delete)
        with the requests in it, and so would deleting the queue; it goes with the connection, being
        exclusive."""
        requests, self._requests_queue = self._requests_queue, None
        if requests is None:
            return
        channel = self._channel
        channel.queue_unbind(queue=requests, exchange=broker.REQUEST_EXCHANGE, routing_key=self.tag)
        while True:
            method, properties, body = channel.basic_get(requests, auto_ack=False)
            if method is None:
                break
            self._on_request(channel, method, properties, body)
        # A request pushed to the consumer may not have been read yet: read on until INTAKE_SETTLE_S
        # passes without one (each delivery starts the wait again), at most INTAKE_SETTLE_MAX_S.
        start = quiet_since = time.monotonic()
        seen = self._deliveries
        while True:
            self._connection.process_data_events(time_limit=EVENTS_SLICE_S)
            now = time.monotonic()
            if self._deliveries != seen:
                seen, quiet_since = self._deliveries, now
            if now - quiet_since >= INTAKE_SETTLE_S or now - start >= INTAKE_SETTLE_MAX_S:
                break

    def _close_connection(self) -> None:
        self.connected.clear()
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - it is already broken; closing is a courtesy
                pass

    def _flush_outbox(self) -> None:
        while self.outbox and self._channel is not None:
            item = self.outbox[0]
            if item.status is not None and not item.published:
                properties = item.status.properties()
                properties.headers["tag"] = self.tag  # lets clients see which detector's agent is busy
                self._channel.basic_publish(exchange=broker.STATUS_EXCHANGE, routing_key="", body=item.status.body,
                                            properties=properties)
                item.published = True
            if item.ack is not None and item.ack.generation == self.generation:
                # An ack of an earlier connection is moot: that connection took its exclusive queue along.
                self._channel.basic_ack(delivery_tag=item.ack.tag)
            self.outbox.popleft()
            if item.final and item.status is not None:
                self._post(Published(item.status.request_id))

    def _post(self, event: Delivery | Kill | Published) -> None:
        self.inbox.put(event)
        try:
            self._wake.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # a wake-up is pending already

    def _on_request(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._deliveries += 1
        query = (properties.headers or {}).get(QUERY_HEADER)
        if isinstance(query, bytes):
            query = query.decode("utf-8", "replace")
        self._post(Delivery(self.generation, method.delivery_tag, properties.correlation_id or "", bytes(body),
                            None if query is None else str(query)))

    def _on_kill(self, _channel: Any, _method: Any, properties: Any, _body: bytes) -> None:
        self._post(Kill(properties.correlation_id or ""))

    def _log_unexpected(self, exc: Exception) -> None:
        key = type(exc).__name__
        n = self._errors[key] = self._errors.get(key, 0) + 1
        if n == 1 or n % 1000 == 0:
            log.error("broker link: unexpected %s (occurrence %d); reconnecting", key, n, exc_info=exc)


def _nothing() -> None:
    """The callback of a nudge: waking process_data_events is all it is for."""
