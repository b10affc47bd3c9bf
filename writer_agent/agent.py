"""writer_agent: write requests from RabbitMQ in, StoreStream to std_h5_writer, statuses back on RabbitMQ.

Two threads. The agent's own loop does the data path on ZMQ (ImageMetadata in, StoreStream out, writer
status in) and decides everything about requests. The broker lives in `BrokerLink`'s thread (see
broker_link.py for why): the loop hands it statuses and acks and takes requests and kills from it, and
never waits on RabbitMQ. When the connection drops, the write goes on, statuses wait in the link's
outbox, and the link reconnects with exponential backoff and publishes them in order.

A request's life: `request_start` as soon as it is taken, that is received from the broker, whether it
runs at once or waits in the agent's queue behind others (request_queue.py); a bad one gets
`request_fail` right after. When its turn comes, a good one SUBscribes to the ImageMetadata stream
(dropping what comes while std_h5_writer has not taken the start), sends start, forwards the next n_images
images as writes, then stop, and waits for the writer's final status; `request_progress` follows each
writer status while it writes, and goes out at least once a second in any case (BUSY_REPORT_S); the end is
exactly one `request_success` (JSON summary) or `request_fail` (a reason). The summary also accounts for
the images forwarded (ImageTally: how many of each ImageMetadata status, the image ids skipped between
them), so that nothing the detector sent goes missing unreported. The delivery is acked right after that
final status has been confirmed by the broker.

Kills name a running or queued request by its id, a unique prefix of it, or `current`; each is answered
with `kill_accepted` or `kill_refused`. A query on the request exchange (header `query: requests`) is
answered with `request_list`. docs/writer_agent.md has the protocol.

The agent keeps a small record file next to the ipc sockets: the running request, the queued ones, and
the final statuses the broker has not confirmed yet. An agent that starts and finds one (its predecessor
crashed or was killed -9) publishes the owed final statuses, stops the run it finds in the writer and ends
that request with request_fail, and fails the queued ones, so no request is left without a final status.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import json
import logging
import os
import time
from typing import Iterator, Mapping

import zmq

from core_buffer import broker
from core_buffer.broker import KILL_ACCEPTED, KILL_REFUSED, QUERY_REQUESTS, REQUEST_LIST
from core_buffer.config import DetectorConfig
from core_buffer.errors import FormatError
from core_buffer.formats import ImageMetadata, StoreOp, StoreStream, WriterState, WriterStatus
from core_buffer.ipc import (image_metadata_address, ipc_file, make_socket, store_stream_address,
                             writer_status_address)
from core_buffer.service import Counters
from writer_agent.broker_link import CONNECT_TIMEOUT_S, BrokerLink, Delivery, Kill, Published
from writer_agent.request import BadRequest, WriteRequest, parse_request
from writer_agent.request_queue import Queued, RequestQueue, resolve_kill
from writer_agent.tally import TALLY_FIELDS, ImageTally, describe_tally

log = logging.getLogger("writer_agent")

SOURCE = "writer_agent"
HWM = 100000
FINISHED_MEMORY = 1000  # ids of requests that ended, so a kill of one says it finished (not "unknown")
STOPPING_REFUSAL = ("writer_agent is stopping (SIGTERM) and did not start this request; no file was created; "
                    "send it again once the agent is back")
STOP_GRACE_S = 3.0  # on SIGTERM, how long to wait for the writer to close the running file
FLUSH_GRACE_S = 2.0  # on SIGTERM, how long to wait for the broker to confirm the statuses still queued
INTAKE_GRACE_S = 2.0  # on SIGTERM, how long to wait for the link to hand over the requests still queued
# While a request runs, a status goes out at least this often, in every state (waiting for the writer,
# writing, stopping), whether or not std_h5_writer reports: for a client whose request waits in the queue
# (it has its request_start, and nothing more until its turn), the statuses of the running one are the only
# sign that the agent is alive and busy.
BUSY_REPORT_S = 1.0
WRITER_SILENT_MIN_S = 2.0  # see AgentSettings.writer_silent_s
START_RETRY_S = 0.02  # how often a start that std_h5_writer has not taken is sent again
RECORD_LAZY_S = 0.1  # a record change that is not urgent (a final status confirmed) is written within this
MAX_QUEUED_PROGRESS = 1000  # in a long broker outage, progress reports beyond this many waiting are dropped
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
        # Progress reports say the agent waits for std_h5_writer once it has sent no status for this long:
        # two of its status intervals (std_h5_writer's default is 1 s), and at least WRITER_SILENT_MIN_S,
        # so that a status a little late in normal running is not flagged.
        writer_interval_s = config.section("writer").float("status_interval_s", 1.0, min=0.05, max=3600.0)
        self.writer_silent_s = max(2 * writer_interval_s, WRITER_SILENT_MIN_S)


class Job:
    """The running write."""

    STARTING, WRITING, STOPPING, RECOVERING = "starting", "writing", "stopping", "recovering"

    def __init__(self, request: WriteRequest, delivery: Delivery, images: zmq.Socket,
                 totals: ImageTally | None = None) -> None:
        self.request, self.delivery, self.images = request, delivery, images
        self.state = Job.STARTING
        self.started = time.monotonic()
        self.last_writer_news = self.started  # the writer's silence is measured from here
        self.last_image = self.started
        self.last_report = self.started
        self.forwarded = 0
        self.dropped = 0  # images that reached the agent and could not be handed to std_h5_writer
        self.dropped_told = False  # the failure reason says how many already
        self.gaps = 0
        self.last_sequence: int | None = None
        self.tally = ImageTally(totals)  # of the images forwarded
        self.n_written = 0
        self.n_lost = 0
        self.killed = False
        self.stop_owed = False  # a stop is due and could not be queued yet (_send_stop)
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
                                 "requests_killed", "requests_queued", "kills_accepted", "kills_refused",
                                 "images_forwarded", "images_dropped", "sequence_gaps",
                                 "bad_messages", *TALLY_FIELDS,
                                 "writer_timeouts", "broker_connected", "broker_reconnects",
                                 "statuses_pending", "statuses_dropped", "busy")
        self.job: Job | None = None
        self.tally = ImageTally()  # of every image forwarded since the start (the requests' tallies add to it)
        self.stopping = False  # set by stop(): requests that reach the agent from then on are refused
        self.queue = RequestQueue()  # taken (request_start sent), waiting for the running one to end
        self.finished: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> final action
        # Final statuses handed to the link and not yet confirmed by the broker, by request id; they
        # stay in the record file until confirmed, so a crash meanwhile does not lose them.
        self.owed: collections.OrderedDict[str, broker.StatusMessage] = collections.OrderedDict()
        self._held: list[tuple[broker.StatusMessage, Delivery | None, bool]] | None = None  # see _batch
        self._record_stale = False  # the record is out of date, and must be written before statuses go out
        self._record_due: float | None = None  # the record is out of date, to be written by then (RECORD_LAZY_S)
        self.record_path = ipc_file(config, "writer_agent.inflight.json")
        wake_address = f"inproc://writer_agent-wake-{id(self):x}"
        self.wake = self.context.socket(zmq.PAIR)
        self.wake.setsockopt(zmq.LINGER, 0)
        self.wake.bind(wake_address)
        self.idle_poller = zmq.Poller()
        self.idle_poller.register(self.writer_status, zmq.POLLIN)
        self.idle_poller.register(self.wake, zmq.POLLIN)
        log.info("tag %r, broker %s, StoreStream on %s", self.settings.tag, broker.describe_url(self.url),
                 store_stream_address(config))
        self.link = BrokerLink(self.url, self.settings.tag, f"writer_agent {config.detector_name}",
                               self.settings.reconnect_max_s, self.context, wake_address)
        self.link.start()
        # Wait for the first connection, so that a started agent (its metrics endpoint answering) is one
        # that serves its tag; without a broker it starts anyway and the link keeps trying.
        if not self.link.connected.wait(CONNECT_TIMEOUT_S + 1.0):
            log.warning("starting without the broker; requests are served once it is reachable")
        self._recover()

    # --- the broker link ------------------------------------------------------------------------------

    def _publish(self, request_id: str, body: bytes, action: str, message: str,
                 ack: Delivery | None = None) -> None:
        if action == broker.REQUEST_PROGRESS and self.link.pending() >= MAX_QUEUED_PROGRESS:
            self.counters.statuses_dropped += 1  # stale by the time the broker is back; bodies can be 64 KiB
            return
        status = broker.StatusMessage(request_id, action, SOURCE, message, body)
        final = action in broker.FINAL_ACTIONS
        if final:
            self.owed[request_id] = status
            self._note_finished(request_id, action)
        if self._held is not None:
            self._record_stale |= final
            self._held.append((status, ack, final))
            return
        if final:
            self._save_record()
        self.link.publish(status, ack=ack, final=final)

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """Statuses published inside go to the link together at the end, after one save of the record
        (if the queue or the owed statuses changed). A burst of requests then costs one record write, not
        one per request, and no request_start goes out before the record holds its request (an agent
        killed right after would otherwise leave a started request without its final status)."""
        if self._held is not None:
            yield  # nested: the outer batch sends
            return
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            if self._record_stale:
                self._save_record()
            for status, ack, final in held:
                self.link.publish(status, ack=ack, final=final)

    def _note_finished(self, request_id: str, action: str) -> None:
        self.finished[request_id] = action
        self.finished.move_to_end(request_id)
        while len(self.finished) > FINISHED_MEMORY:
            self.finished.popitem(last=False)

    def _handle_link_events(self) -> None:
        while True:  # drain the wake-ups first: an event posted after this is still read below
            try:
                self.wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        with self._batch():
            for event in self.link.events():
                if isinstance(event, Delivery):
                    self._on_delivery(event)
                elif isinstance(event, Kill):
                    self._on_kill(event.request_id)
                elif isinstance(event, Published):
                    if self.owed.pop(event.request_id, None) is not None and self._record_due is None:
                        # Not urgent: until it is written, a crash would only publish this final status
                        # again (at least once, as documented). Under load the next write comes sooner.
                        self._record_due = time.monotonic() + RECORD_LAZY_S
            self._start_next()

    def _on_delivery(self, delivery: Delivery) -> None:
        if delivery.query is not None:
            self._answer_query(delivery)
        elif self.stopping:
            self._refuse_stopping(delivery)
        else:
            self._take(delivery)

    # --- kills and the request listing ------------------------------------------------------------------

    def _on_kill(self, target: str) -> None:
        """A kill, `target` its correlation_id as sent: a request id, a unique prefix of one, or "current"."""
        job = self.job
        running = job.request.request_id if job is not None else None
        request_id, why = resolve_kill(target, running, self.queue.ids(), self.finished)
        if request_id is None:
            self._answer_kill(target, KILL_REFUSED, why)
        elif request_id == running:
            self._kill_running(target, job)
        else:
            self._kill_queued(target, self.queue.remove(request_id))

    def _answer_kill(self, target: str, action: str, message: str) -> None:
        if action == KILL_ACCEPTED:
            self.counters.kills_accepted += 1
        else:
            self.counters.kills_refused += 1
            log.info("kill %r refused: %s", target, message)
        self._publish(target, b"", action, message)

    def _kill_running(self, target: str, job: Job) -> None:
        request_id = job.request.request_id
        if job.state == Job.STARTING:
            # No start went out, so there is no file and nothing for the writer to stop: end it now.
            self._answer_kill(target, KILL_ACCEPTED, request_id)
            log.info("request %s: killed before std_h5_writer took its start", request_id)
            self.counters.requests_killed += 1
            self._end(job, None, "killed before the write started (std_h5_writer had not taken the start yet); "
                                 "no file was created")
        elif job.state == Job.WRITING:
            self._answer_kill(target, KILL_ACCEPTED, request_id)
            log.info("request %s: killed after %d of %d images", request_id, job.forwarded, job.request.n_images)
            job.killed = True
            self._send_stop(job)
        elif job.killed:  # a second kill of it: accepted again, the first one is stopping it
            self._answer_kill(target, KILL_ACCEPTED, request_id)
        else:  # stopping anyway (all images forwarded, image_timeout_s, SIGTERM) or recovering
            why = job.failure or "all its images were forwarded and std_h5_writer is closing the file"
            self._answer_kill(target, KILL_REFUSED, f"request {request_id} is already being stopped ({why}); "
                                                    "its final status follows")

    def _kill_queued(self, target: str, queued: Queued) -> None:
        request_id = queued.request_id
        self._answer_kill(target, KILL_ACCEPTED, request_id)
        log.info("request %s: killed while queued", request_id)
        self._record_changed()
        self.counters.requests_killed += 1
        self.counters.requests_failed += 1
        self._publish(request_id, queued.delivery.body, broker.REQUEST_FAIL,
                      "killed before it started: a kill for this request arrived while it was queued; "
                      "no file was created", ack=queued.delivery)

    def _answer_query(self, delivery: Delivery) -> None:
        """A message on the request exchange with the `query` header: a question, not a write."""
        if delivery.query != QUERY_REQUESTS:
            # Answered as the bad request it is (request_start, request_fail), so that a client waiting for
            # the final status of its message gets one.
            self._publish(delivery.request_id, delivery.body, broker.REQUEST_START,
                          "request taken by writer_agent")
            self._reject(delivery, BadRequest(f"unknown query {delivery.query!r} (the query header's one value is "
                                              f"{QUERY_REQUESTS!r})"))
            return
        self._publish(delivery.request_id, delivery.body, REQUEST_LIST, json.dumps(self._listing()), ack=delivery)

    def _listing(self) -> list[dict]:
        """The running request, then the queued ones in order (docs/writer_agent.md, request_list)."""
        listed = []
        job = self.job
        if job is not None:
            r = job.request
            listed.append({"request_id": r.request_id, "state": "running", "output_file": r.output_file,
                           "n_images": r.n_images, "n_written": job.n_written})
        for queued in self.queue:
            r = queued.request
            listed.append({"request_id": r.request_id, "state": "queued", "output_file": r.output_file,
                           "n_images": r.n_images, "n_written": 0})
        return listed

    # --- the record of the running and queued requests and the owed final statuses -----------------

    def _record_changed(self) -> None:
        """The running or queued requests changed: write the record now, or at the end of the batch."""
        if self._held is not None:
            self._record_stale = True
        else:
            self._save_record()

    def _save_record(self) -> None:
        """Note the running request, the queued ones and the unconfirmed final statuses on disk (or remove
        the file when there are none), so an agent restarted after a crash can end the running and the
        queued requests and publish the owed statuses."""
        self._record_stale = False
        self._record_due = None
        running = None
        if self.job is not None:
            r = self.job.request
            running = {"request_id": r.request_id, "body": base64.b64encode(self.job.delivery.body).decode(),
                       "output_file": r.output_file, "n_images": r.n_images, "run_id": r.run_id,
                       "user_id": r.user_id}
        queued = [item.record for item in self.queue]
        owed = [{"request_id": s.request_id, "action": s.action, "message": s.message,
                 "body": base64.b64encode(s.body).decode()} for s in self.owed.values()]
        try:
            if running is None and not queued and not owed:
                os.unlink(self.record_path)
                return
            tmp = self.record_path + ".tmp"
            text = json.dumps({"running": running, "queued": queued, "owed": owed})  # (json.dump is not in C)
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.record_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot update %s (%s); a crash now would leave a request without its final status",
                        self.record_path, exc)

    def _recover(self) -> None:
        """Publish the final statuses the previous agent owed, end the request it was running when it
        died (stop the writer's file and publish request_fail once the writer has closed it, or has not
        answered in writer_timeout_s), and fail the requests it had queued (they had their request_start)."""
        try:
            with open(self.record_path) as f:
                record = json.load(f)
            running = record.get("running") if "running" in record else record  # or the one-request format
            owed = [broker.StatusMessage(str(s["request_id"]), str(s["action"]), SOURCE, str(s["message"]),
                                         base64.b64decode(s["body"])) for s in record.get("owed", [])]
            queued = [(str(q["request_id"]), base64.b64decode(q["body"])) for q in record.get("queued", [])]
            request = body = None
            if running is not None:
                request = WriteRequest(str(running["request_id"]), str(running["output_file"]),
                                       int(running["n_images"]), int(running["run_id"]), int(running["user_id"]), {})
                body = base64.b64decode(running["body"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("ignoring the unreadable %s (%s)", self.record_path, exc)
            self._save_record()
            return
        if request is not None:  # first, so that every record saved from here on still holds it
            log.warning("request %s was running when the previous writer_agent died; ending it",
                        request.request_id)
            images = make_socket(self.context, zmq.SUB, hwm=1)
            job = Job(request, Delivery(-1, 0, request.request_id, body), images)
            job.state = Job.RECOVERING
            job.failure = "writer_agent restarted during the write (it had crashed or was killed)"
            self.job = job
            self.counters.busy = 1
        with self._batch():
            self._record_stale = True
            for status in owed:
                log.warning("request %s: publishing the %s the previous writer_agent could not", status.request_id,
                            status.action)
                self._publish(status.request_id, status.body, status.action, status.message)
            for request_id, queued_body in queued:
                log.warning("request %s was queued when the previous writer_agent died; failing it", request_id)
                self.counters.requests_failed += 1
                self._publish(request_id, queued_body, broker.REQUEST_FAIL,
                              "writer_agent restarted before this request started (it had crashed or was killed "
                              "while the request was queued); no file was created; send it again")

    # --- requests -------------------------------------------------------------------------------------

    def _take(self, delivery: Delivery) -> None:
        """A write request received: it is taken now, whether it runs at once or waits behind others, and
        gets its request_start now (after the record holds it: _batch); a bad one gets request_fail
        right after. It runs when its turn comes (_start_next)."""
        self.counters.requests += 1
        ahead = len(self.queue) + (self.job is not None)
        self._publish(delivery.request_id, delivery.body, broker.REQUEST_START, "request taken by writer_agent" +
                      (f"; {ahead} request{'s' if ahead != 1 else ''} ahead of it" if ahead else ""))
        try:
            request = parse_request(delivery.request_id, delivery.body, output_dirs=self.config.output_dirs,
                                    overwrite=self.config.overwrite_files, max_images=self.settings.max_images)
        except Exception as exc:  # noqa: BLE001 - whatever the body does, the request gets its final status
            if not isinstance(exc, BadRequest):
                log.error("request %s: unexpected %s while reading it", delivery.request_id, type(exc).__name__,
                          exc_info=exc)
                exc = BadRequest(f"writer_agent could not read the request ({type(exc).__name__}: {exc})")
            self._reject(delivery, exc)
            return
        self.queue.append(Queued(delivery, request))
        self._record_changed()

    def _reject(self, delivery: Delivery, problem: BadRequest) -> None:
        self.counters.requests_rejected += 1
        self.counters.requests_failed += 1
        log.warning("request %s refused: %s", delivery.request_id or "(no id)", problem)
        self._publish(delivery.request_id, delivery.body, broker.REQUEST_FAIL, str(problem), ack=delivery)

    def _start_next(self) -> None:
        """The first queued request, when none runs. (Its path was checked when it was taken; a file that
        appeared since, std_h5_writer refuses, and the request fails with its reason.)"""
        if self.job is not None or not self.queue or self.stopping:
            return
        queued = self.queue.popleft()
        request = queued.request
        images = make_socket(self.context, zmq.SUB, hwm=HWM)
        images.connect(image_metadata_address(self.config))
        self.job = Job(request, queued.delivery, images, self.tally)
        self.counters.busy = 1
        self._record_changed()
        log.info("request %s: %d images to %s (run %d)", request.request_id, request.n_images, request.output_file,
                 request.run_id)
        self._send_start(self.job)

    def _refuse_stopping(self, delivery: Delivery) -> None:
        """A request that reached a stopping agent: request_start and request_fail, so its client knows
        at once (it would die unanswered with the agent's queue otherwise)."""
        self.counters.requests += 1
        self.counters.requests_failed += 1
        log.warning("request %s refused: writer_agent is stopping", delivery.request_id)
        self._publish(delivery.request_id, delivery.body, broker.REQUEST_START, "request taken by writer_agent")
        self._publish(delivery.request_id, delivery.body, broker.REQUEST_FAIL, STOPPING_REFUSAL, ack=delivery)

    def _refuse_queued(self) -> None:
        """On SIGTERM: the queued requests (they had their request_start) get request_fail."""
        with self._batch():
            while self.queue:
                queued = self.queue.popleft()
                self._record_changed()
                self.counters.requests_failed += 1
                log.warning("request %s refused: writer_agent is stopping", queued.request_id)
                self._publish(queued.request_id, queued.delivery.body, broker.REQUEST_FAIL, STOPPING_REFUSAL,
                              ack=queued.delivery)

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
        """A start that went out gets exactly one stop. One that cannot be queued (the writer's queue is full,
        or no writer is connected: gone, or not reconnected yet to a recovering agent) is owed, and sent
        again each turn until it goes out or the request ends; meanwhile no more images go out."""
        if job.state == Job.STOPPING and not job.stop_owed:
            return
        if job.state != Job.STARTING:
            r = job.request
            try:
                self.store.send(StoreStream(StoreOp.STOP, job.forwarded, r.n_images, r.user_id, r.run_id).encode(),
                                zmq.NOBLOCK)
            except zmq.Again:
                # A live writer with a full queue still reports "writing", which keeps the request from
                # timing out: without the stop it would never end. (A stop that reaches a restarted writer,
                # which has no open run, is ignored there.)
                job.stop_owed = True
                if job.state == Job.WRITING:
                    job.state = Job.STOPPING
                return
        job.stop_owed = False
        job.state = Job.STOPPING

    def _serve_job(self, timeout_s: float) -> None:
        job = self.job
        if job.state == Job.STARTING:
            self._discard_images(job)  # right before the start: what comes after it is what gets written
            self._send_start(job)
        if job.state == Job.RECOVERING or job.stop_owed:
            self._send_stop(job)
        poller = zmq.Poller()
        poller.register(self.wake, zmq.POLLIN)
        poller.register(self.writer_status, zmq.POLLIN)
        if job.state == Job.WRITING:
            poller.register(job.images, zmq.POLLIN)
        wait_s = min(timeout_s, START_RETRY_S) if job.state == Job.STARTING else timeout_s
        events = dict(poller.poll(wait_s * 1000))
        if self.wake in events:
            self._handle_link_events()  # a kill is acted on before more images go out
            if self.job is not job:
                return
        if job.images in events and job.state == Job.WRITING:
            self._forward_images(job)
        if self.writer_status in events:
            self._read_writer_statuses()
        if self.job is not job:
            return
        now = time.monotonic()
        if job.state == Job.STARTING:
            if now - job.started > self.settings.writer_timeout_s:
                self._writer_timeout(job, f"std_h5_writer is not connected to {store_stream_address(self.config)} "
                                          f"(waited {self.settings.writer_timeout_s:g} s); is it running?")
        elif now - job.last_writer_news > self.settings.writer_timeout_s:
            dropped = f", {job.dropped} more could not be handed to it" if job.dropped else ""
            job.dropped_told = bool(job.dropped)
            self._writer_timeout(job, f"std_h5_writer sent no status for {self.settings.writer_timeout_s:g} s "
                                      f"({job.forwarded} of {job.request.n_images} images forwarded{dropped}); "
                                      "is it running?")
        elif (job.state == Job.WRITING and self.settings.image_timeout_s
              and now - job.last_image > self.settings.image_timeout_s):
            job.failure = (f"no image arrived for {self.settings.image_timeout_s:g} s after {job.forwarded} of "
                           f"{job.request.n_images}; the write was stopped (is the detector sending?)")
            self._send_stop(job)
        if self.job is job and now - job.last_report >= BUSY_REPORT_S:
            self._report_progress(job, now - job.last_writer_news >= self.settings.writer_silent_s)

    def _report_progress(self, job: Job, writer_silent: bool = False) -> None:
        """request_progress with the writer's last counts; `writer_silent` adds that the agent is waiting
        for std_h5_writer (not connected yet, or no status from it for writer_silent_s)."""
        job.last_report = time.monotonic()
        t = job.tally
        report = {"n_written": job.n_written, "n_lost": job.n_lost, "n_forwarded": job.forwarded,
                  "n_images": job.request.n_images, "n_dropped": job.dropped, "state": job.state,
                  "images_incomplete": job.forwarded - t.statuses[0], "image_id_gaps": t.gaps,
                  "image_ids_skipped": t.skipped}
        if writer_silent or job.state == Job.STARTING:
            report["waiting_for"] = "std_h5_writer"
        self._publish(job.request.request_id, job.delivery.body, broker.REQUEST_PROGRESS, json.dumps(report))

    def _discard_images(self, job: Job) -> None:
        """Read and drop the images that came while std_h5_writer has not taken the start. The request asks
        for the next n_images once the write can begin; these are older, and by the time a late writer
        connects their slots hold other images. (Subscribing only once the start is out would miss the
        first images while the subscription is set up; so the subscription is made at once and kept
        drained.) The sequence-gap count starts afresh with the first image forwarded."""
        for _ in range(HWM):
            try:
                job.images.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
        job.last_sequence = None

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
            gap = 0
            if job.last_sequence is not None and meta.user_1 > job.last_sequence + 1:
                gap = meta.user_1 - job.last_sequence - 1
                job.gaps += gap
                self.counters.sequence_gaps += gap
            job.last_sequence = meta.user_1
            job.last_image = time.monotonic()
            try:
                self.store.send(StoreStream(StoreOp.WRITE, job.forwarded, r.n_images, r.user_id, r.run_id,
                                            meta).encode(), zmq.NOBLOCK)
            except zmq.Again:  # the writer is gone (or its queue is full): its silence ends the request
                job.dropped += 1
                self.counters.images_dropped += 1
                job.tally.passed(meta.id)  # reported as dropped; no skip of the detector's
                continue
            job.forwarded += 1
            job.tally.add(meta.id, meta.status, gap)  # the ids of the images missed are not skips either
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
                self._report_progress(job)
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
                   "images_written": job.n_written, "images_lost": job.n_lost, "images_dropped": job.dropped,
                   "sequence_gaps": job.gaps, "duration_s": round(duration, 3)}
        if status is not None and status.state == WriterState.FAILED:
            reason = f"std_h5_writer: {status.error or 'failed without a reason'}"
        elif status is not None and job.killed:
            self.counters.requests_killed += 1
            reason = (f"interrupted by a kill after {job.n_written} of {r.n_images} images; {r.output_file} is "
                      f"closed and holds them")
        elif status is not None and job.failure:
            reason = f"{job.failure}; {r.output_file} is closed and holds {job.n_written} images"
        if reason is not None and job.dropped and not job.dropped_told:
            reason = f"{reason} ({job.dropped} images could not be handed to std_h5_writer)"
        counts = job.tally.counts()
        trouble = describe_tally(counts, job.forwarded, self.config.image_id_source == "pulse_id")
        if reason is not None and trouble:
            reason = f"{reason}; of the images forwarded: {'; '.join(trouble)}"
        job.images.close()
        self.job = None  # before publishing: the record then holds the final status and no running request
        self.counters.busy = 0
        if reason is None:
            if duration > 0:
                summary["images_per_s"] = round(job.n_written / duration, 1)
            summary.update(counts)
            # A success says in words when its file is not n_images consecutive, good images (the counts
            # alone are easy to overlook: image ids skipped were nowhere reported before these fields).
            trouble += [f"{n} {what}" for n, what in ((job.n_lost, "images lost by std_h5_writer"),
                                                      (job.gaps, "images missed by writer_agent (sequence gaps)"),
                                                      (job.dropped, "images not handed to std_h5_writer")) if n]
            if trouble:
                summary["warning"] = "; ".join(trouble)
            self.counters.requests_succeeded += 1
            action, message = broker.REQUEST_SUCCESS, json.dumps(summary)
        else:
            self.counters.requests_failed += 1
            action, message = broker.REQUEST_FAIL, reason
        # The final status and the next request's start in one record write (the record is written on every
        # change and is the agent's largest cost per request).
        with self._batch():
            self._publish(r.request_id, job.delivery.body, action, message, ack=job.delivery)
            self._start_next()
        # Logged once the status is on record: from here on a crash cannot lose it.
        if reason is None:
            (log.warning if trouble else log.info)("request %s: done, %s", r.request_id, summary)
        else:
            log.warning("request %s failed: %s", r.request_id, reason)

    # --- Service --------------------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> None:
        if self._record_due is not None:
            timeout_s = max(0.0, min(timeout_s, self._record_due - time.monotonic()))
        if self.job is not None:
            self._serve_job(timeout_s)
        else:
            events = dict(self.idle_poller.poll(timeout_s * 1000))
            if self.wake in events:
                self._handle_link_events()
            if self.writer_status in events:
                self._read_writer_statuses()  # late statuses of ended runs: read and dropped
        if self._record_due is not None and time.monotonic() >= self._record_due:
            self._save_record()

    def stop(self) -> None:
        """Stop order: fail the queued requests (their clients know at once; none is started from here on),
        end the running request (stop to the writer, wait for it to close the file), stop the intake and
        refuse the requests the link hands over (those that still waited in the broker queue, beyond the
        agent's prefetch), then give the link a moment to get the statuses still queued confirmed; `close`
        then stops the link."""
        self.stopping = True
        self._refuse_queued()
        job = self.job
        if job is not None and job.state == Job.STARTING:
            self._end(job, None, "writer_agent was stopped (SIGTERM) before std_h5_writer took the start; "
                                 "no file was created")
        elif job is not None:
            job.failure = "writer_agent was stopped (SIGTERM) during the write"
            self._send_stop(job)
            deadline = time.monotonic() + STOP_GRACE_S
            while self.job is job and time.monotonic() < deadline:
                if job.stop_owed:
                    self._send_stop(job)
                if self.writer_status.poll(100):
                    self._read_writer_statuses()
            if self.job is job:
                self._end(job, None, f"{job.failure}; std_h5_writer did not confirm closing "
                                     f"{job.request.output_file} within {STOP_GRACE_S:g} s")
        self.link.stop_intake()
        if not self.link.intake_stopped.wait(INTAKE_GRACE_S):
            log.warning("the broker link did not hand over the requests still in the broker queue in time; they "
                        "go with the agent's connection, unanswered")
        self._handle_link_events()  # the requests handed over are refused here
        self.link.flush(FLUSH_GRACE_S)
        # A request that reached the agent after the hand-over (the link settles for INTAKE_SETTLE_S, so
        # only one the broker sent later still) is refused while the link can still send the refusal.
        self._handle_link_events()
        if self.link.pending():
            self.link.flush(FLUSH_GRACE_S)

    def close(self) -> None:
        self.link.stop()
        if not self.link.join(CONNECT_TIMEOUT_S + 1.0):
            log.warning("the broker link did not stop in time; leaving it to the process exit")
        self._handle_link_events()  # the last confirmations
        self._save_record()  # as they leave it (a confirmation noted lazily included): removed if nothing is owed
        if self.link.pending():
            log.error("%d statuses could not be published (broker unreachable at exit)", self.link.pending())
        if self.owed:
            log.error("%d final statuses are kept in %s; the next writer_agent start publishes them",
                      len(self.owed), self.record_path)
        self.store.close()
        self.writer_status.close()
        self.wake.close()

    def stats(self) -> Mapping[str, int]:
        self.counters.broker_connected = int(self.link.connected.is_set())
        self.counters.broker_reconnects = self.link.reconnects
        self.counters.statuses_pending = self.link.pending()
        self.counters.requests_queued = len(self.queue)
        for name, value in self.tally.counts().items():
            setattr(self.counters, name, value)
        return self.counters.snapshot()
