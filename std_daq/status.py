"""`std-daq status CONFIG`: one screen of pipeline health, read from the services' Prometheus endpoints,
and from the machine's processes: two services in one role of the detector (two assemblers, two receivers of
one module) are an error the metrics cannot show, since only one of them gets the metrics port."""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from core_buffer.config import DetectorConfig, load_config
from core_buffer.errors import ConfigError
from core_buffer.locks import Holder, detector_lock_path, holder_of, service_role
from core_buffer.metrics import metrics_endpoint
from std_daq.launcher import is_replica

SCRAPE_TIMEOUT_S = 1.0
WEB_LABEL = "std_web"  # std_web serves its metrics on its own HTTP port (web.host, web.port), at /metrics
WEB_DEFAULT_PORT = 5000


def web_endpoint(config: DetectorConfig) -> tuple[str, int] | None:
    """(host, port) of std_web when the config runs it (a non-empty `web` section), else None. A wildcard
    host is reached on loopback."""
    section = config.sections.get("web") or {}
    if not section:
        return None
    host, port = section.get("host", "127.0.0.1"), section.get("port", WEB_DEFAULT_PORT)
    if not isinstance(host, str) or host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if not isinstance(port, int) or isinstance(port, bool):
        port = WEB_DEFAULT_PORT
    return host, port


@dataclass(frozen=True)
class ServiceMetrics:
    label: str  # e.g. std_udp_recv-0
    url: str
    values: dict[str, float] | None  # None: the endpoint did not answer
    error: str = ""


def service_endpoints(config: DetectorConfig) -> list[tuple[str, str, tuple[str, int]]]:
    """(label, service, (host, port)) of every service that serves metrics for this config."""
    replica = is_replica(config)  # std_stream_recv in place of the receivers and the assembler
    out = []
    for m in range(0 if replica else config.n_modules):
        endpoint = metrics_endpoint(config, "std_udp_recv", m)
        if endpoint:
            out.append((f"std_udp_recv-{m}", "std_udp_recv", endpoint))
    stream_send = config.sections.get("stream_send", {})
    running = {"std_assembler": not replica, "std_stream_recv": replica,
               "std_stream_send": bool(stream_send.get("to") or stream_send.get("live")),
               "writer_agent": True, "std_h5_writer": True}
    for service, configured in running.items():
        endpoint = metrics_endpoint(config, service) if configured else None
        if endpoint:
            out.append((service, service, endpoint))
    web = web_endpoint(config)
    if web is not None:
        out.append((WEB_LABEL, WEB_LABEL, web))
    return out


def scrape(config: DetectorConfig) -> list[ServiceMetrics]:
    results = []
    for label, service, (host, port) in service_endpoints(config):
        url = f"http://{host}:{port}/metrics"
        prefix = f"std_daq_{service}_"
        try:
            text = urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S).read().decode()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # HTTPException: with nothing listening on a port in the ephemeral range, Linux can connect
            # the socket to itself, and the "server" answers with our own request line.
            reason = getattr(exc, "reason", exc)
            results.append(ServiceMetrics(label, url, None, str(reason)))
            continue
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith(prefix):
                    values[sample.name[len(prefix):]] = sample.value
        results.append(ServiceMetrics(label, url, values))
    return results


# Per service, the counters worth a place on the one screen, in display order; a counter a service does
# not have is left out.
HEADLINE: dict[str, tuple[str, ...]] = {
    "std_udp_recv": ("frames", "incomplete_frames", "lost_packets", "duplicate_packets", "malformed_packets"),
    "std_assembler": ("images", "images_missing_packets", "images_missing_module", "images_mismatch",
                      "images_dropped", "last_image_id"),
    "std_stream_send": ("images_sent", "images_dropped", "images_lost"),
    "std_stream_recv": ("images", "sequence_gaps", "torn_images", "unconfirmed_images", "last_image_id"),
    "writer_agent": ("requests", "requests_succeeded", "requests_failed", "sequence_gaps"),
    "std_h5_writer": ("writing", "images_written", "images_lost", "last_written_id", "files_finished",
                      "files_failed"),
    WEB_LABEL: ("broker_connected", "ws_clients", "http_requests", "live_images", "auth_refusals"),
}
RATE_COUNTERS = {"frames", "images", "images_sent", "images_written", "bytes", "http_requests"}


