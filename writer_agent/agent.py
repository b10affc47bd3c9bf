"""writer_agent: write requests from RabbitMQ in, StoreStream to std_h5_writer, statuses back on RabbitMQ.

One loop, one thread. Each turn it serves the broker without blocking (deliveries, heartbeats, the
outbox of statuses) and then the running write on ZMQ (ImageMetadata in, StoreStream out, writer
status in). The data path never waits on the broker: when the connection drops, the write goes on,
statuses collect in the outbox, and the agent reconnects with exponential backoff and publishes them.

A request's life: `request_start` as soon as it is taken; a bad one gets `request_fail` at once. A good
one SUBscribes to the ImageMetadata stream, sends start, forwards the next n_images images as writes,
then stop, and waits for the writer's final status; `request_progress` follows each writer status while
it writes; the end is exactly one `request_success` (JSON summary) or `request_fail` (a reason). The
delivery is acked when that final status is handed to the broker or, with the broker away, to the
outbox. Prefetch 1 keeps the other requests waiting in the broker queue.

The running request is also noted in a small file next to the ipc sockets; an agent that starts and
finds one (its predecessor crashed or was killed -9) stops that run in the writer and ends the request
with request_fail, so no request is left without a final status.
"""
from __future__ import annotations

import base64
import collections
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import pika
import zmq

from core_buffer import broker
from core_buffer.config import DetectorConfig
from core_buffer.errors import FormatError
from core_buffer.formats import ImageMetadata, StoreOp, StoreStream, WriterState, WriterStatus
from core_buffer.ipc import image_metadata_address, make_socket, store_stream_address, writer_status_address
from core_buffer.service import Counters
from writer_agent.request import BadRequest, WriteRequest, parse_request

log = logging.getLogger("writer_agent")

SOURCE = "writer_agent"
HWM = 100000
KILLED_MEMORY = 1000  # kills of requests not (yet) seen, remembered for when their turn comes
STOP_GRACE_S = 3.0  # on SIGTERM, how long to wait for the writer to close the running file


class AgentSettings:
    """The "writer_agent" config section."""

    def __init__(self, config: DetectorConfig) -> None:
        section = config.section("writer_agent")
        self.tag = section.str("tag", config.detector_name)
        self.max_images = section.int("max_images", 10_000_000, min=1, max=(1 << 32) - 1)
        self.writer_timeout_s = section.float("writer_timeout_s", 10.0, min=0.1, max=3600.0)
        self.image_timeout_s = section.float("image_timeout_s", 0.0, min=0.0)
        self.reconnect_max_s = section.float("reconnect_max_s", 10.0, min=0.1, max=600.0)
        section.finish()


@dataclass
class Delivery:
    generation: int  # which broker connection it came on; an ack only makes sense on that one
    tag: int
    request_id: str
    body: bytes


class Job:
    """The running write."""

    STARTING, WRITING, STOPPING, RECOVERING = "starting", "writing", "stopping", "recovering"

    def __init__(self, request: WriteRequest, delivery: Delivery, images: zmq.Socket) -> None:
        self.request, self.delivery, self.images = request, delivery, images
        self.state = Job.STARTING
        self.started = time.monotonic()
        self.last_writer_news = self.started  # the writer's silence is measured from here
        self.last_image = self.started
        self.forwarded = 0
        self.gaps = 0
        self.last_sequence: int | None = None
        self.n_written = 0
        self.n_lost = 0
        self.killed = False
        self.failure: str | None = None  # set when the agent itself ends the write early


