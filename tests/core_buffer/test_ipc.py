"""The ZMQ addresses and shared-memory names are DESIGN.md §1's, written out here as literal strings (not
built with the functions under test), and every socket gets its HWM and linger set explicitly."""
import pytest
import zmq

from core_buffer import parse_config
from core_buffer.ipc import (
    DEFAULT_LINGER_MS,
    PUSH_LINGER_MS,
    image_metadata_address,
    ipc_path,
    make_socket,
    module_frames_address,
    store_stream_address,
    writer_status_address,
)
from core_buffer.ringbuffer import shm_name


@pytest.fixture
def jf01():
    return parse_config({"detector_name": "JF01", "detector_type": "jungfrau", "n_modules": 4, "bit_depth": 16,
                         "image_pixel_height": 2048, "image_pixel_width": 1024, "start_udp_port": 50000})


def test_addresses_are_the_ones_of_the_design(jf01):
    assert module_frames_address(jf01, 0) == "ipc:///tmp/std-daq-JF01-frames-0"
    assert module_frames_address(jf01, 3) == "ipc:///tmp/std-daq-JF01-frames-3"
    assert image_metadata_address(jf01) == "ipc:///tmp/std-daq-JF01-assembler"
    assert store_stream_address(jf01) == "ipc:///tmp/std-daq-JF01-writer_agent"
    assert writer_status_address(jf01) == "ipc:///tmp/std-daq-JF01-writer_status"


def test_shared_memory_names_are_the_ones_of_the_design(jf01):
    assert shm_name(jf01, "frames") == "std-daq-JF01-frames"
    assert shm_name(jf01, "images") == "std-daq-JF01-images"


def test_namespace_and_ipc_dir_replace_only_their_part_of_the_names():
    replica = parse_config({"detector_name": "JF01", "detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
                            "image_pixel_height": 512, "image_pixel_width": 1024, "start_udp_port": 50000,
                            "namespace": "replica", "ipc_dir": "/run/std-daq"})
    assert image_metadata_address(replica) == "ipc:///run/std-daq/replica-JF01-assembler"
    assert module_frames_address(replica, 0) == "ipc:///run/std-daq/replica-JF01-frames-0"
    assert shm_name(replica, "images") == "replica-JF01-images"
    assert ipc_path("ipc:///run/std-daq/replica-JF01-assembler") == "/run/std-daq/replica-JF01-assembler"
    assert ipc_path("tcp://127.0.0.1:9610") is None


def test_the_lingers_are_the_documented_ones():
    assert PUSH_LINGER_MS == 2000  # a PUSH stream hands over what is queued on a clean stop
    assert DEFAULT_LINGER_MS == 0  # nothing else waits at close


@pytest.mark.parametrize("kind,linger", [(zmq.PUSH, 2000), (zmq.PULL, 0), (zmq.PUB, 0), (zmq.SUB, 0)])
def test_make_socket_sets_both_hwms_and_the_linger_of_its_kind(kind, linger):
    context = zmq.Context()
    try:
        sock = make_socket(context, kind, hwm=1234)
        try:
            assert sock.getsockopt(zmq.SNDHWM) == 1234
            assert sock.getsockopt(zmq.RCVHWM) == 1234
            assert sock.getsockopt(zmq.LINGER) == linger
        finally:
            sock.close()
    finally:
        context.term()


def test_make_socket_takes_an_explicit_linger():
    context = zmq.Context()
    try:
        sock = make_socket(context, zmq.PUSH, hwm=10, linger_ms=250)
        try:
            assert sock.getsockopt(zmq.LINGER) == 250
        finally:
            sock.close()
    finally:
        context.term()


def test_a_sub_socket_gets_its_subscription(tmp_path):
    """ZMQ cannot read a subscription back: a SUB made by make_socket must receive what a PUB sends, and
    one subscribed to a prefix only what starts with it."""
    context = zmq.Context()
    address = f"ipc://{tmp_path}/pub"
    pub = make_socket(context, zmq.PUB, hwm=100)
    every = make_socket(context, zmq.SUB, hwm=100)
    some = make_socket(context, zmq.SUB, hwm=100, subscribe=b"B")
    try:
        pub.bind(address)
        every.connect(address)
        some.connect(address)
        got_every, got_some = [], []
        # PUB drops messages until a subscriber's connection is up (slow joiner): send until both got one.
        for _ in range(500):
            pub.send(b"A")
            pub.send(b"B")
            if every.poll(10):
                got_every.append(every.recv())
            if some.poll(10):
                got_some.append(some.recv())
            if got_every and b"B" in got_some:
                break
        assert got_every
        assert set(got_some) == {b"B"}
    finally:
        for sock in (pub, every, some):
            sock.close()
        context.term()
