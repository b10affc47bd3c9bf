"""Prometheus endpoints: the same counters as the statistics line, at ports derived from the config."""
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core_buffer import ConfigError, parse_config
from core_buffer.metrics import metrics_endpoint, serve_metrics

BASE = {"detector_name": "d", "detector_type": "jungfrau", "n_modules": 2, "bit_depth": 16,
        "image_pixel_height": 1024, "image_pixel_width": 1024, "start_udp_port": 9000}


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_service_gets_its_own_port_and_receivers_add_their_module():
    config = parse_config({**BASE, "metrics": {"base_port": 9300}})
    assert metrics_endpoint(config, "std_assembler") == ("127.0.0.1", 9300)
    assert metrics_endpoint(config, "writer_agent") == ("127.0.0.1", 9302)
    assert metrics_endpoint(config, "std_udp_recv", 1) == ("127.0.0.1", 9311)
    assert metrics_endpoint(parse_config(BASE), "std_assembler") is None


def test_a_bad_metrics_section_names_the_key():
    config = parse_config({**BASE, "metrics": {"base_port": "9300"}})
    with pytest.raises(ConfigError, match="'metrics.base_port' = '9300' is invalid"):
        metrics_endpoint(config, "std_assembler")


def test_the_endpoint_serves_the_current_snapshot():
    port = free_tcp_port()
    config = parse_config({**BASE, "metrics": {"base_port": port - 10}})
    counters = {"frames": 5, "lost_packets": 2, "state": "writing"}
    server = serve_metrics(config, "std_udp_recv", {"detector": "d", "module": "0"}, lambda: counters)
    assert server is not None
    try:
        counters["frames"] = 7
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.close()
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["std_daq_std_udp_recv_frames"].value == 7
    assert samples["std_daq_std_udp_recv_lost_packets"].labels == {"detector": "d", "module": "0"}
    assert not any("state" in name for name in samples)


def test_a_busy_port_does_not_stop_the_service():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = parse_config({**BASE, "metrics": {"base_port": port}})
        assert serve_metrics(config, "std_assembler", {"detector": "d"}, dict) is None
