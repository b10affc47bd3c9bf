"""Prometheus metrics: each service serves the same counters as its statistics line.

Config section "metrics": `{"host": "127.0.0.1", "base_port": 9300}`; without base_port no endpoint is
served. Each service has a fixed offset from base_port (std_udp_recv adds its module id), so one detector's
services never collide and `std-daq status` finds them all from the config alone. Values are taken from
`service.stats()` at scrape time and exported untyped: a service's snapshot mixes counters and gauges.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Iterator, Mapping

from prometheus_client import start_http_server
from prometheus_client.core import UnknownMetricFamily
from prometheus_client.registry import CollectorRegistry

from core_buffer.config import DetectorConfig

log = logging.getLogger(__name__)

SERVICE_PORT_OFFSETS = {
    "std_assembler": 0,
    "std_h5_writer": 1,
    "writer_agent": 2,
    "std_stream_send": 3,
    "std_stream_recv": 4,
    "std_udp_recv": 10,  # + module id
}
_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


def metrics_endpoint(config: DetectorConfig, service: str, module: int | None = None) -> tuple[str, int] | None:
    """(host, port) where `service` serves its metrics, or None when metrics are off."""
    section = config.section("metrics")
    host = section.str("host", "127.0.0.1")
    base_port = section.int("base_port", None, min=1, max=65000)
    section.finish()
    if base_port is None or service not in SERVICE_PORT_OFFSETS:
        return None
    return host, base_port + SERVICE_PORT_OFFSETS[service] + (module or 0)


class _SnapshotCollector:
    def __init__(self, prefix: str, labels: Mapping[str, str],
                 snapshot: Callable[[], Mapping[str, object]]) -> None:
        self.prefix = prefix
        self.labels = dict(labels)
        self.snapshot = snapshot

    def collect(self) -> Iterator[UnknownMetricFamily]:
        for name, value in self.snapshot().items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            family = UnknownMetricFamily(f"{self.prefix}_{_NAME_RE.sub('_', name)}", name,
                                         labels=list(self.labels))
            family.add_metric(list(self.labels.values()), float(value))
            yield family


class MetricsServer:
    """A Prometheus endpoint in a daemon thread; `close()` stops it."""

    def __init__(self, host: str, port: int, service: str, labels: Mapping[str, str],
                 snapshot: Callable[[], Mapping[str, object]]) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_SnapshotCollector(f"std_daq_{service}", labels, snapshot))
        self.address = (host, port)
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)


def serve_metrics(config: DetectorConfig, service: str, labels: Mapping[str, str],
                  snapshot: Callable[[], Mapping[str, object]]) -> MetricsServer | None:
    """Start the endpoint of `service` if the config asks for one; a busy port is logged, not fatal
    (metrics must never stop data taking)."""
    module = labels.get("module")
    endpoint = metrics_endpoint(config, service, int(module) if module is not None else None)
    if endpoint is None:
        return None
    try:
        server = MetricsServer(*endpoint, service, labels, snapshot)
    except OSError as exc:
        log.warning("%s: no Prometheus metrics: cannot listen on %s:%d (%s)", service, *endpoint, exc)
        return None
    log.info("%s: Prometheus metrics on http://%s:%d/metrics", service, *endpoint)
    return server
