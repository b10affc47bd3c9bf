"""A stop that cannot be queued at once still reaches std_h5_writer. writer_agent in this process on the real
RabbitMQ, driven turn by turn; in place of std_h5_writer and std_assembler, real ZMQ sockets on their
addresses that this test works by hand: a StoreStream PULL that can be left unread (the agent's PUSH queue
then fills up to its HWM), a status PUSH and an ImageMetadata PUB."""
from __future__ import annotations

import contextlib
import os
import time

import pytest
import zmq

from core_buffer.formats import ImageMetadata, StoreOp, StoreStream, WriterState, WriterStatus
from core_buffer.ipc import image_metadata_address, ipc_file, ipc_path, store_stream_address, writer_status_address
from std_daq.client import DaqClient
from writer_agent.agent import WriterAgent

pytestmark = pytest.mark.broker

WRITER_TIMEOUT_S = 1.0
STATUS_EVERY_S = 0.2  # the fake writer's status interval (std_h5_writer's writer.status_interval_s)
RUN_ID = 4242
N_IMAGES = 5_000_000  # more than the test sends: the write only ends by its stop


class FakeWriter:
    """std_h5_writer's sockets, worked by the test: StoreStream is read only when `read` is called; a
    "writing" status goes out every STATUS_EVERY_S (as a live writer with an open run does) on `tick`."""

    def __init__(self, context: zmq.Context, config, output_file: str) -> None:
        self.request_id, self.output_file = "", output_file
        self.pull = context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 1000)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.connect(store_stream_address(config))
        self.status = context.socket(zmq.PUSH)
        self.status.setsockopt(zmq.LINGER, 0)
        self.status.setsockopt(zmq.SNDTIMEO, 5000)  # the agent connects to it
        self.status.bind(writer_status_address(config))
        self.n_written = 0
        self.stop: StoreStream | None = None
        self.last_status = 0.0

    def send_status(self, state: WriterState) -> None:
        self.status.send(WriterStatus(RUN_ID, state, self.output_file, self.n_written, 0,
                                      details={"request_id": self.request_id}).encode())
        self.last_status = time.monotonic()

    def tick(self) -> None:
        if self.stop is None and time.monotonic() - self.last_status >= STATUS_EVERY_S:
            self.send_status(WriterState.WRITING)

    def read(self) -> None:
        """What is queued, for up to 0.1 s."""
        until = time.monotonic() + 0.1
        while self.stop is None and time.monotonic() < until:
            if not self.pull.poll(10):
                return
            parts = self.pull.recv_multipart()
            message = StoreStream.decode(parts[0])
            if message.op == StoreOp.WRITE:
                self.n_written += 1
            elif message.op == StoreOp.STOP:
                self.stop = message

    def close(self) -> None:
        self.pull.close()
        self.status.close()


def turn(agent: WriterAgent, writer: FakeWriter, read: bool, timeout_s: float = 0.02) -> None:
    """One turn of the agent's loop, with the writer alive (statuses) and reading or not."""
    writer.tick()
    if read:
        writer.read()
    agent.poll(timeout_s)


def test_a_stop_that_cannot_be_queued_is_sent_once_the_writer_reads_again(make_config, tmp_path, broker_url):
    out = tmp_path / "out"
    out.mkdir()
    _, config = make_config(output_dirs=[str(out)], writer_agent={"writer_timeout_s": WRITER_TIMEOUT_S})
    output_file = str(out / "full-queue.h5")
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)  # no image is dropped on this side: the agent's SUB paces them
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(image_metadata_address(config))
    agent = writer = client = None
    try:
        writer = FakeWriter(context, config, output_file)
        agent = WriterAgent(config, broker_url, context)
        client = DaqClient(broker_url)
        request_id = writer.request_id = client.submit(output_file, N_IMAGES, tag=config.detector_name,
                                                       run_id=RUN_ID)
        deadline = time.monotonic() + 15
        while agent.job is None or agent.job.state != "writing":  # the start is queued
            assert time.monotonic() < deadline, "the agent did not take the request and send its start"
            turn(agent, writer, read=False)
        job = agent.job

        # Images until the StoreStream queue is full: the writer does not read, an image more is dropped.
        image_id = 0
        deadline = time.monotonic() + 60
        while job.dropped == 0:
            assert time.monotonic() < deadline, f"the queue did not fill ({job.forwarded} images forwarded)"
            for _ in range(1000):
                image_id += 1
                pub.send(ImageMetadata(image_id, *config.image_shape, user_1=image_id, user_2=image_id).encode())
            for _ in range(2):
                turn(agent, writer, read=False, timeout_s=0)

        # The kill: its stop finds the queue full.
        client.kill(request_id, tag=config.detector_name)
        deadline = time.monotonic() + 15
        while not job.killed:
            assert time.monotonic() < deadline, "the kill did not reach the agent"
            turn(agent, writer, read=False)
        assert job.state == "stopping"

        # The writer lives on with its queue still full, longer than writer_timeout_s: its statuses keep the
        # request alive (they say it is writing), so nothing times out.
        until = time.monotonic() + WRITER_TIMEOUT_S + 1.0
        while time.monotonic() < until:
            turn(agent, writer, read=False)
        assert agent.job is job and writer.stop is None

        # It reads again: behind the images that were queued, the stop must come.
        deadline = time.monotonic() + 10 * WRITER_TIMEOUT_S
        while writer.stop is None:
            assert time.monotonic() < deadline, (
                f"no stop reached the writer: it read {writer.n_written} of the {job.forwarded} writes forwarded "
                f"and kept saying it writes; the agent waits in state {job.state!r}, and every later request "
                "would queue behind it")
            turn(agent, writer, read=True)
        assert (writer.stop.run_id, writer.stop.i_image) == (RUN_ID, job.forwarded)
        assert writer.n_written == job.forwarded

        # The writer closes the file; the request ends as a kill.
        writer.send_status(WriterState.FINISHED)
        deadline = time.monotonic() + 15
        while agent.job is job:
            assert time.monotonic() < deadline, "the agent did not end the request on the writer's final status"
            agent.poll(0.05)
        result = client.wait(request_id, timeout_s=15)
        assert not result.ok and "interrupted by a kill" in result.message, result.message
    finally:
        if agent is not None:
            agent.close()
        if writer is not None:
            writer.close()
        if client is not None:
            client.close()
        pub.close()
        context.destroy(linger=0)
        for address in (image_metadata_address(config), store_stream_address(config), writer_status_address(config)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ipc_path(address))
        with contextlib.suppress(FileNotFoundError):  # left when the test failed with the request running
            os.unlink(ipc_file(config, "writer_agent.inflight.json"))