@dataclass(frozen=True)
class StatusLine:
    label: str
    up: bool
    fields: list[tuple[str, str]]
    error: str = ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def summarise(first: list[ServiceMetrics], second: list[ServiceMetrics], interval_s: float) -> list[StatusLine]:
    """One line per service from two scrapes `interval_s` apart (rates come from their difference)."""
    before = {m.label: m.values for m in first}
    lines = []
    for m in second:
        if m.values is None:
            lines.append(StatusLine(m.label, False, [], m.error))
            continue
        service = m.label.split("-")[0] if m.label.startswith("std_udp_recv") else m.label
        wanted = [name for name in HEADLINE.get(service, ()) if name in m.values]
        fields = []
        for name in wanted:
            value = m.values[name]
            text = _number(value)
            earlier = (before.get(m.label) or {}).get(name)
            if name in RATE_COUNTERS and earlier is not None and interval_s > 0:
                text += f" ({(value - earlier) / interval_s:.1f}/s)"
            fields.append((name, text))
        lines.append(StatusLine(m.label, True, fields))
    return lines


# Who fills the ImageBuffer the writer reads: the assembler, or std_stream_recv on a replica server.
PRODUCERS = ("std_assembler", "std_stream_recv")


def _producer_last_id(values: dict[str, dict[str, float]]) -> float | None:
    for label in PRODUCERS:
        if "last_image_id" in values.get(label, {}):
            return values[label]["last_image_id"]
    return None


def writer_lag(first: list[ServiceMetrics], second: list[ServiceMetrics]) -> int | None:
    """Images the writer is behind the producer (the assembler, or std_stream_recv on a replica server)
    while it writes a file; None when it is idle, has not written an image between the two scrapes, or
    either service does not say.

    last_written_id is the id of the last image the writer wrote, in this run or an earlier one, so it
    measures the lag only while a run is on and writing: an idle writer is not behind, it has nothing to
    do, and a run that has not written an image yet still shows the last run's id.
    """
    before = {m.label: m.values or {} for m in first}.get("std_h5_writer", {})
    values = {m.label: m.values or {} for m in second}
    writer = values.get("std_h5_writer", {})
    last = _producer_last_id(values)
    written = writer.get("last_written_id")
    if last is None or written is None or not writer.get("writing"):
        return None
    if before.get("last_written_id") == written:
        return None
    return max(0, int(last - written))


def writer_state(second: list[ServiceMetrics]) -> str | None:
    """"writing" or "idle" from the writer's own gauge; None when the writer did not answer."""
    writer = {m.label: m.values for m in second}.get("std_h5_writer")
    if writer is None or "writing" not in writer:
        return None
    return "writing" if writer["writing"] else "idle"


# The console scripts of the services, and their options that take a value (the rest of the command line
# is positional: the config, and std_udp_recv's module id).
SERVICE_SCRIPTS = ("std_udp_recv", "std_assembler", "std_stream_send", "std_stream_recv", "writer_agent",
                   "std_h5_writer")
_OPTIONS_WITH_VALUE = ("--log-level", "--stats-interval", "--to", "--live", "--live-rate", "--live-every",
                       "--bind")


@dataclass(frozen=True)
class ServiceProcess:
    pid: int
    service: str
    role: str  # core_buffer.locks role name: udp_recv-0, image_producer, ...
    command: str


@dataclass(frozen=True)
class DuplicateRole:
    """More than one live process in one role of the detector's pipeline."""

    role: str
    processes: tuple[ServiceProcess, ...]

    def describe(self) -> str:
        who = ", ".join(f"pid {p.pid} ({p.command})" for p in self.processes)
        return (f"{len(self.processes)} processes in the {self.role} role: {who}; each takes the other's "
                "sockets and shared memory: stop all but one")


