"""`std-daq demo`: the README's main job, a whole local pipeline on the bundled 2-module Jungfrau config.

It writes a runtime copy of the config (output directory, metrics ports) into the demo directory, starts
every service with the launcher (their logs go to `services.log` there), sends simulated detector data
with std_udp_sim, asks for a write of N images over RabbitMQ (or, with no usable broker, straight to
std_h5_writer, and says so and why: nothing listening, a refused login), shows the progress, then stops
everything and prints a summary: images received and written, packets lost, rates, and the file, which it
re-opens and checks pixel by pixel against the simulator's pattern. Ctrl-C and SIGTERM stop it the same way
(services in order, shared memory removed). It keeps only the latest demo file in its directory.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from core_buffer.config import DetectorConfig, load_config
from core_buffer.pattern import frame_pattern
from std_daq import status as status_module
from std_daq.launcher import (
    Launcher,
    PipelineRunning,
    claim_detector,
    console_script,
    pipeline_services,
    remove_buffers,
    remove_stale_sockets,
)

DEFAULT_IMAGES = 200
DEFAULT_RATE_HZ = 100.0
METRICS_BASE_PORT = 9300
READY_TIMEOUT_S = 30.0


def bundled_config_path() -> str:
    return str(resources.files("core_buffer") / "configs" / "demo_jungfrau_2m.json")


def free_port_block(kind: int, preferred: int, n: int, host: str) -> int:
    """`preferred` if ports preferred..preferred+n-1 are free right now, else the first of another free
    block. The demo shares its machine (other pipelines, tests, benchmarks), so fixed ports are a
    preference, not a requirement; the ports used are in the demo's config file for `std-daq status`."""
    def block_free(first: int) -> bool:
        if first < 1024 or first + n > 65535:
            return False
        socks = []
        try:
            for port in range(first, first + n):
                sock = socket.socket(socket.AF_INET, kind)
                socks.append(sock)
                sock.bind((host, port))
            return True
        except OSError:
            return False
        finally:
            for sock in socks:
                sock.close()

    if block_free(preferred):
        return preferred
    for _ in range(100):
        with socket.socket(socket.AF_INET, kind) as probe:  # a port the kernel considers free
            probe.bind((host, 0))
            first = probe.getsockname()[1]
        if block_free(first):
            return first
    raise RuntimeError(f"no block of {n} free ports found")


def demo_config(workdir: Path) -> tuple[str, DetectorConfig]:
    """The bundled config, with the demo directory as the only output directory, metrics on, and ports
    that are free right now."""
    raw = json.loads(Path(bundled_config_path()).read_text())
    raw["output_dirs"] = [str(workdir)]
    n_modules = int(raw["n_modules"])
    raw["start_udp_port"] = free_port_block(socket.SOCK_DGRAM, int(raw["start_udp_port"]), n_modules, "0.0.0.0")
    metrics = raw.setdefault("metrics", {"host": "127.0.0.1", "base_port": METRICS_BASE_PORT})
    # Offsets 0..4 for the single services, 10 + module id for the receivers (core_buffer.metrics).
    metrics["base_port"] = free_port_block(socket.SOCK_STREAM, int(metrics["base_port"]), 10 + n_modules,
                                           metrics.get("host", "127.0.0.1"))
    path = workdir / "demo-config.json"
    path.write_text(json.dumps(raw, indent=2) + "\n")
    return str(path), load_config(path)


def say(text: str = "") -> None:
    print(text, flush=True)


class ProgressBar:
    def __init__(self, total: int, width: int = 40) -> None:
        self.total, self.width, self.last = total, width, -1

    def __call__(self, done: int, _total: int | None = None) -> None:
        if done == self.last:
            return
        self.last = done
        filled = self.width * min(done, self.total) // max(self.total, 1)
        end = "\n" if done >= self.total else ""
        sys.stdout.write(f"\r  writing [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total}{end}")
        sys.stdout.flush()


def wait_until_ready(config: DetectorConfig, launcher: Launcher, timeout_s: float = READY_TIMEOUT_S,
                     skip: tuple[str, ...] = ()) -> list[str]:
    """Wait until every service answers on its metrics endpoint; returns the labels still down."""
    deadline = time.monotonic() + timeout_s
    down: list[str] = []
    while time.monotonic() < deadline:
        down = [m.label for m in status_module.scrape(config) if m.values is None and m.label not in skip]
        if not down:
            return []
        time.sleep(0.3)
    return down


REPO_BROKER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ensure-broker.sh"
LOCAL_BROKER = ("127.0.0.1", 5672)


