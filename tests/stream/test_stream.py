"""std_stream_send -> std_stream_recv over real ZMQ TCP on loopback, between real ImageBuffers, and the
live preview stream. The source is a test producer standing in for std_assembler."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zmq

from core_buffer.errors import ConfigError
from core_buffer.formats import ImageMetadata
from core_buffer.ipc import image_metadata_address, make_socket
from core_buffer.ringbuffer import ImageBuffer
from std_stream_recv.receiver import ReceiverSettings, StreamReceiver
from std_stream_send.sender import SenderSettings, StreamSender
from tests.conftest import free_tcp_port_block
from tests.producer import ImageProducer, expected_image


def poll_until(services, condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, [s.stats() for s in services]
        for s in services:
            s.poll(0.005)


@pytest.fixture
def source_and_replica(make_config):
    """Configs of the detector-side and the replica-side buffers (same detector, their own namespaces)."""
    port = free_tcp_port_block(2)
    _, source = make_config(image_buffer_slots=16, stream_send={"to": f"tcp://127.0.0.1:{port}", "queue_images": 4})
    _, replica = make_config(namespace="replica", image_buffer_slots=16,
                             stream_recv={"bind": f"tcp://127.0.0.1:{port}", "queue_images": 4})
    return source, replica, port


def test_replica_images_equal_the_originals_and_are_published_with_a_consecutive_sequence(source_and_replica):
    source, replica, _ = source_and_replica
    producer = ImageProducer(source)
    sender = StreamSender(source, SenderSettings(source))
    receiver = StreamReceiver(replica, ReceiverSettings(replica))
    sub = make_socket(zmq.Context.instance(), zmq.SUB, hwm=1000)
    sub.connect(image_metadata_address(replica))
    replica_images = ImageBuffer.for_config(replica, create=False)
    try:
        time.sleep(0.3)  # connections up before the first image
        published = []
        for _ in range(10):
            published.append(producer.publish())
            poll_until([sender, receiver], lambda: receiver.counters.images == len(published))
        metas = [ImageMetadata.decode(sub.recv()) for _ in published]
        assert [m.id for m in metas] == published
        assert [m.user_1 for m in metas] == list(range(1, 11))
        for m in metas[-8:]:  # what the 16-slot replica buffer still holds
            image = replica_images.image_view(m.id, "<u2", replica.image_shape)
            assert np.array_equal(image, expected_image(replica, m.id))
        assert receiver.counters.sequence_gaps == sender.counters.images_dropped == 0
    finally:
        for thing in (sub, replica_images, sender, receiver, producer):
            thing.close()


def test_a_slow_replica_makes_the_sender_drop_and_count_never_stall(source_and_replica):
    source, replica, _ = source_and_replica
    producer = ImageProducer(source)
    sender = StreamSender(source, SenderSettings(source))
    receiver = StreamReceiver(replica, ReceiverSettings(replica))  # not polled: a replica that stopped reading
    try:
        time.sleep(0.3)
        for _ in range(200):
            producer.publish()
            poll_until([sender], lambda: sender.counters.images == producer.next_id - 1)
        c = sender.counters
        assert c.images_lost == 0
        assert c.images_dropped > 100 and c.images_sent + c.images_dropped == 200
        # The replica reads again: it gets what was queued, and once that is through, new images again.
        poll_until([sender, receiver], lambda: receiver.counters.images == c.images_sent)
        time.sleep(0.1)
        sender.poll(0.01)
        producer.publish()
        poll_until([sender, receiver], lambda: receiver.counters.last_image_id == 201)
        assert receiver.counters.sequence_gaps >= c.images_dropped - 1 > 0
    finally:
        for thing in (sender, receiver, producer):
            thing.close()


def test_a_late_preview_viewer_gets_a_valid_header_and_the_current_image(make_config):
    port = free_tcp_port_block(1)
    _, config = make_config(image_buffer_slots=16)
    producer = ImageProducer(config)
    sender = StreamSender(config, SenderSettings(config, live=f"tcp://127.0.0.1:{port}", live_rate_hz=0.0))
    stop = threading.Event()

    def run_sender():
        while not stop.is_set():
            sender.poll(0.01)

    thread = threading.Thread(target=run_sender)
    thread.start()
    viewer = make_socket(zmq.Context.instance(), zmq.SUB, hwm=2)
    try:
        producer.start(rate_hz=100)
        time.sleep(0.5)  # the stream is well under way
        viewer.connect(f"tcp://127.0.0.1:{port}")
        assert viewer.poll(5000)
        header, blob = viewer.recv_multipart()
        h = json.loads(header)
        assert h["htype"] == "array-1.0" and h["shape"] == list(config.image_shape) and h["type"] == "uint16"
        assert h["detector_name"] == config.detector_name and h["is_good_frame"] is True
        image = np.frombuffer(blob, np.uint16).reshape(config.image_shape)
        assert np.array_equal(image, expected_image(config, h["image_id"]))
        time.sleep(1.0)  # a viewer that stops reading for a second ...
        stale = 0
        while True:
            assert viewer.poll(2000)
            header, _ = viewer.recv_multipart()
            if producer.next_id - 1 - json.loads(header)["image_id"] < 5:
                break
            stale += 1
        assert stale < 20, stale  # ... finds what the socket buffers held (of 100 images), then current ones
    finally:
        stop.set()
        thread.join()
        viewer.close()
        producer.close()
        sender.close()


def test_the_replica_counts_and_drops_messages_that_are_not_its_images(source_and_replica):
    _, replica, port = source_and_replica
    receiver = StreamReceiver(replica, ReceiverSettings(replica))
    push = make_socket(zmq.Context.instance(), zmq.PUSH, hwm=100)
    push.connect(f"tcp://127.0.0.1:{port}")
    good = ImageMetadata(5, *replica.image_shape, user_1=1)
    pixels = expected_image(replica, 5)
    try:
        push.send(b"garbage")
        push.send_multipart([ImageMetadata(1, 10, 10, user_1=1).encode(), b"\0" * 200])  # wrong shape
        push.send(good.encode())  # no image bytes
        push.send_multipart([good.encode(), b"\0" * 100, b"\x01"])  # wrong size
        push.send_multipart([good.encode(), pixels.tobytes()])  # no check frame
        push.send_multipart([good.encode(), pixels.tobytes(), b"\x00"])  # torn at the source: dropped
        push.send_multipart([good.encode(), pixels.tobytes(), b"\x01"])
        poll_until([receiver], lambda: receiver.counters.images == 1)
        assert receiver.counters.bad_messages == 5 and receiver.counters.torn_images == 1
        images = ImageBuffer.for_config(replica, create=False)
        assert np.array_equal(images.image_view(5, "<u2", replica.image_shape), pixels)
        images.close()
    finally:
        push.close()
        receiver.close()


def test_sender_and_receiver_refuse_configs_without_an_address(make_config):
    _, config = make_config()
    with pytest.raises(ConfigError, match="stream_send.to"):
        SenderSettings(config)
    with pytest.raises(ConfigError, match="stream_recv.bind"):
        ReceiverSettings(config)
    with pytest.raises(ConfigError, match="stream_send.to"):
        SenderSettings(config, to="udp://1.2.3.4:5")
