"""The run loop every std-daq daemon shares: no framework, one hot loop polling with timeouts.

Signal handlers only set a stop event; the loop notices it within one poll timeout, so a stop never needs
a kill. Shutdown order: `stop()` (stop intake, finish or drain what is in flight), then `close()` (close
outputs and sockets), then a final statistics line. Statistics are plain counters in the hot path and a
frozen snapshot taken by the loop at a fixed interval, printed in one of two forms, as the config's
`stats_log` says (one form only: the same figures twice made half of a pipeline's log):
- "influx" (the default): an InfluxDB line-protocol line on stdout in the form the existing std-daq dashboards
  read (docs/design-choices.md, "Statistics"): measurement = the service name, tag `detector_name` (plus the
  service's own, e.g. std_udp_recv's `module_id`), then the service's per-interval fields (std_udp_recv: the
  legacy `n_missed_packets`, `n_corrupted_frames`, `repetition_rate`), then every counter and rate, then the
  timestamp in ns;
- "keyvalue": a log line `stats name=value ...` (stderr), for a person reading the log.

Every daemon holds the lock of its role in the detector's pipeline (core_buffer.locks) from before it builds
its service (no segment created or attached, no socket bound) until after it has removed the ipc socket files
it bound: a second copy of a service is refused at start, naming the process it would have broken.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import traceback
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, TextIO

if TYPE_CHECKING:
    import argparse

    from core_buffer.config import DetectorConfig
    from core_buffer.locks import Role

log = logging.getLogger(__name__)

STATS_INFLUX, STATS_KEYVALUE = "influx", "keyvalue"  # the forms of core_buffer.config.STATS_LOG_FORMS
LOG_FORMAT = "%(asctime)s %(processName)s[%(process)d] %(name)s %(levelname)s: %(message)s"
POLL_TIMEOUT_S = 0.1


class Service(Protocol):
    """What the run loop needs of a service."""

    name: str

    def poll(self, timeout_s: float) -> None:
        """Do one step of work, waiting at most `timeout_s` for input."""

    def stop(self) -> None:
        """Stop taking input and finish what is in flight."""

    def close(self) -> None:
        """Release sockets, files and buffers."""

    def stats(self) -> Mapping[str, int | float]:
        """A snapshot of the service's counters."""


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    logging.getLogger("pika").setLevel(logging.WARNING)


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set `stop`; nothing else happens in the handler.

    The handler sets `stop` once only: Event.set takes a lock, and a second signal arriving while the
    first handler holds it would run the handler again in the same thread and deadlock (a launcher that
    dies sends each child one SIGTERM per launcher thread)."""
    signalled = False

    def handler(signum: int, _frame: object) -> None:
        nonlocal signalled
        if signalled:
            return
        signalled = True
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class Counters:
    """Named integer counters for a hot loop: attribute increments, a frozen snapshot outside it."""

    def __init__(self, *names: str) -> None:
        for name in names:
            setattr(self, name, 0)
        self._names = names

    def snapshot(self) -> Mapping[str, int]:
        return MappingProxyType({name: getattr(self, name) for name in self._names})


def influx_line(measurement: str, tags: Mapping[str, str], fields: Mapping[str, int | float],
                timestamp_ns: int) -> str:
    """One InfluxDB line-protocol line; integers get the `i` suffix."""

    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")

    tag_text = "".join(f",{esc(k)}={esc(str(v))}" for k, v in sorted(tags.items()))
    field_text = ",".join(
        f"{esc(k)}={int(v)}i" if isinstance(v, int) and not isinstance(v, bool) else f"{esc(k)}={float(v)!r}"
        for k, v in fields.items()
    )
    return f"{esc(measurement)}{tag_text} {field_text} {timestamp_ns}"


IntervalFields = Callable[[Mapping[str, int | float], Mapping[str, int | float], float], Mapping[str, int | float]]


class StatsReporter:
    """Prints a statistics snapshot at a fixed interval, with per-second rates of the named counters.

    `tags` are the InfluxDB tags (`detector_name=...`, ...): the Prometheus labels are a separate mapping
    (core_buffer.metrics), which `std-daq status` and existing scrapes rely on. `interval_fields(now,
    before, elapsed_s)` gives fields computed over the interval (e.g. std_udp_recv's legacy
    `n_missed_packets`); they come first in the InfluxDB line, before the cumulative counters. `form` is
    the config's `stats_log`: the InfluxDB line on `out` (stdout), or a key=value line in the log."""

    def __init__(self, service_name: str, tags: Mapping[str, str], interval_s: float,
                 rates: tuple[str, ...] = (), out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, interval_fields: IntervalFields | None = None,
                 time_ns: Callable[[], int] = time.time_ns, form: str = STATS_INFLUX) -> None:
        if form not in (STATS_INFLUX, STATS_KEYVALUE):
            raise ValueError(f"statistics form {form!r}: expected {STATS_INFLUX!r} or {STATS_KEYVALUE!r}")
        self.form = form
        self.measurement = service_name  # as the existing std-daq services print it, e.g. std_udp_recv
        self.tags = dict(tags)
        self.interval_s = interval_s
        self.rates = rates
        self.out = out
        self.clock = clock
        self.interval_fields = interval_fields
        self.time_ns = time_ns
        self._last_time = clock()
        self._last: Mapping[str, int | float] = {}
        self.listeners: list[Callable[[Mapping[str, int | float]], None]] = []

    def due(self) -> bool:
        return self.clock() - self._last_time >= self.interval_s

    def report(self, snapshot: Mapping[str, int | float]) -> dict[str, int | float]:
        now = self.clock()
        elapsed = max(now - self._last_time, 1e-9)
        fields: dict[str, int | float] = dict(snapshot)
        for name in self.rates:
            if name in snapshot:
                fields[f"{name}_per_s"] = round((snapshot[name] - self._last.get(name, 0)) / elapsed, 2)
        line_fields = fields
        if self.interval_fields is not None:
            line_fields = {**self.interval_fields(snapshot, self._last, elapsed), **fields}
        self._last_time, self._last = now, dict(snapshot)
        if self.form == STATS_KEYVALUE:
            log.info("stats %s", " ".join(f"{k}={v}" for k, v in fields.items()))
        else:
            out = self.out if self.out is not None else sys.stdout
            print(influx_line(self.measurement, self.tags, line_fields, self.time_ns()), file=out, flush=True)
        for listener in self.listeners:
            listener(fields)
        return fields


