"""writer_agent: write requests from RabbitMQ in, StoreStream to std_h5_writer, statuses back on RabbitMQ.

Two threads. The agent's own loop does the data path on ZMQ (ImageMetadata in, StoreStream out, writer
status in) and decides everything about requests. The broker lives in `BrokerLink`'s thread (see
broker_link.py for why): the loop hands it statuses and acks and takes requests and kills from it, and
never waits on RabbitMQ. When the connection drops, the write goes on, statuses wait in the link's
outbox, and the link reconnects with exponential backoff and publishes them in order.

A request's life: `request_start` as soon as it is taken; a bad one gets `request_fail` at once. A good
one SUBscribes to the ImageMetadata stream (dropping what comes while std_h5_writer has not taken the
start), sends start, forwards the next n_images images as writes,
then stop, and waits for the writer's final status; `request_progress` follows each writer status while
it writes, and goes out at least once a second in any case (BUSY_REPORT_S); the end is exactly
one `request_success` (JSON summary) or `request_fail` (a reason). The summary also accounts for the images
forwarded (ImageTally: how many of each ImageMetadata status, the image ids skipped between them), so
that nothing the detector sent goes missing unreported. The delivery is acked right after
that final status has been confirmed by the broker. Prefetch 1 keeps the other requests waiting in the
broker queue.

The agent keeps a small record file next to the ipc sockets: the running request, and the final
statuses the broker has not confirmed yet. An agent that starts and finds one (its predecessor crashed or
was killed -9) publishes the owed final statuses, and stops the run it finds in the writer and ends that
request with request_fail, so no request is left without a final status.
"""
from __future__ import annotations

import base64
import collections
import json
import logging
import os
import time
from typing import Mapping

import zmq

from core_buffer import broker
from core_buffer.config import DetectorConfig
from core_buffer.errors import FormatError
from core_buffer.formats import ImageMetadata, StoreOp, StoreStream, WriterState, WriterStatus
from core_buffer.ipc import (image_metadata_address, ipc_file, make_socket, store_stream_address,
                             writer_status_address)
from core_buffer.service import Counters
from writer_agent.broker_link import CONNECT_TIMEOUT_S, BrokerLink, Delivery, Kill, Published
from writer_agent.request import BadRequest, WriteRequest, parse_request

log = logging.getLogger("writer_agent")

SOURCE = "writer_agent"
HWM = 100000
KILLED_MEMORY = 1000  # kills of requests not (yet) seen, remembered for when their turn comes
STOP_GRACE_S = 3.0  # on SIGTERM, how long to wait for the writer to close the running file
FLUSH_GRACE_S = 2.0  # on SIGTERM, how long to wait for the broker to confirm the statuses still queued
INTAKE_GRACE_S = 2.0  # on SIGTERM, how long to wait for the link to hand over the requests still queued
# While a request runs, a status goes out at least this often, in every state (waiting for the writer,
# writing, stopping), whether or not std_h5_writer reports: for a client whose request waits in the queue,
# the statuses of the running one are the only sign that the agent is alive and busy (std_daq.client's
# RequestNotTaken waits START_TIMEOUT_S = 5 s for one).
BUSY_REPORT_S = 1.0
WRITER_SILENT_MIN_S = 2.0  # see AgentSettings.writer_silent_s
START_RETRY_S = 0.02  # how often a start that std_h5_writer has not taken is sent again
MAX_QUEUED_PROGRESS = 1000  # in a long broker outage, progress reports beyond this many waiting are dropped
# ImageMetadata.status 0..3 (design document §4), counted under the names std_assembler's counters use;
# any other value (none is defined) goes to "images_other_status".
STATUS_FIELDS = ("images_good", "images_missing_packets", "images_mismatch", "images_missing_module")
TALLY_FIELDS = (*STATUS_FIELDS, "images_other_status", "images_incomplete", "image_id_gaps", "image_ids_skipped",
                "image_id_backward_jumps")