@dataclass(frozen=True)
class BrokerCheck:
    usable: bool
    where: str  # the URL without its password
    problem: str = ""  # why it is not usable, for the user
    hint: str = ""  # what to do about it


DOCKER_INFO_TIMEOUT_S = 5.0


def docker_engine_answers() -> bool:
    """Whether a Docker engine answers, not only whether the client is installed (these machines have the
    client and no engine)."""
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, timeout=DOCKER_INFO_TIMEOUT_S).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def broker_start_command() -> str:
    """The one command that starts a local broker, runnable from any directory: with rabbitmq-server
    installed, the repository's script (by absolute path, it also waits until the broker answers) in a
    source checkout, else the broker itself; else a container when a Docker engine answers; else what to
    install. The script only starts an installed rabbitmq-server, so it is offered only then."""
    if shutil.which("rabbitmq-server"):
        if REPO_BROKER_SCRIPT.is_file():
            return f"bash {shlex.quote(str(REPO_BROKER_SCRIPT))}"
        return "rabbitmq-server -detached"
    if docker_engine_answers():
        return "docker run -d --name rabbitmq -p 127.0.0.1:5672:5672 rabbitmq:3-management"
    return "sudo apt-get install rabbitmq-server   (Debian/Ubuntu start it on installation)"


def check_broker() -> BrokerCheck:
    """Whether a write can go through RabbitMQ: a real AMQP login, not only an open port, so that a wrong
    password or vhost is found here and explained, not as a traceback halfway through the demo."""
    import pika

    from core_buffer.broker import broker_url, connect, describe_url, reachable
    from core_buffer.errors import StdDaqError

    try:
        url = broker_url()
    except StdDaqError as exc:
        return BrokerCheck(False, "?", str(exc), "fix STD_DAQ_BROKER_URL or STD_DAQ_BROKER_URL_FILE")
    where = describe_url(url)
    if not reachable(url):
        hint = f"start one with:  {broker_start_command()}"
        parts = urllib.parse.urlsplit(url)
        if (parts.hostname, parts.port or 5672) != LOCAL_BROKER:
            hint += (f"\n    (that starts a broker on {LOCAL_BROKER[0]}:{LOCAL_BROKER[1]}; unset "
                     "STD_DAQ_BROKER_URL to use it)")
        return BrokerCheck(False, where, "nothing answers there", hint)
    try:
        connect(url, connection_name="std-daq demo (broker check)").close()
    except pika.exceptions.ProbableAuthenticationError:
        return BrokerCheck(False, where, "it refused the login",
                           "check the user and password in STD_DAQ_BROKER_URL")
    except pika.exceptions.ProbableAccessDeniedError:
        return BrokerCheck(False, where, "it refused access to the virtual host",
                           "check the vhost (the path) in STD_DAQ_BROKER_URL")
    except (pika.exceptions.AMQPError, OSError, ValueError) as exc:
        return BrokerCheck(False, where, f"no AMQP session ({type(exc).__name__}: {exc})",
                           "check that it is a RabbitMQ broker and that it is running")
    return BrokerCheck(True, where)


def write_timeout_s(n_images: int, rate_hz: float) -> float:
    """Generous: three times the time the simulator takes to send the images, plus start-up."""
    return 30.0 + 3.0 * n_images / max(rate_hz, 1e-3)


@dataclass
class WriteOutcome:
    ok: bool
    via: str
    detail: str
    n_written: int


def write_via_broker(config: DetectorConfig, output_file: str, n_images: int, timeout_s: float) -> WriteOutcome:
    import pika

    from std_daq.client import DaqClientError, RequestTimeout, send_write_and_wait

    via = "RabbitMQ -> writer_agent -> std_h5_writer"
    bar = ProgressBar(n_images)
    try:
        result = send_write_and_wait(config.detector_name, output_file, n_images, progress=bar,
                                     timeout_s=timeout_s)
    except RequestTimeout as exc:
        say()
        return WriteOutcome(False, via, f"{exc} (is writer_agent connected to the broker? see its log)",
                            max(bar.last, 0))
    except DaqClientError as exc:  # e.g. no writer_agent serves the detector's tag
        say()
        return WriteOutcome(False, via, str(exc), max(bar.last, 0))
    except (pika.exceptions.AMQPError, OSError) as exc:
        say()
        return WriteOutcome(False, via, f"the broker connection failed: {type(exc).__name__}: {exc}",
                            max(bar.last, 0))
    bar(n_images if result.ok else bar.last)
    return WriteOutcome(result.ok, via, result.message, result.n_written)