class _ErrorThrottle:
    """Log an unexpected exception with its traceback the first time it happens at a place, then
    every 1000th time, so a repeating fault is visible without flooding the log."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def log(self, service: str, exc: BaseException) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else "?"
        key = (type(exc).__name__, where)
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        if n == 1 or n % 1000 == 0:
            log.error("%s: unexpected %s at %s (occurrence %d); carrying on", service, key[0], where, n,
                      exc_info=exc)


def run(service: Service, stop: threading.Event, reporter: StatsReporter | None = None,
        poll_timeout_s: float = POLL_TIMEOUT_S) -> int:
    """Run `service` until `stop` is set; returns the process exit code."""
    throttle = _ErrorThrottle()
    errors = 0
    log.info("%s running", service.name)
    while not stop.is_set():
        try:
            service.poll(poll_timeout_s)
            if reporter is not None and reporter.due():
                # Inside the guard: a statistics line that cannot be written (stdout gone with the
                # launcher that read it) must not stop data taking.
                reporter.report({**service.stats(), "loop_errors": errors})
        except Exception as exc:  # noqa: BLE001 - the daemon must outlive any one bad step
            errors += 1
            throttle.log(service.name, exc)
            time.sleep(min(poll_timeout_s, 0.01))  # a fault that repeats at once must not spin a core
    log.info("%s stopping", service.name)
    # Shutdown order: stop intake and finish in-flight work, then close outputs, then the last stats.
    try:
        service.stop()
    finally:
        service.close()
    if reporter is not None:
        try:
            reporter.report({**service.stats(), "loop_errors": errors})
        except Exception as exc:  # noqa: BLE001 - the service is closed already; say why the line is missing
            log.warning("%s: no final statistics line: %s", service.name, exc)
    log.info("%s stopped", service.name)
    return 0


def add_common_arguments(parser: "argparse.ArgumentParser") -> None:
    """Arguments every daemon takes: the config file, the log level, the statistics interval."""
    parser.add_argument("config", help="detector config JSON file")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--stats-interval", type=float, default=None, metavar="S",
                        help="seconds between statistics lines (default: the config's stats_interval_s)")


def run_daemon(name: str, args: "argparse.Namespace",
               build: Callable[["DetectorConfig"], Service]) -> int:
    """The body of every daemon's main(): load the config, take the service's role lock, build the
    service, run it until stopped, remove the ipc socket files it bound, let go of the lock.

    A bad config, a role another process holds, or a service that cannot start exits with code 2 or 1 and
    one log line saying why. std_udp_recv's role is that of its module (`args.module_id`).
    The service may offer `stats_tags` (extra Prometheus labels, e.g. module), `influx_tags` (extra InfluxDB
    tags, e.g. module_id), `interval_fields` (see StatsReporter) and `rate_counters` (counters to report
    per second)."""
    from core_buffer.config import load_config
    from core_buffer.errors import ConfigError, StdDaqError
    from core_buffer.locks import LockHeld, role_lock, service_role

    setup_logging(args.log_level)
    stop = threading.Event()
    install_stop_handlers(stop)  # before building: a SIGTERM during start-up still stops cleanly
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s: bad config: %s", name, exc)
        return 2
    role = service_role(name, getattr(args, "module_id", None))
    # Before anything is built: a second copy's bind would take the running one's ipc address (ZMQ
    # replaces the socket file) and its segments would be written by both.
    lock = role_lock(config, role)
    try:
        lock.acquire()
    except LockHeld as exc:
        log.error("%s: not starting: %s; a second %s of this detector would take the running one's sockets "
                  "and shared memory", name, exc, name)
        return 1
    except StdDaqError as exc:
        log.error("%s: cannot start: %s", name, exc)
        return 1
    try:
        # Holding the role, any socket file of it is a dead predecessor's (killed before it could remove it).
        _remove_socket_files(config, role)
        return _build_and_run(name, args, config, build, stop)
    finally:
        # After close(): libzmq (4.3.5, tried) leaves a bound ipc socket's file in place when the socket is
        # closed, unbound or its context terminated, so without this every stop left the files in ipc_dir.
        _remove_socket_files(config, role)
        lock.release()


def _remove_socket_files(config: "DetectorConfig", role: "Role") -> None:
    from core_buffer.ipc import remove_socket_file

    for path in role.socket_files(config):
        remove_socket_file(path)


def _build_and_run(name: str, args: "argparse.Namespace", config: "DetectorConfig",
                   build: Callable[["DetectorConfig"], Service], stop: threading.Event) -> int:
    from core_buffer.errors import ConfigError, StdDaqError
    from core_buffer.metrics import serve_metrics

    try:
        service = build(config)
    except ConfigError as exc:
        log.error("%s: bad config: %s", name, exc)
        return 2
    except (StdDaqError, OSError) as exc:  # OSError: a port in use, a socket path not writable, ...
        log.error("%s: cannot start: %s", name, exc)
        return 1
    interval = args.stats_interval if args.stats_interval is not None else config.stats_interval_s
    # Two vocabularies on purpose: Prometheus labels (detector, module) are what `std-daq status` and
    # existing scrapes know; the InfluxDB tags (detector_name, module_id) are the existing std-daq
    # dashboards'.
    tags = {"detector": config.detector_name, **getattr(service, "stats_tags", {})}
    influx_tags = {"detector_name": config.detector_name, **getattr(service, "influx_tags", {})}
    reporter = StatsReporter(name, influx_tags, interval, tuple(getattr(service, "rate_counters", ())),
                             interval_fields=getattr(service, "interval_fields", None), form=config.stats_log)
    try:
        metrics = serve_metrics(config, name, tags, service.stats)
    except ConfigError as exc:
        log.error("%s: bad config: %s", name, exc)
        service.close()
        return 2
    try:
        return run(service, stop, reporter)
    finally:
        if metrics is not None:
            metrics.close()
