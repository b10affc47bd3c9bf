"""What std_web knows of the pipeline, from the three contracts it may use, each read by one thread:

- `BrokerLink`: RabbitMQ through std_daq.client.DaqClient (one connection, owned by its thread, since the
  client is not thread-safe): write requests and kills go out as commands queued to the thread; every
  status on the exchange comes in, and the statuses of the requests it knows go to the `RequestBook`. Once
  a second it lists the agent's running and queued requests, so a write started elsewhere (`std-daq write`,
  another control system) shows too.
- `MetricsPoller`: the services' Prometheus endpoints, scraped as `std-daq status` scrapes them.
- `LiveView`: the live-preview PUB stream of std_stream_send ("array-1.0" header + raw image), keeping the
  latest image only.

`PipelineView` holds the three, and hands out frozen-in-time dicts (`snapshot`) for the API and the pushed
status. Stop order (PipelineView.stop): the threads stop taking input (a flag each), then are joined, live
view first (nothing depends on it), the broker link last (a write_sync may still wait on it).
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import zmq

from core_buffer import broker
from core_buffer.config import DetectorConfig
from core_buffer.ipc import make_socket
from core_buffer.service import Counters
from std_daq import status as daq_status
from std_daq.client import BrokerError, DaqClient, DaqClientError, ListedRequest, progress_of

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 10.0  # a command the broker thread has not done by then is answered as an error
LIST_INTERVAL_S = 1.0  # how often the agent's running and queued requests are listed
RECONNECT_MAX_S = 10.0
STATUS_SLICE_S = 0.2  # the broker thread reads statuses at most this long before it looks at its commands
BOOK_MAX = 1000  # requests remembered (the /daq/logs history)
LIVE_POLL_MS = 100
LIVE_MAX_BYTES = 256 << 20  # a preview image larger than this is a bad message, not an allocation

# The 2023 interface's acquisition states and messages.
WAITING_IMAGES = "WAITING_IMAGES"
ACQUIRING_IMAGES = "ACQUIRING_IMAGES"
FLUSHING_IMAGES = "FLUSHING_IMAGES"
WRITING = "WRITING"
FINISHED = "FINISHED"
FAILED = "FAILED"
COMPLETED = "Completed."
INTERRUPTED = "Interrupted."
KILL_REASONS = ("interrupted by a kill", "killed before")  # writer_agent's request_fail messages after a kill
_WRITTEN_IN_REASON = re.compile(r"after (\d+) of \d+ images|closed and holds (\d+) images")


def _now() -> float:
    return time.time()


class WriteRecord:
    """One write request, as far as its statuses tell; mutated under the book's lock only."""

    def __init__(self, request_id: str, output_file: str, n_images: int, run_id: int | None,
                 user_id: int | None, via: str) -> None:
        self.request_id = request_id
        self.output_file = output_file
        self.n_images = n_images
        self.run_id = run_id
        self.user_id = user_id
        self.via = via  # "web": submitted here; "other": seen in the agent's listing
        self.state = WAITING_IMAGES
        self.message = "request sent"
        self.n_written = 0
        self.n_lost = 0
        self.started = False  # request_start seen
        self.progressed = False  # request_progress seen
        self.final_action = ""
        self.final_message = ""
        self.killed = False  # a kill of it was accepted
        self.start_time = _now()
        self.stop_time: float | None = None
        self.done = threading.Event()
        self.news = threading.Condition()

    @property
    def active(self) -> bool:
        return not self.final_action

    def acquisition(self) -> dict[str, Any]:
        return {"state": self.state, "message": self.message,
                "info": {"output_file": self.output_file, "n_images": self.n_images, "run_id": self.run_id},
                "stats": {"n_write_completed": self.n_written, "n_write_requested": self.n_images,
                          "start_time": self.start_time, "stop_time": self.stop_time},
                "request_id": self.request_id}

    def log_entry(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "output_file": self.output_file, "n_images": self.n_images,
                "run_id": self.run_id, "state": self.state, "message": self.message,
                "n_written": self.n_written, "result": self.final_action or "running",
                "reason": self.final_message, "start_time": self.start_time, "stop_time": self.stop_time,
                "via": self.via}