def write_direct(config: DetectorConfig, output_file: str, n_images: int, timeout_s: float) -> WriteOutcome:
    from std_daq.direct_write import DirectWriteError
    from std_daq.direct_write import write_direct as send

    bar = ProgressBar(n_images)
    try:
        final = send(config, output_file, n_images, timeout_s=timeout_s, progress=bar)
    except DirectWriteError as exc:
        say()
        return WriteOutcome(False, "direct to std_h5_writer", str(exc), 0)
    if bar.last < n_images:
        say()  # end the progress line
    ok = final.state.value == "finished"
    return WriteOutcome(ok, "direct to std_h5_writer", final.error or "finished", final.n_written)


def expected_image(config: DetectorConfig, image_id: int) -> np.ndarray:
    """What the simulator's pattern becomes in a raw Jungfrau image with modules stacked in order."""
    stream = config.stream
    return np.vstack([frame_pattern(stream, m, image_id) for m in range(config.n_modules)])


def check_file(config: DetectorConfig, output_file: str) -> tuple[int, int, str]:
    """(images, images equal to the pattern, a note) of the written file."""
    import h5py
    import hdf5plugin  # noqa: F401 - registers the compression filters

    with h5py.File(output_file, "r") as f:
        data = f["entry/data/data"]
        ids = f[f"{config.detector_name}/image_id"][:]
        statuses = f[f"{config.detector_name}/status"][:]
        good = 0
        for i in range(data.shape[0]):
            if np.array_equal(data[i], expected_image(config, int(ids[i]))):
                good += 1
        note = f"image ids {int(ids.min())}..{int(ids.max())}" if len(ids) else "no images"
        note += f", {int((statuses != 0).sum())} with a non-zero status"
        return int(data.shape[0]), good, note


def _total(metrics: list[status_module.ServiceMetrics], label_prefix: str, name: str) -> float:
    return sum((m.values or {}).get(name, 0) for m in metrics if m.label.startswith(label_prefix))


DEMO_FILE = re.compile(r"^demo-\d{8}-\d{6}\.h5$")  # the name _run_demo gives its file


def remove_earlier_demo_files(root: Path) -> list[tuple[Path, int]]:
    """Remove the files of earlier demo runs in the demo directory (only names the demo gives its files):
    each run writes some 400 MiB, and the demo keeps only the latest file. Returns (path, bytes) removed."""
    removed = []
    for path in sorted(root.iterdir()):
        if DEMO_FILE.match(path.name) and path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            path.unlink()
            removed.append((path, size))
    return removed


class Terminated(Exception):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C: the simulator and the services
    are stopped in order and the shared memory removed by the same `finally` blocks."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second SIGTERM must not cut the stop short
    raise Terminated()


def run_demo(n_images: int = DEFAULT_IMAGES, rate_hz: float = DEFAULT_RATE_HZ,
             workdir: str | None = None) -> int:
    root = Path(workdir or "std-daq-demo").resolve()
    # One demo at a time, and none beside a `std-daq up` of the bundled config: they would share the
    # detector's buffers and ipc sockets. Claimed before anything is written, so a refused demo leaves the
    # running one's config (its ports, for `std-daq status`) as it is. The lock is the detector's, in the
    # bundled config's ipc_dir, which the runtime copy keeps.
    try:
        lock = claim_detector(load_config(bundled_config_path()))
    except PipelineRunning as exc:
        say(f"std-daq demo: not starting: {exc}. Nothing was started or removed.")
        return 1
    try:
        root.mkdir(parents=True, exist_ok=True)
        config_path, config = demo_config(root)
    except BaseException:
        lock.release()
        raise
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run_demo(config_path, config, root, n_images, rate_hz)
    except KeyboardInterrupt:
        say("\nstd-daq demo: interrupted; the services are stopped and their shared memory removed")
        return 130
    except Terminated:
        say("\nstd-daq demo: terminated (SIGTERM); the services are stopped and their shared memory removed")
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        lock.release()


