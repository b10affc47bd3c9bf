"""`std-daq status`: scraping real metrics endpoints and the one-screen summary built from two scrapes."""
from core_buffer.metrics import MetricsServer
from tests.conftest import free_tcp_port_block
from std_daq.status import ServiceMetrics, format_status, scrape, summarise, writer_lag, writer_state


def test_status_reads_every_endpoint_computes_rates_and_names_the_dead(make_config):
    base = free_tcp_port_block(12)
    _, config = make_config(n_modules=2, image_pixel_height=1024, metrics={"base_port": base})
    counters = {"frames": 100, "lost_packets": 3}
    assembler = {"images": 50, "last_image_id": 1000}
    writer = {"images_written": 10, "last_written_id": 990, "writing": 1}
    servers = [MetricsServer("127.0.0.1", base + 10, "std_udp_recv", {"module": "0"}, lambda: dict(counters)),
               MetricsServer("127.0.0.1", base + 0, "std_assembler", {}, lambda: dict(assembler)),
               MetricsServer("127.0.0.1", base + 1, "std_h5_writer", {}, lambda: dict(writer))]
    try:
        first = scrape(config)
        counters["frames"] += 250
        writer["last_written_id"] = 995
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
    assert writer_lag(first, second) == 5
    text = format_status(config, list(lines.values()), writer_lag(first, second), writer_state(second))
    assert "std_udp_recv-1" in text and "DOWN" in text
    assert "writer writing, 5 images behind the assembler" in text


def scraped(assembler_last: int, writing: int, last_written: int) -> list[ServiceMetrics]:
    return [ServiceMetrics("std_assembler", "", {"last_image_id": assembler_last}),
            ServiceMetrics("std_h5_writer", "", {"writing": writing, "last_written_id": last_written})]


def test_an_idle_writer_is_reported_idle_not_behind(make_config):
    _, config = make_config()
    # The last run ended at image 990; the detector has gone on to 5000 since.
    first, second = scraped(4900, 0, 990), scraped(5000, 0, 990)
    assert writer_lag(first, second) is None
    text = format_status(config, summarise(first, second, 1.0), writer_lag(first, second), writer_state(second))
    assert "writer idle" in text and "behind" not in text


def test_a_run_that_has_not_written_yet_shows_no_lag_from_the_last_run():
    first, second = scraped(4900, 0, 990), scraped(5000, 1, 990)  # started between the scrapes
    assert writer_state(second) == "writing"
    assert writer_lag(first, second) is None
    assert writer_lag(second, scraped(5100, 1, 5090)) == 10  # its first images are written


def test_a_replica_servers_status_shows_its_stream_receiver_and_the_writer_behind_it(make_config):
    from std_daq.status import service_endpoints

    _, config = make_config(n_modules=2, image_pixel_height=1024, namespace="replica",
                            stream_recv={"bind": "tcp://127.0.0.1:9610"}, metrics={"base_port": 9700})
    assert [label for label, _, _ in service_endpoints(config)] == ["std_stream_recv", "writer_agent", "std_h5_writer"]
    first = [ServiceMetrics("std_stream_recv", "", {"last_image_id": 4900, "images": 10}),
             ServiceMetrics("std_h5_writer", "", {"writing": 1, "last_written_id": 4890})]
    second = [ServiceMetrics("std_stream_recv", "", {"last_image_id": 5000, "images": 110}),
              ServiceMetrics("std_h5_writer", "", {"writing": 1, "last_written_id": 4993})]
    assert writer_lag(first, second) == 7
    text = format_status(config, summarise(first, second, 1.0), writer_lag(first, second), writer_state(second))
    assert "writer writing, 7 images behind the stream receiver" in text
