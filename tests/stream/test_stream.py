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
from core_buffer.formats import ImageMetadata, Verdict
from core_buffer.ipc import image_metadata_address, make_socket
from core_buffer.ringbuffer import ImageBuffer
from std_stream_recv.receiver import ReceiverSettings, StreamReceiver
from std_stream_send.sender import SenderSettings, StreamSender
from tests.conftest import free_tcp_port_block
from tests.producer import ImageProducer, expected_image


class Wrapped:
    """A socket with some methods replaced, the rest its own."""

    def __init__(self, socket, **methods):
        self._socket = socket
        self.__dict__.update(methods)

    def __getattr__(self, name):
        return getattr(self._socket, name)


def poll_until(services, condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, [s.stats() for s in services]
        for s in services:
            s.poll(0.005)


class Replication:
    """std_assembler's stand-in (a producer), a sender and a receiver between two ImageBuffers, a consumer
    of the replica's ImageMetadata stream and a view of the replica's buffer; connected once made."""

    def __init__(self, source, replica, **producer_options):
        self.producer = ImageProducer(source, **producer_options)
        self.sender = StreamSender(source, SenderSettings(source))
        self.receiver = StreamReceiver(replica, ReceiverSettings(replica))
        self.sub = make_socket(zmq.Context.instance(), zmq.SUB, hwm=1000)
        self.sub.connect(image_metadata_address(replica))
        self.replica_images = ImageBuffer.for_config(replica, create=False)
        time.sleep(0.3)  # connections up before the first image

    def close(self):
        for thing in (self.sub, self.replica_images, self.sender, self.receiver, self.producer):
            thing.close()


@pytest.fixture
def replicate():
    """Makes Replications; closes them at the end of the test."""
    made = []

    def make(source, replica, **producer_options):
        made.append(Replication(source, replica, **producer_options))
        return made[-1]

    yield make
    for replication in made:
        replication.close()


class HandFedReplica:
    """A std_stream_recv, a PUSH socket connected to it in place of std_stream_send, and a consumer of the
    replica's ImageMetadata stream; connected once made."""

    def __init__(self, replica, port):
        self.receiver = StreamReceiver(replica, ReceiverSettings(replica))
        self.push = make_socket(zmq.Context.instance(), zmq.PUSH, hwm=100)
        self.push.connect(f"tcp://127.0.0.1:{port}")
        self.sub = make_socket(zmq.Context.instance(), zmq.SUB, hwm=1000)
        self.sub.connect(image_metadata_address(replica))
        time.sleep(0.3)

    def close(self):
        for thing in (self.push, self.sub, self.receiver):
            thing.close()


@pytest.fixture
def hand_fed_replica(source_and_replica):
    _, replica, port = source_and_replica
    fed = HandFedReplica(replica, port)
    yield fed
    fed.close()


@pytest.fixture
def source_and_replica(make_config):
    """Configs of the detector-side and the replica-side buffers (same detector, their own namespaces)."""
    port = free_tcp_port_block(2)
    _, source = make_config(image_buffer_slots=16, stream_send={"to": f"tcp://127.0.0.1:{port}", "queue_images": 4})
    _, replica = make_config(namespace="replica", image_buffer_slots=16,
                             stream_recv={"bind": f"tcp://127.0.0.1:{port}", "queue_images": 4})
    return source, replica, port


def test_replica_images_equal_the_originals_and_are_published_with_a_consecutive_sequence(source_and_replica,
                                                                                           replicate):
    source, replica, _ = source_and_replica
    rep = replicate(source, replica)
    producer, sender, receiver, sub = rep.producer, rep.sender, rep.receiver, rep.sub
    replica_images = rep.replica_images
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


def test_a_slow_replica_makes_the_sender_drop_and_count_never_stall(source_and_replica, replicate):
    source, replica, _ = source_and_replica
    rep = replicate(source, replica)
    producer, sender, receiver, sub = rep.producer, rep.sender, rep.receiver, rep.sub
    # The receiver is not polled at first: a replica that stopped reading.
    for _ in range(200):
        producer.publish()
        poll_until([sender], lambda: sender.counters.images == producer.next_id - 1)
    c = sender.counters
    assert c.images_dropped > 100
    # The replica reads again: what was on its way arrives, each image either sent or, if the ring
    # buffer came round to its slot while it waited, lost and dropped by the replica (which counts it
    # as torn or, when a later image needed its slot before the verdict came, as unconfirmed).
    r = receiver.counters
    poll_until([sender, receiver], lambda: not sender.on_the_way and c.images_sent == r.images
               and c.images_lost == r.torn_images + r.unconfirmed_images)
    assert c.images_sent + c.images_dropped + c.images_lost == 200
    producer.publish()
    poll_until([sender, receiver], lambda: receiver.counters.last_image_id == 201)
    assert r.sequence_gaps == c.images_dropped and r.images == c.images_sent
    # Downstream, the replica's sequence has a gap wherever an image went missing on the way: it
    # advanced exactly as the source's (here the image ids) did.
    published = [ImageMetadata.decode(sub.recv()) for _ in range(r.images)]
    assert [m.user_1 - published[0].user_1 for m in published] == [m.id - published[0].id for m in published]


def test_the_replica_sequence_advances_by_the_source_gaps_so_consumers_there_count_them(source_and_replica, replicate):
    source, replica, _ = source_and_replica
    rep = replicate(source, replica, skip_sequence_every=3)  # as if every third message had been missed
    producer, sender, receiver, sub = rep.producer, rep.sender, rep.receiver, rep.sub
    for _ in range(9):
        producer.publish()
        poll_until([sender, receiver], lambda: receiver.counters.last_image_id == producer.next_id - 1)
    metas = [ImageMetadata.decode(sub.recv()) for _ in range(9)]
    assert [m.id for m in metas] == list(range(1, 10))
    steps = [b.user_1 - a.user_1 for a, b in zip(metas, metas[1:])]
    assert steps == [1, 2, 1, 1, 2, 1, 1, 2]  # the source skipped a number before images 3, 6 and 9
    assert receiver.counters.sequence_gaps == sender.counters.images_missed == 3
    assert receiver.counters.torn_images == receiver.counters.bad_messages == 0


def test_an_image_overwritten_on_its_way_is_dropped_by_the_replica_and_counted_once(source_and_replica, replicate):
    source, replica, _ = source_and_replica
    rep = replicate(source, replica)
    producer, sender, receiver, sub = rep.producer, rep.sender, rep.receiver, rep.sub
    image_id = producer.publish()
    assert sender.sub.poll(5000)
    encoded = sender.sub.recv()
    # The sender's two steps one by one, so that the assembler comes round to the slot in between:
    # the image is queued (its bytes are read from the slot later), then its slot is rewritten.
    sender._on_images([encoded])
    producer.images.begin_image(image_id + source.image_buffer_slots)
    poll_until([sender, receiver], lambda: receiver.counters.torn_images == 1)
    assert sender.counters.images_lost == 1 and sender.counters.images_sent == 0
    producer.publish()
    poll_until([sender, receiver], lambda: receiver.counters.images == 1)
    r = receiver.counters
    assert (r.torn_images, r.sequence_gaps, r.bad_messages, r.unconfirmed_images) == (1, 0, 0, 0)
    only = ImageMetadata.decode(sub.recv())
    assert (only.id, only.user_1) == (image_id + 1, 2)  # a consumer of the replica sees one missing
    assert not sub.poll(100)


@pytest.mark.parametrize("when", ["before-sending", "on-its-way"])
def test_an_image_of_the_same_id_from_a_later_acquisition_is_never_replicated_as_the_announced_one(
        source_and_replica, replicate, when):
    """Image 1 of acquisition A is announced; acquisition B numbers from 1 again and writes its own image 1
    (other pixels, the next sequence number) into the slot, before the sender takes A's image or while its
    bytes are on their way. The id alone matches; the sequence number does not: lost, never replicated."""
    source, replica, _ = source_and_replica
    rep = replicate(source, replica)
    producer, sender, receiver, sub = rep.producer, rep.sender, rep.receiver, rep.sub
    image_id = producer.publish()
    assert sender.sub.poll(5000)

    def acquisition_b_writes_its_image_1():
        producer.images.begin_image(image_id)[:] = 0xAB
        producer.images.commit_image(ImageMetadata(image_id, *source.image_shape, user_1=producer.sequence + 1))

    if when == "before-sending":
        acquisition_b_writes_its_image_1()
        poll_until([sender], lambda: sender.counters.images == 1)
    else:
        sender._on_images([sender.sub.recv()])  # queued: its bytes are read from the slot later
        acquisition_b_writes_its_image_1()
        poll_until([sender, receiver], lambda: receiver.counters.torn_images == 1)
    poll_until([sender, receiver], lambda: not sender.on_the_way)
    assert (sender.counters.images_lost, sender.counters.images_sent) == (1, 0)
    assert receiver.counters.images == 0 and not sub.poll(200)


def test_a_stopping_sender_still_sends_the_verdicts_of_the_images_on_their_way(source_and_replica, replicate):
    source, replica, _ = source_and_replica
    rep = replicate(source, replica)
    producer, sender, receiver = rep.producer, rep.sender, rep.receiver
    for _ in range(3):
        producer.publish()
    poll_until([sender], lambda: sender.counters.images == 3)
    sender.stop()
    assert not sender.on_the_way and not sender.verdicts
    poll_until([receiver], lambda: receiver.counters.images == 3)


def test_a_batch_of_images_is_tracked_by_markers_and_verdicted_in_one_message(make_config, replicate):
    port = free_tcp_port_block(1)
    _, source = make_config(image_buffer_slots=32, stream_send={"to": f"tcp://127.0.0.1:{port}", "queue_images": 16})
    _, replica = make_config(namespace="replica", image_buffer_slots=32,
                             stream_recv={"bind": f"tcp://127.0.0.1:{port}", "queue_images": 16})
    rep = replicate(source, replica)
    producer, sender, receiver, replica_images = rep.producer, rep.sender, rep.receiver, rep.replica_images
    for _ in range(10):
        producer.publish()
    verdict_messages, tracked, real_send = [], [], sender.data.send

    def send(data, flags=0, copy=True, track=False):
        if isinstance(data, bytes) and not flags & zmq.SNDMORE:
            verdict_messages.append(Verdict.decode_many(data))
        if isinstance(data, zmq.Frame) and not any(data is frame for frame in sender.slot_frames):
            tracked.append(sender.n_queued)  # a marker: a frame of its own
        return real_send(data, flags, copy=copy, track=track)

    sender.data = Wrapped(sender.data, send=send)
    time.sleep(0.2)  # all ten metadata messages wait for the sender: one batch
    sender.poll(0)
    # Tracked: the 8th image (at least every 8th) and the 10th (the last of the batch); the others went
    # out as the frames made once per slot.
    assert sender.n_queued == 10 and tracked == [8, 10]
    poll_until([sender, receiver], lambda: receiver.counters.images == 10)
    assert [v.image_id for message in verdict_messages for v in message] == list(range(1, 11))
    assert len(verdict_messages) <= 2  # one per marker released, at most
    for image_id in range(1, 11):
        assert np.array_equal(replica_images.image_view(image_id, "<u2", replica.image_shape),
                              expected_image(replica, image_id))


def test_a_released_marker_wakes_the_sender_at_once(source_and_replica, replicate):
    source, replica, _ = source_and_replica
    rep = replicate(source, replica)
    producer, sender, receiver = rep.producer, rep.sender, rep.receiver
    producer.publish()
    poll_until([sender], lambda: sender.n_queued == 1)
    started = time.monotonic()
    while sender.on_the_way:
        sender.poll(5.0)  # no timer: only the marker's release can end this wait early
    assert time.monotonic() - started < 2.0
    assert sender.counters.images_sent == 1
    poll_until([receiver], lambda: receiver.counters.images == 1)


def test_images_left_without_a_marker_by_a_failed_send_get_one(source_and_replica, replicate):
    source, replica, _ = source_and_replica
    rep = replicate(source, replica)
    producer, sender, receiver = rep.producer, rep.sender, rep.receiver
    real_send, headers = sender.data.send, []

    def send(data, flags=0, copy=True, track=False):  # the second image's header meets the high-water mark
        if flags & zmq.SNDMORE:
            headers.append(data)
            if len(headers) == 2:
                raise zmq.Again()
        return real_send(data, flags, copy=copy, track=track)

    for _ in range(3):
        producer.publish()
    time.sleep(0.2)  # one batch of three
    sender.data = Wrapped(sender.data, send=send)
    sender.poll(0)
    assert sender.counters.images_dropped == 2 and sender.n_queued == 1
    assert [upto for upto, _ in sender.markers] == [1]  # the empty verdict message sent as its marker
    poll_until([sender, receiver], lambda: receiver.counters.images == 1)
    assert receiver.counters.bad_messages == 0 and receiver.counters.last_image_id == 1


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


def test_the_replica_counts_and_drops_messages_that_are_not_its_images(source_and_replica, hand_fed_replica):
    _, replica, _ = source_and_replica
    receiver, push, sub = hand_fed_replica.receiver, hand_fed_replica.push, hand_fed_replica.sub
    pixels = expected_image(replica, 5)

    def image(sequence):
        return ImageMetadata(5, *replica.image_shape, user_1=sequence).encode()

    push.send(b"garbage")  # no sequence number: not an image at all
    push.send_multipart([ImageMetadata(1, 10, 10, user_1=1).encode(), b"\0" * 200])  # wrong shape
    push.send(image(2))  # no image bytes
    push.send_multipart([image(3), b"\0" * 100])  # wrong size
    push.send_multipart([image(4), pixels.tobytes(), b"\x01"])  # a frame too many
    push.send(Verdict(5, True).encode())  # a verdict for an image that never came: nothing to do
    push.send_multipart([image(5), pixels.tobytes()])
    push.send(Verdict(5, False).encode())  # torn at the source: dropped
    push.send_multipart([image(6), pixels.tobytes()])
    push.send(b"\0" * 8 + b"\x07")  # a bad verdict
    push.send(Verdict(5, True).encode())
    poll_until([receiver], lambda: receiver.counters.images == 1)
    r = receiver.counters
    assert (r.bad_messages, r.torn_images, r.sequence_gaps, r.unconfirmed_images) == (6, 1, 0, 0)
    images = ImageBuffer.for_config(replica, create=False)
    assert np.array_equal(images.image_view(5, "<u2", replica.image_shape), pixels)
    images.close()
    assert ImageMetadata.decode(sub.recv()).user_1 == 6  # the first five never published: gaps downstream


def test_one_verdict_message_confirms_several_images_and_an_empty_one_none(source_and_replica, hand_fed_replica):
    _, replica, _ = source_and_replica
    receiver, push = hand_fed_replica.receiver, hand_fed_replica.push
    for image_id in (5, 6, 7):
        push.send_multipart([ImageMetadata(image_id, *replica.image_shape, user_1=image_id).encode(),
                             expected_image(replica, image_id).tobytes()])
    push.send(b"")  # no verdicts: nothing to do
    push.send(Verdict.encode_many([Verdict(5, True), Verdict(6, False), Verdict(7, True)]))
    poll_until([receiver], lambda: receiver.counters.images == 2)
    r = receiver.counters
    assert (r.torn_images, r.bad_messages, r.sequence_gaps, r.unconfirmed_images) == (1, 0, 0, 0)
    assert r.last_image_id == 7


def test_sender_and_receiver_refuse_configs_without_an_address(make_config):
    _, config = make_config()
    with pytest.raises(ConfigError, match="stream_send.to"):
        SenderSettings(config)
    with pytest.raises(ConfigError, match="stream_recv.bind"):
        ReceiverSettings(config)
    with pytest.raises(ConfigError, match="stream_send.to"):
        SenderSettings(config, to="udp://1.2.3.4:5")