class RequestBook:
    """The requests this service follows: those it submitted and those the agent listed."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.lock = threading.Lock()
        self.records: collections.OrderedDict[str, WriteRecord] = collections.OrderedDict()
        self.current: WriteRecord | None = None  # the one /writer/status shows
        self.unknown = False  # the 2023 writer state UNKNOWN: the current write failed; /writer/stop resets it
        self.on_change = on_change

    def add(self, record: WriteRecord) -> None:
        with self.lock:
            self.records[record.request_id] = record
            while len(self.records) > BOOK_MAX:
                self.records.popitem(last=False)
            self.current = record
            self.unknown = False
        self.on_change()

    def on_status(self, status: broker.StatusMessage) -> None:
        with self.lock:
            record = self.records.get(status.request_id)
            if record is None or not record.active:
                return
            self._apply(record, status)
        with record.news:
            record.news.notify_all()
        if not record.active:
            record.done.set()
        self.on_change()

    def _apply(self, record: WriteRecord, status: broker.StatusMessage) -> None:
        if status.action == broker.REQUEST_START:
            record.started = True
            record.message = status.message or "request taken"
            record.state = WAITING_IMAGES
        elif status.action == broker.REQUEST_PROGRESS:
            record.progressed = True
            n_written, n_images = progress_of(status)
            record.n_written = max(record.n_written, n_written)
            state = _progress_state(status)
            if state == "stopping" or (n_images and record.n_written >= n_images):
                record.state = FLUSHING_IMAGES
            elif record.n_written > 0:
                record.state = ACQUIRING_IMAGES
            elif state == "writing":
                record.state = WAITING_IMAGES
            record.message = f"{record.n_written}/{record.n_images} images written"
        elif status.action == broker.KILL_ACCEPTED:
            record.killed = True
        elif status.action in broker.FINAL_ACTIONS:
            record.final_action = status.action
            record.final_message = status.message
            record.stop_time = _now()
            if status.action == broker.REQUEST_SUCCESS:
                summary = _json_object(status.message)
                record.n_written = int(summary.get("images_written", record.n_written) or 0)
                record.n_lost = int(summary.get("images_lost", 0) or 0)
                record.state, record.message = FINISHED, COMPLETED
                return
            # The final count is in the reason: "... after N of M images; FILE is closed and holds them",
            # "...; FILE is closed and holds N images" (docs/writer_agent.md).
            counted = _WRITTEN_IN_REASON.search(status.message)
            if counted:
                record.n_written = int(counted.group(1) or counted.group(2))
            if record.killed or status.message.startswith(KILL_REASONS):
                record.state, record.message = FINISHED, INTERRUPTED
            else:
                record.state, record.message = FAILED, f"ERROR:{status.message}"
                if record is self.current:
                    self.unknown = True

    def note_kill(self, request_id: str) -> None:
        with self.lock:
            record = self.records.get(request_id)
            if record is not None:
                record.killed = True

    def on_listing(self, listed: list[ListedRequest]) -> None:
        """The agent's running and queued requests: adopt those not yet known, update the counts."""
        changed = False
        with self.lock:
            for item in listed:
                record = self.records.get(item.request_id)
                if record is None:
                    record = WriteRecord(item.request_id, item.output_file, item.n_images, None, None, "other")
                    record.started = True
                    self.records[item.request_id] = record
                    changed = True
                    if item.state == "running" and (self.current is None or not self.current.active):
                        self.current = record
                        self.unknown = False
                if record.active and item.n_written > record.n_written:
                    record.n_written = item.n_written
                    record.state = ACQUIRING_IMAGES
                    changed = True
        if changed:
            self.on_change()

    def reset_unknown(self) -> None:
        with self.lock:
            self.unknown = False
        self.on_change()

    def writer_status(self, broker_connected: bool) -> dict[str, Any]:
        with self.lock:
            current = self.current
            if current is not None and current.active:
                state = "WRITING"
            elif self.unknown or not broker_connected:
                state = "UNKNOWN"
            else:
                state = "READY"
            acquisition = current.acquisition() if current is not None else {
                "state": FINISHED, "message": "no write yet",
                "info": {"output_file": None, "n_images": None, "run_id": None},
                "stats": {"n_write_completed": 0, "n_write_requested": 0, "start_time": None, "stop_time": None}}
        return {"state": state, "acquisition": acquisition}

    def logs(self, n: int) -> list[dict[str, Any]]:
        with self.lock:
            records = list(self.records.values())[-n:] if n > 0 else []
            return [r.log_entry() for r in reversed(records)]


def _progress_state(status: broker.StatusMessage) -> str:
    return str(_json_object(status.message).get("state", ""))


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class CommandFailed(Exception):
    """A broker command could not be done; the message says why (for the API's error answer)."""


