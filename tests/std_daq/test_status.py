"""`std-daq status`: scraping real metrics endpoints and the one-screen summary built from two scrapes."""
from core_buffer.metrics import MetricsServer
from tests.conftest import free_tcp_port_block
from std_daq.status import format_status, scrape, summarise, writer_lag


def test_status_reads_every_endpoint_computes_rates_and_names_the_dead(make_config):
    base = free_tcp_port_block(12)
    _, config = make_config(n_modules=2, image_pixel_height=1024, metrics={"base_port": base})
    counters = {"frames": 100, "lost_packets": 3}
    assembler = {"images": 50, "last_image_id": 1000}
    writer = {"images_written": 10, "last_written_id": 990}
    servers = [MetricsServer("127.0.0.1", base + 10, "std_udp_recv", {"module": "0"}, lambda: dict(counters)),
               MetricsServer("127.0.0.1", base + 0, "std_assembler", {}, lambda: dict(assembler)),
               MetricsServer("127.0.0.1", base + 1, "std_h5_writer", {}, lambda: dict(writer))]
    try:
        first = scrape(config)
        counters["frames"] += 250
        second = scrape(config)
    finally:
        for server in servers:
            server.close()
    by_label = {m.label: m for m in second}
    assert by_label["std_udp_recv-0"].values == {"frames": 350.0, "lost_packets": 3.0}
    assert by_label["std_udp_recv-1"].values is None  # nobody serves module 1
    lines = {line.label: line for line in summarise(first, second, interval_s=0.5)}
    assert dict(lines["std_udp_recv-0"].fields)["frames"] == "350 (500.0/s)"
    assert not lines["std_udp_recv-1"].up
    assert writer_lag(second) == 10
    text = format_status(config, list(lines.values()), writer_lag(second))
    assert "std_udp_recv-1" in text and "DOWN" in text
    assert "writer behind the assembler by 10 images" in text