class ImageTally:
    """What the images a request forwarded to std_h5_writer were: how many of each ImageMetadata status,
    and the jumps in their ids, in the order they were forwarded (the order of the file's rows).

    Ids of Jungfrau, Eiger and Gigafrost are frame counters, consecutive within a run of the detector, and
    std_assembler publishes a run's ids in rising order; so a step of more than one is images the detector
    counted that the file does not hold (they never reached the ImageBuffer: a receiver or the assembler
    restarting; or the detector skipped them). Images the agent itself lost are not among those skips,
    since they are reported apart: `add` takes the number of images it missed just before this one
    (sequence gaps), which are taken off the step, and `passed` notes the id of an image it could not
    hand to std_h5_writer (images_dropped) without counting it. A step to an id not above the previous
    one is not a skip: the detector restarted (its counter began again) or an id repeated; it is counted in
    `image_id_backward_jumps`, and counting goes on from the new id. `add` is the agent's per-image path:
    two list increments and an integer comparison.

    `totals`, if given, is the agent's tally over all requests, counted along (its own `add` is never
    called: a jump between two requests' images is none of theirs)."""

    __slots__ = ("statuses", "last_id", "gaps", "skipped", "backward", "totals")

    def __init__(self, totals: ImageTally | None = None) -> None:
        self.statuses = [0] * (len(STATUS_FIELDS) + 1)  # the last one: any other status value
        self.last_id: int | None = None
        self.gaps = self.skipped = self.backward = 0
        self.totals = totals

    def add(self, image_id: int, status: int, missed: int = 0) -> None:
        """An image forwarded; `missed`: how many images the agent missed right before it (a sequence gap)."""
        i = status if status < len(STATUS_FIELDS) else -1
        self.statuses[i] += 1
        if self.totals is not None:
            self.totals.statuses[i] += 1
        last, self.last_id = self.last_id, image_id
        if last is not None and image_id != last + 1:
            self._jump(image_id - last, missed)

    def passed(self, image_id: int) -> None:
        """An image that reached the agent and was not forwarded (counted in images_dropped): the next
        step is measured from it, so it is no skip of the detector's."""
        self.last_id = image_id

    def _jump(self, step: int, missed: int) -> None:
        tallies = (self,) if self.totals is None else (self, self.totals)
        if step < 1:
            for tally in tallies:
                tally.backward += 1
            return
        skipped = step - 1 - missed  # the ids the agent's own misses do not explain
        if skipped > 0:
            for tally in tallies:
                tally.gaps += 1
                tally.skipped += skipped

    def counts(self) -> dict[str, int]:
        """The TALLY_FIELDS, as they go into the request's summary."""
        out = dict(zip((*STATUS_FIELDS, "images_other_status"), self.statuses))
        out["images_incomplete"] = sum(self.statuses) - self.statuses[0]
        out["image_id_gaps"], out["image_ids_skipped"] = self.gaps, self.skipped
        out["image_id_backward_jumps"] = self.backward
        return out


