"""Fixtures shared by all tests, the guard that fails a test leaking shared memory or processes, and
`skip_or_fail` for tests whose prerequisite may be missing."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, NoReturn

import posix_ipc
import psutil
import pytest

import core_buffer.config
from core_buffer import DetectorConfig, load_config
from core_buffer.ringbuffer import KINDS, SHM_DIR, shm_name, unlink

pytest_plugins = ["pytester"]  # tests/core_buffer/test_leak_guard.py runs leaking tests in a pytest of their own

BROKER_HOST, BROKER_PORT = "127.0.0.1", 5672

# The console scripts live next to the interpreter running the tests (a venv's bin/); put them on PATH so
# tests and the processes they start find `std-daq`, `std_udp_recv`, ... without an activated venv.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the calling test because a prerequisite is missing (a broker, a tool), or fail it when $CI is
    set: in CI a missing prerequisite must not pass silently as a skip."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set: a missing prerequisite fails the test instead of skipping it)",
                    pytrace=False)
    pytest.skip(reason)


# -- the leak guard ------------------------------------------------------------------------------------
# A test's segments are the ones that appeared in /dev/shm while it ran and that it can be held to:
# - every segment this pytest process opened (created or attached) through posix_ipc, whatever its name
#   (RingBuffer opens through posix_ipc too): what the test's own code and in-process services made;
# - the segments of the configs the test made or loaded: make_config's, and any config file loaded from
#   under pytest's temporary directory, which is what the test hands to the services it starts;
# - the segments of the detector names the detector_name fixture gave it, in any namespace (a replica's).
# Segments that appear meanwhile under other names (another test run, a pipeline, a benchmark on the same
# machine) are not this test's, and a segment that existed before it started is never blamed on it.
# Segments that only a child process knew the name of (a config written but never loaded here) escape.

_opened_by_this_process: set[str] = set()
_config_segments_of_this_test: set[str] = set()
_detectors_of_this_test: set[str] = set()
_pytest_tmp_root: list[Path] = []  # pytest's basetemp, once known


class _RecordingSharedMemory(posix_ipc.SharedMemory):
    """posix_ipc.SharedMemory that remembers the names it opened; the segment itself is the real one."""

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(name, *args, **kwargs)
        _opened_by_this_process.add(name.lstrip("/"))


if not issubclass(posix_ipc.SharedMemory, _RecordingSharedMemory):
    posix_ipc.SharedMemory = _RecordingSharedMemory  # type: ignore[misc]

_parse_config = core_buffer.config.parse_config


def _parse_config_noting_segments(raw: Any, source: str = "") -> DetectorConfig:
    config = _parse_config(raw, source)
    if source and _pytest_tmp_root and Path(source).resolve().is_relative_to(_pytest_tmp_root[0]):
        _config_segments_of_this_test.update(shm_name(config, kind) for kind in KINDS)
    return config


core_buffer.config.parse_config = _parse_config_noting_segments  # load_config calls it by this name


def _all_segments() -> set[str]:
    try:
        return set(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return set()


def _is_this_tests(name: str) -> bool:
    return (name in _opened_by_this_process or name in _config_segments_of_this_test
            or any(name.endswith(f"-{detector}-{kind}") for detector in _detectors_of_this_test for kind in KINDS))


def _children() -> list[psutil.Process]:
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--strict-segments", action="store_true",
                     help="fail a test whose shared-memory segments make_config had to remove at its end "
                          "(by default they are removed and listed in the summary)")


_removed_by_make_config: list[tuple[str, list[str]]] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _removed_by_make_config:
        return
    n_segments = sum(len(names) for _, names in _removed_by_make_config)
    terminalreporter.section("segments make_config removed")
    terminalreporter.write_line(
        f"{n_segments} segments of {len(_removed_by_make_config)} tests were left for make_config to remove "
        "(-v lists them; --strict-segments fails those tests)")
    if terminalreporter.config.getoption("verbose") > 0:
        for nodeid, names in _removed_by_make_config:
            terminalreporter.write_line(f"  {nodeid}: {', '.join(names)}")


@pytest.fixture(autouse=True)
def restored_logging() -> Any:
    """Give logging back as the test found it. A test that runs a daemon's main in-process (run_daemon
    calls setup_logging) points the root handler at that test's captured stderr; a service thread of a
    later test logging there wrote "ValueError: I/O operation on closed file" tracebacks into green runs."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def leak_guard(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Fail any test that leaves a std-daq shared-memory segment or a child process behind."""
    if not _pytest_tmp_root:
        _pytest_tmp_root.append(tmp_path_factory.getbasetemp().resolve())
    _opened_by_this_process.clear()
    _config_segments_of_this_test.clear()
    _detectors_of_this_test.clear()
    before_segments = _all_segments()
    before_children = {p.pid for p in _children()}
    yield
    leaked_children = [p for p in _children() if p.pid not in before_children]
    for proc in leaked_children:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leaked_children, timeout=5)
    leaked_segments = sorted(name for name in _all_segments() - before_segments if _is_this_tests(name))
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
def make_config(tmp_path: Path, detector_name: str, request: pytest.FixtureRequest) -> Any:
    """Write a detector config (a small Jungfrau by default; keyword arguments override keys). Segments of
    its detector still there when the test ends are removed and reported: listed in the summary, and with
    --strict-segments the test fails. A test removes what it and its services created itself, with
    `buffer.unlink()` or `std_daq.launcher.remove_buffers(config)` (services never unlink: DESIGN.md §3)."""
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
        _config_segments_of_this_test.update(shm_name(config, kind) for kind in KINDS)
        return path, config

    yield factory
    names = sorted({shm_name(config, kind) for config in made for kind in KINDS})
    removed = [name for name in names if unlink(name)]
    if removed:
        _removed_by_make_config.append((request.node.nodeid, removed))
        if request.config.getoption("--strict-segments", default=False):
            pytest.fail("make_config had to remove shared-memory segments the test left behind: "
                        f"{', '.join(removed)} (unlink them in the test: buffer.unlink() or "
                        "std_daq.launcher.remove_buffers(config))", pytrace=False)


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
            skip_or_fail(message)
    yield f"amqp://guest:guest@{BROKER_HOST}:{BROKER_PORT}/%2F"
    if container is not None:
        container.stop()