class WriterAgent:
    name = "writer_agent"
    rate_counters = ("images_forwarded",)

    def __init__(self, config: DetectorConfig, url: str | None = None, context: zmq.Context | None = None) -> None:
        self.config = config
        self.settings = AgentSettings(config)
        self.url = url or broker.broker_url()
        self.context = context or zmq.Context.instance()
        self.store = make_socket(self.context, zmq.PUSH, hwm=HWM, linger_ms=1000)
        self.store.bind(store_stream_address(config))
        self.writer_status = make_socket(self.context, zmq.PULL, hwm=HWM)
        self.writer_status.connect(writer_status_address(config))
        self.counters = Counters("requests", "requests_succeeded", "requests_failed", "requests_rejected",
                                 "requests_killed", "images_forwarded", "sequence_gaps", "bad_messages",
                                 "writer_timeouts", "broker_connected", "broker_reconnects",
                                 "statuses_pending", "busy")
        self.job: Job | None = None
        self.waiting: collections.deque[Delivery] = collections.deque()
        self.outbox: collections.deque[broker.StatusMessage] = collections.deque()
        self.killed: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.connection: pika.BlockingConnection | None = None
        self.channel: Any = None
        self.generation = 0
        self.next_connect = 0.0
        self.backoff_s = 0.5
        self.outage_logged = False
        self.inflight_path = os.path.join(config.ipc_dir, f"{config.namespace}-{config.detector_name}-writer_agent"
                                                          ".inflight.json")
        log.info("tag %r, broker %s, StoreStream on %s", self.settings.tag, broker.describe_url(self.url),
                 store_stream_address(config))
        self._connect()
        self._recover()

    # --- broker ---------------------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            self.connection = broker.connect(self.url, connection_name=f"writer_agent {self.config.detector_name}")
            channel = self.connection.channel()
            broker.declare_exchanges(channel)
            channel.basic_qos(prefetch_count=1)
            requests = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue=requests, exchange=broker.REQUEST_EXCHANGE, routing_key=self.settings.tag)
            kills = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue=kills, exchange=broker.KILL_EXCHANGE, routing_key=self.settings.tag)
            channel.basic_consume(queue=requests, on_message_callback=self._on_request)
            channel.basic_consume(queue=kills, on_message_callback=self._on_kill, auto_ack=True)
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._lost(f"cannot connect: {exc!r}")
            return
        self.channel = channel
        self.generation += 1
        self.backoff_s = 0.5
        self.counters.broker_connected = 1
        if self.generation > 1:
            self.counters.broker_reconnects += 1
        log.info("connected to %s (connection %d), serving tag %r", broker.describe_url(self.url),
                 self.generation, self.settings.tag)
        self.outage_logged = False

    def _lost(self, reason: str) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:  # noqa: BLE001 - it is already broken; closing is a courtesy
                pass
        self.connection = self.channel = None
        self.counters.broker_connected = 0
        if not self.outage_logged:
            log.warning("broker %s: %s; the running write goes on, statuses are kept until it is back "
                        "(retrying every %.1f s and up to %.0f s)", broker.describe_url(self.url), reason,
                        self.backoff_s, self.settings.reconnect_max_s)
            self.outage_logged = True
        self.next_connect = time.monotonic() + self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, self.settings.reconnect_max_s)

    def _serve_broker(self) -> None:
        if self.connection is None:
            if time.monotonic() >= self.next_connect:
                self._connect()
            if self.connection is None:
                return
        try:
            self._flush_outbox()
            self.connection.process_data_events(time_limit=0)
            self._flush_outbox()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._lost(f"connection lost: {exc!r}")

    def _flush_outbox(self) -> None:
        while self.outbox and self.channel is not None:
            status = self.outbox[0]
            self.channel.basic_publish(exchange=broker.STATUS_EXCHANGE, routing_key="", body=status.body,
                                       properties=status.properties())
            self.outbox.popleft()
        self.counters.statuses_pending = len(self.outbox)

    def _publish(self, request_id: str, body: bytes, action: str, message: str) -> None:
        self.outbox.append(broker.StatusMessage(request_id, action, SOURCE, message, body))
        if self.channel is not None:
            try:
                self._flush_outbox()
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._lost(f"connection lost while publishing: {exc!r}")
        self.counters.statuses_pending = len(self.outbox)

    def _ack(self, delivery: Delivery) -> None:
        if self.channel is None or delivery.generation != self.generation:
            return  # that connection is gone, and with it its exclusive queue and the unacked delivery
        try:
            self.channel.basic_ack(delivery_tag=delivery.tag)
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._lost(f"connection lost while acking: {exc!r}")

    def _on_request(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        delivery = Delivery(self.generation, method.delivery_tag, properties.correlation_id or "", bytes(body))
        if self.job is not None:
            self.waiting.append(delivery)  # only after a reconnect: the old queue's request is still running
            return
        self._take(delivery)

    def _on_kill(self, _channel: Any, _method: Any, properties: Any, _body: bytes) -> None:
        request_id = properties.correlation_id or ""
        job = self.job
        if job is not None and job.request.request_id == request_id:
            log.info("request %s: killed after %d of %d images", request_id, job.forwarded, job.request.n_images)
            job.killed = True
            self._send_stop(job)
            return
        self.killed[request_id] = time.monotonic()
        while len(self.killed) > KILLED_MEMORY:
            self.killed.popitem(last=False)

    # --- a write in flight when the previous agent died ----------------------------------------------

    def _remember(self, job: Job) -> None:
        """Note the running request on disk, so an agent restarted after a crash can end it."""
        r = job.request
        record = {"request_id": r.request_id, "body": base64.b64encode(job.delivery.body).decode(),
                  "output_file": r.output_file, "n_images": r.n_images, "run_id": r.run_id, "user_id": r.user_id}
        tmp = self.inflight_path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, self.inflight_path)
        except OSError as exc:
            log.warning("cannot note the running request in %s (%s); a crash would leave it without a final "
                        "status", self.inflight_path, exc)

    def _forget(self) -> None:
        try:
            os.unlink(self.inflight_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.inflight_path, exc)

    def _recover(self) -> None:
        """End the request the previous agent was running when it died: stop the writer's file and
        publish request_fail, once the writer has closed it (or has not answered in writer_timeout_s)."""
        try:
            with open(self.inflight_path) as f:
                record = json.load(f)
            request = WriteRequest(str(record["request_id"]), str(record["output_file"]), int(record["n_images"]),
                                   int(record["run_id"]), int(record["user_id"]), {})
            body = base64.b64decode(record["body"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("ignoring the unreadable %s (%s)", self.inflight_path, exc)
            self._forget()
            return
        log.warning("request %s was running when the previous writer_agent died; ending it", request.request_id)
        images = make_socket(self.context, zmq.SUB, hwm=1)
        job = Job(request, Delivery(-1, 0, request.request_id, body), images)
        job.state = Job.RECOVERING
        job.failure = "writer_agent restarted during the write (it had crashed or was killed)"
        self.job = job
        self.counters.busy = 1

    # --- requests -------------------------------------------------------------------------------------

    def _take(self, delivery: Delivery) -> None:
        self.counters.requests += 1
        rid = delivery.request_id
        self._publish(rid, delivery.body, broker.REQUEST_START, "request taken by writer_agent")
        try:
            if self.killed.pop(rid, None) is not None:
                raise BadRequest("killed before it started: a kill for this request arrived while it was queued")
            request = parse_request(rid, delivery.body, output_dirs=self.config.output_dirs,
                                    overwrite=self.config.overwrite_files, max_images=self.settings.max_images)
        except BadRequest as exc:
            self.counters.requests_rejected += 1
            self.counters.requests_failed += 1
            log.warning("request %s refused: %s", rid or "(no id)", exc)
            self._publish(rid, delivery.body, broker.REQUEST_FAIL, str(exc))
            self._ack(delivery)
            return
        images = make_socket(self.context, zmq.SUB, hwm=HWM)
        images.connect(image_metadata_address(self.config))
        self.job = Job(request, delivery, images)
        self.counters.busy = 1
        self._remember(self.job)
        log.info("request %s: %d images to %s (run %d)", rid, request.n_images, request.output_file, request.run_id)
        self._send_start(self.job)

    def _send_start(self, job: Job) -> None:
        r = job.request
        frame = json.dumps({**r.body, "output_file": r.output_file, "n_images": r.n_images, "run_id": r.run_id,
                            "user_id": r.user_id, "request_id": r.request_id}).encode()
        start = StoreStream(StoreOp.START, 0, r.n_images, r.user_id, r.run_id)
        try:
            self.store.send_multipart([start.encode(), frame], zmq.NOBLOCK)
        except zmq.Again:
            return  # no writer connected yet; tried again each turn until writer_timeout_s
        job.state = Job.WRITING
        job.last_writer_news = job.last_image = time.monotonic()

    def _send_stop(self, job: Job) -> None:
        if job.state == Job.STOPPING:
            return
        if job.state in (Job.WRITING, Job.RECOVERING):  # a start went out: it gets exactly one stop
            r = job.request
            try:
                self.store.send(StoreStream(StoreOp.STOP, job.forwarded, r.n_images, r.user_id, r.run_id).encode(),
                                zmq.NOBLOCK)
            except zmq.Again:
                if job.state == Job.RECOVERING:
                    return  # the writer has not reconnected to this new agent yet: tried again next turn
                # otherwise the writer is gone; a restarted writer has no open run to stop
        job.state = Job.STOPPING

    def _serve_job(self, timeout_s: float) -> None:
        job = self.job
        now = time.monotonic()
        if job.state == Job.STARTING:
            self._send_start(job)
            if job.state == Job.STARTING:
                if now - job.started > self.settings.writer_timeout_s:
                    self._writer_timeout(job, f"std_h5_writer is not connected to {store_stream_address(self.config)} "
                                              f"(waited {self.settings.writer_timeout_s:g} s); is it running?")
                else:
                    time.sleep(min(timeout_s, 0.02))
                return
        if job.state == Job.RECOVERING:
            self._send_stop(job)
        poller = zmq.Poller()
        poller.register(self.writer_status, zmq.POLLIN)
        if job.state == Job.WRITING:
            poller.register(job.images, zmq.POLLIN)
        events = dict(poller.poll(timeout_s * 1000))
        if job.images in events:
            self._forward_images(job)
        if self.writer_status in events:
            self._read_writer_statuses()
        if self.job is not job:
            return
        now = time.monotonic()
        if now - job.last_writer_news > self.settings.writer_timeout_s:
            self._writer_timeout(job, f"std_h5_writer sent no status for {self.settings.writer_timeout_s:g} s "
                                      f"({job.forwarded} of {job.request.n_images} images forwarded); "
                                      "is it running?")
        elif (job.state == Job.WRITING and self.settings.image_timeout_s
              and now - job.last_image > self.settings.image_timeout_s):
            job.failure = (f"no image arrived for {self.settings.image_timeout_s:g} s after {job.forwarded} of "
                           f"{job.request.n_images}; the write was stopped (is the detector sending?)")
            self._send_stop(job)

    def _forward_images(self, job: Job) -> None:
        r = job.request
        for _ in range(1000):
            try:
                data = job.images.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                meta = ImageMetadata.decode(data.buffer)
            except FormatError:
                self.counters.bad_messages += 1
                continue
            if job.last_sequence is not None and meta.user_1 > job.last_sequence + 1:
                gap = meta.user_1 - job.last_sequence - 1
                job.gaps += gap
                self.counters.sequence_gaps += gap
            job.last_sequence = meta.user_1
            job.last_image = time.monotonic()
            try:
                self.store.send(StoreStream(StoreOp.WRITE, job.forwarded, r.n_images, r.user_id, r.run_id,
                                            meta).encode(), zmq.NOBLOCK)
            except zmq.Again:
                continue  # the writer is gone: its silence ends the request; nothing to forward to
            job.forwarded += 1
            self.counters.images_forwarded += 1
            if job.forwarded == r.n_images:
                self._send_stop(job)
                return

    def _read_writer_statuses(self) -> None:
        for _ in range(1000):
            try:
                data = self.writer_status.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                status = WriterStatus.decode(data)
            except FormatError:
                self.counters.bad_messages += 1
                continue
            job = self.job
            if (job is None or status.run_id != job.request.run_id
                    or status.details.get("request_id") not in (None, job.request.request_id)):
                continue  # a status of an earlier run, after its request had ended
            job.last_writer_news = time.monotonic()
            job.n_written, job.n_lost = status.n_written, status.n_missing
            if status.state == WriterState.WRITING:
                self._publish(job.request.request_id, job.delivery.body, broker.REQUEST_PROGRESS,
                              json.dumps({"n_written": status.n_written, "n_lost": status.n_missing,
                                          "n_forwarded": job.forwarded, "n_images": job.request.n_images}))
            else:
                self._send_stop(job)  # a failed start or write still owes the writer its stop
                self._end(job, status)
                return

    def _writer_timeout(self, job: Job, reason: str) -> None:
        self.counters.writer_timeouts += 1
        if job.failure:
            reason = f"{job.failure}; {reason}"
        self._send_stop(job)
        self._end(job, None, reason)

    def _end(self, job: Job, status: WriterStatus | None, reason: str | None = None) -> None:
        r = job.request
        duration = time.monotonic() - job.started
        summary = {"output_file": r.output_file, "run_id": r.run_id, "n_images": r.n_images,
                   "images_written": job.n_written, "images_lost": job.n_lost, "sequence_gaps": job.gaps,
                   "duration_s": round(duration, 3)}
        if status is not None and status.state == WriterState.FAILED:
            reason = f"std_h5_writer: {status.error or 'failed without a reason'}"
        elif status is not None and job.killed:
            self.counters.requests_killed += 1
            reason = (f"interrupted by a kill after {job.n_written} of {r.n_images} images; {r.output_file} is "
                      f"closed and holds them")
        elif status is not None and job.failure:
            reason = f"{job.failure}; {r.output_file} is closed and holds {job.n_written} images"
        if reason is None:
            if duration > 0:
                summary["images_per_s"] = round(job.n_written / duration, 1)
            self.counters.requests_succeeded += 1
            log.info("request %s: done, %s", r.request_id, summary)
            self._publish(r.request_id, job.delivery.body, broker.REQUEST_SUCCESS, json.dumps(summary))
        else:
            self.counters.requests_failed += 1
            log.warning("request %s failed: %s", r.request_id, reason)
            self._publish(r.request_id, job.delivery.body, broker.REQUEST_FAIL, reason)
        self._ack(job.delivery)
        self._forget()
        job.images.close()
        self.job = None
        self.counters.busy = 0
        if self.waiting:
            self._take(self.waiting.popleft())

    # --- Service --------------------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> None:
        self._serve_broker()
        if self.job is not None:
            self._serve_job(timeout_s)
            return
        if self.writer_status.poll(timeout_s * 1000):
            self._read_writer_statuses()  # late statuses of ended runs: read and dropped

    def stop(self) -> None:
        job = self.job
        if job is None:
            return
        job.failure = "writer_agent was stopped (SIGTERM) during the write"
        self._send_stop(job)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.job is job and time.monotonic() < deadline:
            if self.writer_status.poll(100):
                self._read_writer_statuses()
        if self.job is job:
            self._end(job, None, f"{job.failure}; std_h5_writer did not confirm closing {job.request.output_file} "
                                 f"within {STOP_GRACE_S:g} s")
        self._serve_broker()

    def close(self) -> None:
        if self.connection is not None:
            try:
                self.connection.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
        if self.outbox:
            log.error("%d statuses could not be published (broker unreachable at exit)", len(self.outbox))
        self.store.close()
        self.writer_status.close()

    def stats(self) -> Mapping[str, int]:
        return self.counters.snapshot()