def describe_tally(counts: Mapping[str, int], n_images: int, skips_expected: bool) -> list[str]:
    """Phrases for what is wrong in a tally's counts (none when nothing is): skipped ids (left out when
    `skips_expected`: pulse ids as image ids, where a reduced rate skips ids by design), ids going back,
    incomplete images."""
    out = []
    if counts["image_ids_skipped"] and not skips_expected:
        gaps = counts["image_id_gaps"]
        out.append(f"{counts['image_ids_skipped']} image ids skipped in {gaps} gap{'s' if gaps != 1 else ''} "
                   "(images the detector counted that never reached the ImageBuffer, or that it skipped)")
    if counts["image_id_backward_jumps"]:
        out.append(f"the image id went back {counts['image_id_backward_jumps']} time(s) (a detector restart?)")
    if counts["images_incomplete"]:
        kinds = ", ".join(f"{counts[name]} {name[len('images_'):].replace('_', ' ')}"
                          for name in (*STATUS_FIELDS[1:], "images_other_status") if counts[name])
        out.append(f"{counts['images_incomplete']} of {n_images} images incomplete ({kinds})")
    return out


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
                                 "requests_killed", "images_forwarded", "images_dropped", "sequence_gaps",
                                 "bad_messages", *TALLY_FIELDS,
                                 "writer_timeouts", "broker_connected", "broker_reconnects",
                                 "statuses_pending", "statuses_dropped", "busy")
        self.job: Job | None = None
        self.tally = ImageTally()  # of every image forwarded since the start (the requests' tallies add to it)
        self.stopping = False  # set by stop(): requests that reach the agent from then on are refused
        self.waiting: collections.deque[Delivery] = collections.deque()
        self.killed: collections.OrderedDict[str, float] = collections.OrderedDict()
        # Final statuses handed to the link and not yet confirmed by the broker, by request id; they
        # stay in the record file until confirmed, so a crash meanwhile does not lose them.
        self.owed: collections.OrderedDict[str, broker.StatusMessage] = collections.OrderedDict()
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
            self._save_record()
        self.link.publish(status, ack=ack, final=final)

    def _handle_link_events(self) -> None:
        while True:  # drain the wake-ups first: an event posted after this is still read below
            try:
                self.wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        for event in self.link.events():
            if isinstance(event, Delivery):
                if self.stopping:
                    self._refuse_stopping(event)
                elif self.job is not None:
                    self.waiting.append(event)  # only after a reconnect: the old queue's request is still running
                else:
                    self._take(event)
            elif isinstance(event, Kill):
                self._on_kill(event.request_id)
            elif isinstance(event, Published):
                if self.owed.pop(event.request_id, None) is not None:
                    self._save_record()

    def _on_kill(self, request_id: str) -> None:
        job = self.job
        if job is None or job.request.request_id != request_id:
            self.killed[request_id] = time.monotonic()
            while len(self.killed) > KILLED_MEMORY:
                self.killed.popitem(last=False)
            return
        if job.state == Job.STARTING:
            # No start went out, so there is no file and nothing for the writer to stop: end it now.
            log.info("request %s: killed before std_h5_writer took its start", request_id)
            self.counters.requests_killed += 1
            self._end(job, None, "killed before the write started (std_h5_writer had not taken the start yet); "
                                 "no file was created")
        elif job.state == Job.WRITING:
            log.info("request %s: killed after %d of %d images", request_id, job.forwarded, job.request.n_images)
            job.killed = True
            self._send_stop(job)
        else:
            log.info("request %s: kill ignored, the write is already being stopped", request_id)

    # --- the record of the running request and the owed final statuses ------------------------------

    def _save_record(self) -> None:
        """Note the running request and the unconfirmed final statuses on disk (or remove the file when
        there are none), so an agent restarted after a crash can end the one and publish the others."""
        running = None
        if self.job is not None:
            r = self.job.request
            running = {"request_id": r.request_id, "body": base64.b64encode(self.job.delivery.body).decode(),
                       "output_file": r.output_file, "n_images": r.n_images, "run_id": r.run_id,
                       "user_id": r.user_id}
        owed = [{"request_id": s.request_id, "action": s.action, "message": s.message,
                 "body": base64.b64encode(s.body).decode()} for s in self.owed.values()]
        try:
            if running is None and not owed:
                os.unlink(self.record_path)
                return
            tmp = self.record_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"running": running, "owed": owed}, f)
            os.replace(tmp, self.record_path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot update %s (%s); a crash now would leave a request without its final status",
                        self.record_path, exc)

    def _recover(self) -> None:
        """Publish the final statuses the previous agent owed, and end the request it was running when it
        died: stop the writer's file and publish request_fail, once the writer has closed it (or has not
        answered in writer_timeout_s)."""
        try:
            with open(self.record_path) as f:
                record = json.load(f)
            running = record.get("running") if "running" in record else record  # or the one-request format
            owed = [broker.StatusMessage(str(s["request_id"]), str(s["action"]), SOURCE, str(s["message"]),
                                         base64.b64decode(s["body"])) for s in record.get("owed", [])]
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
        for status in owed:
            log.warning("request %s: publishing the %s the previous writer_agent could not", status.request_id,
                        status.action)
            self._publish(status.request_id, status.body, status.action, status.message)
        if request is None:
            return
        log.warning("request %s was running when the previous writer_agent died; ending it", request.request_id)
        images = make_socket(self.context, zmq.SUB, hwm=1)
        job = Job(request, Delivery(-1, 0, request.request_id, body), images)
        job.state = Job.RECOVERING
        job.failure = "writer_agent restarted during the write (it had crashed or was killed)"
        self.job = job
        self.counters.busy = 1
        self._save_record()

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
        except Exception as exc:  # noqa: BLE001 - whatever the body does, the request gets its final status
            if not isinstance(exc, BadRequest):
                log.error("request %s: unexpected %s while reading it", rid, type(exc).__name__, exc_info=exc)
                exc = BadRequest(f"writer_agent could not read the request ({type(exc).__name__}: {exc})")
            self.counters.requests_rejected += 1
            self.counters.requests_failed += 1
            log.warning("request %s refused: %s", rid or "(no id)", exc)
            self._publish(rid, delivery.body, broker.REQUEST_FAIL, str(exc), ack=delivery)
            return
        images = make_socket(self.context, zmq.SUB, hwm=HWM)
        images.connect(image_metadata_address(self.config))
        self.job = Job(request, delivery, images, self.tally)
        self.counters.busy = 1
        self._save_record()
        log.info("request %s: %d images to %s (run %d)", rid, request.n_images, request.output_file, request.run_id)
        self._send_start(self.job)

    def _refuse_stopping(self, delivery: Delivery) -> None:
        """A request that reached a stopping agent: request_start and request_fail, so its client knows
        at once (it would die unanswered with the agent's queue otherwise)."""
        self.counters.requests += 1
        self.counters.requests_failed += 1
        log.warning("request %s refused: writer_agent is stopping", delivery.request_id)
        self._publish(delivery.request_id, delivery.body, broker.REQUEST_START, "request taken by writer_agent")
        self._publish(delivery.request_id, delivery.body, broker.REQUEST_FAIL,
                      "writer_agent is stopping (SIGTERM) and did not start this request; no file was created; "
                      "send it again once the agent is back", ack=delivery)

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
            self._publish(r.request_id, job.delivery.body, broker.REQUEST_SUCCESS, json.dumps(summary),
                          ack=job.delivery)
            # Logged once the status is on record: from here on a crash cannot lose it.
            (log.warning if trouble else log.info)("request %s: done, %s", r.request_id, summary)
        else:
            self.counters.requests_failed += 1
            self._publish(r.request_id, job.delivery.body, broker.REQUEST_FAIL, reason, ack=job.delivery)
            log.warning("request %s failed: %s", r.request_id, reason)
        if self.waiting and not self.stopping:
            self._take(self.waiting.popleft())

    # --- Service --------------------------------------------------------------------------------------

    def poll(self, timeout_s: float) -> None:
        if self.job is not None:
            self._serve_job(timeout_s)
            return
        events = dict(self.idle_poller.poll(timeout_s * 1000))
        if self.wake in events:
            self._handle_link_events()
        if self.writer_status in events:
            self._read_writer_statuses()  # late statuses of ended runs: read and dropped

    def stop(self) -> None:
        """Stop order: end the running request (stop to the writer, wait for it to close the file; no
        request is taken after it), stop the intake, refuse the requests that reached the agent but were
        not started (those that waited in the broker queue included: the link hands them over), then give
        the link a moment to get the statuses still queued confirmed; `close` then stops the link."""
        self.stopping = True
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
            log.warning("the broker link did not hand over the queued requests in time; they go with the "
                        "agent's connection, unanswered")
        self._handle_link_events()  # the requests handed over are refused here
        while self.waiting:
            self._refuse_stopping(self.waiting.popleft())
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
        for name, value in self.tally.counts().items():
            setattr(self.counters, name, value)
        return self.counters.snapshot()