class BrokerLink(threading.Thread):
    """The one thread that talks to RabbitMQ (see the module docstring)."""

    def __init__(self, tag: str, book: RequestBook, url: str | None = None) -> None:
        super().__init__(name="std_web-broker", daemon=True)
        self.tag = tag
        self.book = book
        self.url = url
        self.commands: queue.SimpleQueue[tuple[Callable[[DaqClient], Any], concurrent.futures.Future]] = \
            queue.SimpleQueue()
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.error = "not connected yet"
        self.counters = Counters("broker_reconnects", "statuses_received", "listings_failed")

    def call(self, fn: Callable[[DaqClient], Any], timeout_s: float = COMMAND_TIMEOUT_S) -> Any:
        """Run `fn(client)` in the broker thread; its result, or CommandFailed."""
        if not self.connected.is_set():
            raise CommandFailed(f"no connection to RabbitMQ: {self.error}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.commands.put((fn, future))
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise CommandFailed(f"RabbitMQ did not answer within {timeout_s:g} s") from None
        except DaqClientError as exc:
            raise CommandFailed(str(exc)) from None

    def run(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                client = DaqClient(self.url, name="std_web")
            except BrokerError as exc:
                self.error = str(exc)
                log.warning("std_web: %s; trying again in %.1f s", exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)
                continue
            backoff = 0.5
            self.connected.set()
            self.error = ""
            log.info("std_web: connected to RabbitMQ at %s", broker.describe_url(client.url))
            try:
                self._serve(client)
            except BrokerError as exc:
                self.error = str(exc)
                self.counters.broker_reconnects += 1
                log.warning("std_web: %s; reconnecting", exc)
            finally:
                self.connected.clear()
                self._fail_pending(self.error or "std_web is stopping")
                client.close()
        self.book.on_change()

    def _serve(self, client: DaqClient) -> None:
        next_listing = 0.0
        while not self.stopping.is_set():
            self._run_commands(client)
            if time.monotonic() >= next_listing:
                next_listing = time.monotonic() + LIST_INTERVAL_S
                self._list(client)
            until = time.monotonic() + STATUS_SLICE_S
            for status in client.statuses(timeout_s=0.05):
                self.counters.statuses_received += 1
                self.book.on_status(status)
                if not self.commands.empty() or time.monotonic() > until or self.stopping.is_set():
                    break

    def _run_commands(self, client: DaqClient) -> None:
        while True:
            try:
                fn, future = self.commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(client))
            except BrokerError as exc:
                future.set_exception(exc)
                raise
            except Exception as exc:  # noqa: BLE001 - handed to the caller, which answers with it
                future.set_exception(exc)
            # Statuses that came in while the command waited for its answer (a kill's) stay in the client's
            # queue; statuses() hands them out next.

    def _list(self, client: DaqClient) -> None:
        try:
            listed = client.list_requests(tag=self.tag, timeout_s=2.0)
        except BrokerError:
            raise
        except DaqClientError as exc:  # no agent serves the tag now, or it did not answer: try again later
            self.counters.listings_failed += 1
            log.debug("std_web: no request listing: %s", exc)
            return
        self.book.on_listing(listed)

    def _fail_pending(self, reason: str) -> None:
        while True:
            try:
                _, future = self.commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(CommandFailed(f"no connection to RabbitMQ: {reason}"))

    def stop(self) -> None:
        self.stopping.set()


@dataclass(frozen=True)
class LiveImage:
    image_id: int
    frame: int
    status: int
    is_good_frame: bool
    dtype: str
    pixels: np.ndarray  # read-only view on the received message's bytes
    received_at: float


def live_address(config: DetectorConfig) -> str | None:
    """Where to connect for the live preview: std_stream_send's `live` address, its wildcard interface
    replaced by loopback (std_web runs on the detector server beside it)."""
    address = config.sections.get("stream_send", {}).get("live")
    if not isinstance(address, str) or not address.startswith("tcp://"):
        return None
    host, _, port = address[len("tcp://"):].rpartition(":")
    if host in ("*", "0.0.0.0", ""):
        host = "127.0.0.1"
    return f"tcp://{host}:{port}"


LIVE_DTYPES = {"uint8", "uint16", "uint32", "int32", "float32"}


def parse_live(header_bytes: bytes, blob: memoryview) -> LiveImage:
    """One live-preview message; ValueError naming what is wrong with it."""
    header = json.loads(bytes(header_bytes).decode("utf-8"))
    if not isinstance(header, dict) or header.get("htype") != "array-1.0":
        raise ValueError("not an array-1.0 header")
    shape, dtype = header.get("shape"), header.get("type")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ValueError(f"shape {shape!r} is not [rows, cols]")
    if dtype not in LIVE_DTYPES:
        raise ValueError(f"type {dtype!r} is not one of {sorted(LIVE_DTYPES)}")
    expected = shape[0] * shape[1] * np.dtype(dtype).itemsize
    if len(blob) != expected or expected > LIVE_MAX_BYTES:
        raise ValueError(f"{len(blob)} bytes of image for shape {shape} of {dtype} ({expected} bytes)")
    pixels = np.frombuffer(blob, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    image_id = header.get("image_id", 0)
    frame = header.get("frame", 0)
    status = header.get("status", 0)
    return LiveImage(int(image_id) if isinstance(image_id, int) else 0, int(frame) if isinstance(frame, int) else 0,
                     int(status) if isinstance(status, int) else 0, bool(header.get("is_good_frame", False)),
                     dtype, pixels, _now())


class LiveView(threading.Thread):
    """Subscribes to the live preview and keeps the latest image."""

    def __init__(self, address: str, on_change: Callable[[], None], context: zmq.Context | None = None) -> None:
        super().__init__(name="std_web-live", daemon=True)
        self.address = address
        self.on_change = on_change
        self.context = context or zmq.Context.instance()
        self.latest: LiveImage | None = None
        self.stopping = threading.Event()
        self.counters = Counters("live_images", "live_bad_messages")

    def run(self) -> None:
        # Two messages of HWM: a slow reader sees the newest image next, never a backlog.
        sock = make_socket(self.context, zmq.SUB, hwm=2, linger_ms=0)
        sock.connect(self.address)
        try:
            while not self.stopping.is_set():
                if not sock.poll(LIVE_POLL_MS):
                    continue
                latest = None
                while True:  # drain: keep only the newest image that waits
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        if len(parts) != 2:
                            raise ValueError(f"{len(parts)} frames, expected a header and an image")
                        latest = parse_live(parts[0].bytes, parts[1].buffer)
                        self.counters.live_images += 1
                    except (ValueError, UnicodeDecodeError) as exc:
                        self.counters.live_bad_messages += 1
                        if self.counters.live_bad_messages in (1, 10, 100) or self.counters.live_bad_messages % 1000 == 0:
                            log.warning("std_web: bad live-preview message from %s (%d so far): %s",
                                        self.address, self.counters.live_bad_messages, exc)
                if latest is not None:
                    self.latest = latest
                    self.on_change()
        finally:
            sock.close(linger=0)

    def stop(self) -> None:
        self.stopping.set()


class MetricsPoller(threading.Thread):
    """Scrapes the pipeline's Prometheus endpoints (std_web's own excluded) every `interval_s`."""

    def __init__(self, config: DetectorConfig, interval_s: float, on_change: Callable[[], None]) -> None:
        super().__init__(name="std_web-metrics", daemon=True)
        self.config = config
        self.interval_s = interval_s
        self.on_change = on_change
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.previous: list[daq_status.ServiceMetrics] = []
        self.current: list[daq_status.ServiceMetrics] = []
        self.elapsed_s = 0.0
        self.scraped_at = 0.0

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                scraped = [m for m in daq_status.scrape(self.config) if m.label != daq_status.WEB_LABEL]
            except Exception as exc:  # noqa: BLE001 - a scrape must never end the thread
                log.warning("std_web: metrics scrape failed: %r", exc)
                scraped = []
            with self.lock:
                self.elapsed_s = started - self.scraped_at if self.scraped_at else 0.0
                self.previous, self.current, self.scraped_at = self.current, scraped, started
            self.on_change()
            self.stopping.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def services(self) -> list[dict[str, Any]]:
        with self.lock:
            previous, current, elapsed = self.previous, self.current, self.elapsed_s
        before = {m.label: m.values or {} for m in previous}
        out = []
        for line, metrics in zip(daq_status.summarise(previous, current, elapsed), current):
            rates = {}
            if metrics.values and elapsed > 0:
                for name in daq_status.RATE_COUNTERS:
                    if name in metrics.values and name in before.get(metrics.label, {}):
                        rates[f"{name}_per_s"] = round((metrics.values[name] - before[metrics.label][name])
                                                       / elapsed, 2)
            out.append({"service": line.label, "up": line.up, "error": line.error,
                        "fields": {name: text for name, text in line.fields}, "rates": rates,
                        "values": dict(metrics.values or {})})
        return out

    def stats(self, image_bytes: int) -> dict[str, Any]:
        with self.lock:
            previous, current, elapsed = self.previous, self.current, self.elapsed_s
        before = {m.label: m.values or {} for m in previous}
        now = {m.label: m.values or {} for m in current}

        def rate(label: str, name: str) -> float:
            if elapsed <= 0 or name not in now.get(label, {}) or name not in before.get(label, {}):
                return 0.0
            return max(0.0, (now[label][name] - before[label][name]) / elapsed)

        producer = next((p for p in daq_status.PRODUCERS if p in now), daq_status.PRODUCERS[0])
        images_per_s = rate(producer, "images")
        writer = now.get("std_h5_writer", {})
        receivers = [label for label in now if label.startswith("std_udp_recv")]
        return {
            "detector": {"images_per_second": round(images_per_s, 2),
                         "bytes_per_second": round(images_per_s * image_bytes, 1),
                         "lost_packets": sum(now[r].get("lost_packets", 0) for r in receivers),
                         "images_incomplete": sum(now.get(producer, {}).get(k, 0) for k in
                                                  ("images_missing_packets", "images_missing_module",
                                                   "images_mismatch"))},
            "writer": {"state": daq_status.writer_state(current), "images_per_second":
                       round(rate("std_h5_writer", "images_written"), 2),
                       "images_written": writer.get("images_written", 0), "images_lost": writer.get("images_lost", 0),
                       "lag_images": daq_status.writer_lag(previous, current)},
            "services_up": sum(1 for m in current if m.values is not None),
            "services_down": [m.label for m in current if m.values is None],
        }

    def stop(self) -> None:
        self.stopping.set()


def agent_tag(config: DetectorConfig) -> str:
    """The tag of the detector's writer_agent: its `writer_agent.tag`, by default the detector name."""
    tag = config.sections.get("writer_agent", {}).get("tag")
    return tag if isinstance(tag, str) and tag else config.detector_name


class PipelineView:
    """The broker link, the metrics poller and the live view of one detector, and what they know."""

    def __init__(self, config: DetectorConfig, metrics_interval_s: float, broker_url: str | None = None) -> None:
        self.config = config
        self.tag = agent_tag(config)
        self._version = 0
        self._version_lock = threading.Lock()
        self.book = RequestBook(self._changed)
        self.broker = BrokerLink(self.tag, self.book, broker_url)
        self.metrics = MetricsPoller(config, metrics_interval_s, self._changed)
        address = live_address(config)
        self.live = LiveView(address, self._changed) if address else None

    def _changed(self) -> None:
        with self._version_lock:
            self._version += 1

    @property
    def version(self) -> int:
        return self._version

    def start(self) -> None:
        self.broker.start()
        self.metrics.start()
        if self.live is not None:
            self.live.start()

    def stop(self) -> None:
        for part in (self.live, self.metrics, self.broker):
            if part is not None:
                part.stop()

    def join(self, timeout_s: float = 5.0) -> None:
        for part in (self.live, self.metrics, self.broker):
            if part is not None and part.is_alive():
                part.join(timeout_s)

    # -- commands ---------------------------------------------------------------------------------------
    def submit(self, body: dict[str, Any]) -> WriteRecord:
        """Send a write request; its record (already in the book, so no status of it is missed)."""
        encoded = json.dumps(body).encode()

        def send(client: DaqClient) -> WriteRecord:
            request_id = client.submit_raw(encoded, tag=self.tag)
            record = WriteRecord(request_id, str(body["output_file"]), int(body["n_images"]),
                                 body.get("run_id"), body.get("user_id"), "web")
            self.book.add(record)
            return record

        return self.broker.call(send)

    def kill_current(self) -> tuple[bool, str, str]:
        """Kill the running write: (accepted, full id or "", the agent's message)."""
        answer = self.broker.call(lambda client: client.kill_and_confirm(broker.KILL_CURRENT, tag=self.tag))
        if answer.accepted:
            self.book.note_kill(answer.request_id)
        self.book.reset_unknown()
        return answer.accepted, answer.request_id, answer.message

    # -- what is known ----------------------------------------------------------------------------------
    def writer_status(self) -> dict[str, Any]:
        return self.book.writer_status(self.broker.connected.is_set())

    def stats(self) -> dict[str, int]:
        out = {**self.broker.counters.snapshot(), "broker_connected": int(self.broker.connected.is_set())}
        if self.live is not None:
            out.update(self.live.counters.snapshot())
        return out