def service_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """(service, positional arguments) of a service's command line, None for any other command. A console
    script runs as `python /path/bin/<service> ARGS` (its interpreter line), or as `python -m <service>`."""
    python = bool(argv) and os.path.basename(argv[0]).startswith("python")
    for i, arg in enumerate(argv[:3]):
        if os.path.basename(arg) in SERVICE_SCRIPTS and (i == 0 or python and (i == 1 or argv[1] == "-m")):
            positional, rest = [], iter(argv[i + 1:])
            for item in rest:
                if item in _OPTIONS_WITH_VALUE:
                    next(rest, None)
                elif not item.startswith("-"):
                    positional.append(item)
            return os.path.basename(arg), positional
    return None


def detector_processes(config: DetectorConfig) -> list[ServiceProcess]:
    """The live service processes whose config is of this detector (same namespace and detector_name, so
    the same segment names, whatever the file or the ipc_dir), from /proc."""
    same: dict[str, bool] = {}  # config path -> whether it is this detector's
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().rstrip(b"\0").split(b"\0")]
            parsed = service_command(argv)
            if parsed is None or not parsed[1]:
                continue
            service, positional = parsed
            path = os.path.join(os.readlink(f"/proc/{pid}/cwd"), positional[0])
        except OSError:
            continue  # gone meanwhile, or another user's process we may not look into
        if path not in same:
            try:
                other = load_config(path)
                same[path] = (other.namespace, other.detector_name) == (config.namespace, config.detector_name)
            except ConfigError:
                same[path] = False
        if not same[path]:
            continue
        module_id = int(positional[1]) if service == "std_udp_recv" and positional[1:2] and \
            positional[1].isdigit() else None
        found.append(ServiceProcess(pid, service, service_role(service, module_id).name, " ".join(argv)))
    return found


def duplicate_roles(processes: list[ServiceProcess]) -> list[DuplicateRole]:
    by_role: dict[str, list[ServiceProcess]] = {}
    for process in processes:
        by_role.setdefault(process.role, []).append(process)
    return [DuplicateRole(role, tuple(sorted(group, key=lambda p: p.pid)))
            for role, group in sorted(by_role.items()) if len(group) > 1]


def launcher_of(config: DetectorConfig) -> Holder | None:
    """The `std-daq up` or demo holding the detector's lock, if one does."""
    return holder_of(detector_lock_path(config))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def format_status(config: DetectorConfig, lines: list[StatusLine], lag: int | None,
                  state: str | None = None, duplicates: list[DuplicateRole] = (),
                  launcher: Holder | None = None) -> str:
    out = [f"std-daq status: detector {config.detector_name} ({config.detector_type}, "
           f"{_plural(config.n_modules, 'module')})"]
    if launcher is not None:
        out.append(f"  launcher: {launcher.describe()}")
    for duplicate in duplicates:
        out.append(f"  ERROR: {duplicate.describe()}")
    if not lines:
        out.append("  no metrics endpoints: set \"metrics\": {\"base_port\": ...} in the config")
    width = max((len(line.label) for line in lines), default=0)
    for line in lines:
        if not line.up:
            out.append(f"  {line.label:<{width}}  DOWN  ({line.error})")
            continue
        body = "  ".join(f"{name.replace('_', ' ')} {text}" for name, text in line.fields)
        out.append(f"  {line.label:<{width}}  up    {body}")
    if state == "idle":
        out.append("  writer idle (no file being written)")
    elif state == "writing":
        producer = "stream receiver" if is_replica(config) else "assembler"
        out.append("  writer writing, " + (f"{lag} images behind the {producer}" if lag is not None
                                             else "no image written between the two scrapes"))
    return "\n".join(out)


def run_status(config: DetectorConfig, interval_s: float = 1.0, watch: bool = False) -> int:
    import time

    try:
        while True:
            first = scrape(config)
            time.sleep(interval_s)
            second = scrape(config)
            duplicates = duplicate_roles(detector_processes(config))
            text = format_status(config, summarise(first, second, interval_s), writer_lag(first, second),
                                 writer_state(second), duplicates, launcher_of(config))
            if not watch:
                print(text)
                healthy = second and all(m.values is not None for m in second) and not duplicates
                return 0 if healthy else 1
            print("\033[2J\033[H" + text, flush=True)
    except KeyboardInterrupt:
        return 0
