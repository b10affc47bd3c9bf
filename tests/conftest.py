"""Fixtures shared by all tests, and the guard that fails a test leaking shared memory or processes."""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import psutil
import pytest

from core_buffer import DetectorConfig, load_config
from core_buffer.ringbuffer import SHM_DIR, unlink

BROKER_HOST, BROKER_PORT = "127.0.0.1", 5672

# The console scripts live next to the interpreter running the tests (a venv's bin/); put them on PATH so
# tests and the processes they start find `std-daq`, `std_udp_recv`, ... without an activated venv.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


# Segments of the detectors this test was given (see the detector_name fixture), in any namespace (a
# replica's included); others on the machine (a running pipeline, a benchmark, another test run at the same
# time) are none of the leak guard's business.
_SEGMENT = re.compile(r"^[^/]+-(?P<detector>[^/]+)-(frames|images)$")
_detectors_of_this_test: set[str] = set()


def _segments() -> set[str]:
    return {name for name in os.listdir(SHM_DIR)
            if (m := _SEGMENT.match(name)) and m["detector"] in _detectors_of_this_test}


def _children() -> list[psutil.Process]:
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(autouse=True)
def leak_guard() -> Any:
    """Fail any test that leaves a std-daq shared-memory segment or a child process behind."""
    _detectors_of_this_test.clear()
    before_segments = _segments()
    before_children = {p.pid for p in _children()}
    yield
    leaked_children = [p for p in _children() if p.pid not in before_children]
    for proc in leaked_children:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leaked_children, timeout=5)
    leaked_segments = sorted(_segments() - before_segments)
    for name in leaked_segments:
        unlink(name)
    problems = []
    if leaked_children:
        problems.append("child processes left running: " +
                        ", ".join(f"{p.pid}" for p in leaked_children))
    if leaked_segments:
        problems.append("shared-memory segments left behind: " + ", ".join(leaked_segments))
    if problems:
        pytest.fail("leak guard: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def detector_name() -> str:
    """A detector name no other test uses, so shm and ipc names never collide."""
    name = "t" + uuid.uuid4().hex[:10]
    _detectors_of_this_test.add(name)
    return name


ConfigFactory = Callable[..., tuple[Path, DetectorConfig]]


@pytest.fixture
def make_config(tmp_path: Path, detector_name: str) -> Any:
    """Write a detector config (a small Jungfrau by default; keyword arguments override keys) and remove
    the shared-memory segments of its detector when the test ends."""
    made: list[DetectorConfig] = []

    def factory(**overrides: Any) -> tuple[Path, DetectorConfig]:
        raw: dict[str, Any] = {
            "detector_name": detector_name,
            "detector_type": "jungfrau",
            "n_modules": 1,
            "bit_depth": 16,
            "image_pixel_height": 512,
            "image_pixel_width": 1024,
            "start_udp_port": free_udp_port_range(overrides.get("n_modules", 1)),
            "frame_buffer_slots": 8,
            "image_buffer_slots": 8,
            "stats_interval_s": 1.0,
        }
        raw.update(overrides)
        path = tmp_path / f"{raw['detector_name']}-{len(made)}.json"
        path.write_text(json.dumps(raw))
        config = load_config(path)
        made.append(config)
        return path, config

    yield factory
    for config in made:
        for kind in ("frames", "images"):
            unlink(f"{config.namespace}-{config.detector_name}-{kind}")


def free_udp_port_range(n: int) -> int:
    """A first port of n consecutive UDP ports that are free on loopback right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            start = probe.getsockname()[1]
        if start + n > 65535:
            continue
        socks = []
        try:
            for port in range(start, start + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            _HANDED_OUT_PORTS.update(range(start, start + n))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no range of {n} free UDP ports found")


_HANDED_OUT_PORTS: set[int] = set()


def free_tcp_port_block(n: int) -> int:
    """A first port of n consecutive TCP ports free on loopback right now (for metrics endpoints), none of
    them handed out before in this test run: a test that asks for several blocks before starting the
    services that bind them must not get overlapping ones (a pipeline and its replica once did)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            start = probe.getsockname()[1]
        if start + n > 65535 or not _HANDED_OUT_PORTS.isdisjoint(range(start, start + n)):
            continue
        socks = []
        try:
            for port in range(start, start + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            _HANDED_OUT_PORTS.update(range(start, start + n))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no range of {n} free TCP ports found")


def _broker_reachable(timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((BROKER_HOST, BROKER_PORT), timeout=timeout):
            return True
    except OSError:
        return False


def _start_broker_container() -> Any:
    """Start rabbitmq:3-management with the Docker SDK when an engine is reachable; None otherwise."""
    try:
        import docker  # test extra; only needed where no broker runs but an engine does

        client = docker.from_env()
        client.ping()
    except Exception:  # noqa: BLE001 - no SDK or no engine: the caller decides what that means
        return None
    container = client.containers.run("rabbitmq:3-management", detach=True, remove=True,
                                      ports={"5672/tcp": (BROKER_HOST, BROKER_PORT)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _broker_reachable():
        time.sleep(1)
    return container


@pytest.fixture(scope="session")
def broker_url() -> Any:
    """The AMQP URL of a real RabbitMQ. In CI a missing broker fails the test instead of skipping it."""
    container = None
    if not _broker_reachable():
        container = _start_broker_container()
        if container is None or not _broker_reachable():
            message = (f"no RabbitMQ on {BROKER_HOST}:{BROKER_PORT} and no Docker engine to start one; "
                       "start it with: rabbitmq-server -detached")
            if os.environ.get("CI"):
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
    yield f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2F"
    if container is not None:
        container.stop()