def _run_demo(config_path: str, config: DetectorConfig, root: Path, n_images: int, rate_hz: float) -> int:
    say(f"std-daq demo: a {config.n_modules}-module Jungfrau ({config.image_pixel_height} x "
        f"{config.image_pixel_width} px) simulated at {rate_hz:g} Hz on this machine")
    for path, size in remove_earlier_demo_files(root):
        say(f"  removed the previous demo file {path} ({size / 2**20:.0f} MiB): the demo keeps only the latest")
    broker = check_broker()
    if broker.usable:
        say(f"  RabbitMQ at {broker.where}: the write request goes through it, as from a beamline control system")
    else:
        say(f"  no usable RabbitMQ at {broker.where}: {broker.problem}; {broker.hint}")
        say("  Going on without it: the write goes straight to std_h5_writer (no RabbitMQ, no writer_agent).")
    specs = pipeline_services(config_path, config)
    if not broker.usable:
        specs = [s for s in specs if s.label != "writer_agent"]
    log_path = root / "services.log"
    log_file = open(log_path, "w", buffering=1)
    launcher = Launcher(specs, output=log_file)
    remove_stale_sockets(config)  # left by services of an earlier run that were killed

    def cleanup() -> None:
        remove_buffers(config)
        remove_stale_sockets(config)  # the direct write's StoreStream socket, and any a killed service left

    launcher.cleanup = cleanup
    sim: subprocess.Popen | None = None
    started = time.monotonic()
    timeout_s = write_timeout_s(n_images, rate_hz)
    try:
        say(f"  starting {len(specs)} services (logs: {log_path})")
        launcher.start()
        down = wait_until_ready(config, launcher, skip=() if broker.usable else ("writer_agent",))
        if down:
            say(f"  these services did not come up: {', '.join(down)}; the end of {log_path}, "
                "statistics lines left out:")
            lines = [line for line in log_path.read_text(errors="replace").splitlines()
                     if " INFO: stats " not in line and not re.match(r"\[[\w-]+\] std_\w+,detector_name=", line)]
            for line in lines[-20:]:
                say(f"    {line}")
            return 1
        say(f"  all services up after {time.monotonic() - started:.1f} s; starting std_udp_sim")
        sim = subprocess.Popen([console_script("std_udp_sim"), config_path, "--rate", str(rate_hz),
                                "--n-images", "forever"], stdout=log_file, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        output_file = str(root / time.strftime("demo-%Y%m%d-%H%M%S.h5"))
        say(f"  asking for {n_images} images in {output_file}")
        write_started = time.monotonic()
        if broker.usable:
            outcome = write_via_broker(config, output_file, n_images, timeout_s)
        else:
            outcome = write_direct(config, output_file, n_images, timeout_s)
        write_s = time.monotonic() - write_started
        metrics = status_module.scrape(config)
    finally:
        if sim is not None:
            sim.terminate()
            try:
                sim.wait(timeout=10)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()
        # In a thread of its own so that a second Ctrl-C cannot cut the ordered stop short: the
        # interpreter waits for the (non-daemon) thread before it exits.
        stopper = threading.Thread(target=launcher.stop)
        stopper.start()
        stopper.join()
        log_file.close()
    return summarise(config, outcome, output_file, metrics, write_s, n_images, log_path)


def summarise(config: DetectorConfig, outcome: WriteOutcome, output_file: str,
              metrics: list[status_module.ServiceMetrics], write_s: float, n_images: int,
              log_path: Path) -> int:
    say()
    say("Summary")
    say(f"  write path:        {outcome.via}")
    frames = _total(metrics, "std_udp_recv", "frames")
    lost = _total(metrics, "std_udp_recv", "lost_packets")
    packets = _total(metrics, "std_udp_recv", "packets")
    images = _total(metrics, "std_assembler", "images")
    say(f"  frames received:   {frames:.0f} over {config.n_modules} modules, {lost:.0f} packets lost"
        + (f" of {packets + lost:.0f}" if packets else ""))
    say(f"  images assembled:  {images:.0f}")
    if not outcome.ok:
        say(f"  write FAILED:      {outcome.detail}")
        say(f"  service logs:      {log_path}")
        return 1
    say(f"  images written:    {outcome.n_written} of {n_images} in {write_s:.1f} s "
        f"({outcome.n_written / max(write_s, 1e-9):.0f} images/s, "
        f"{outcome.n_written * config.image_bytes / max(write_s, 1e-9) / 1e6:.0f} MB/s)")
    if not os.path.exists(output_file):
        say(f"  the file {output_file} does not exist")
        return 1
    n, good, note = check_file(config, output_file)
    say(f"  file:              {output_file} ({os.path.getsize(output_file) / 2**20:.0f} MiB; the next demo "
        "run replaces it)")
    say(f"  re-opened:         {n} images, {good} equal to the simulator's pattern pixel for pixel ({note})")
    say(f"  read it with:      python -c \"import h5py; print(h5py.File('{output_file}')['entry/data/data'])\"")
    return 0 if good == n == n_images else 1
