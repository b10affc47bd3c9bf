"""`std-daq status`: scraping real metrics endpoints and the one-screen summary built from two scrapes."""
import os

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


def test_the_title_counts_one_module_in_the_singular(make_config):
    _, one = make_config()
    _, two = make_config(n_modules=2, image_pixel_height=1024)
    assert format_status(one, [], None).splitlines()[0].endswith("(jungfrau, 1 module)")
    assert format_status(two, [], None).splitlines()[0].endswith("(jungfrau, 2 modules)")


def start_as(script_dir, service: str, *args: str):
    """A process whose command line is that of a service's console script (`python .../bin/<service> ARGS`),
    as a service left by an older std-daq without locks, or started with a copy of the config that names
    another ipc_dir, looks on the machine. It only sleeps."""
    import subprocess
    import sys

    script = script_dir / service
    script.write_text("import sys, time\nprint('up', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_two_services_in_one_role_of_the_detector_are_an_error(make_config, tmp_path):
    import shutil
    import subprocess

    from std_daq.status import detector_processes, duplicate_roles

    path, config = make_config(n_modules=2, image_pixel_height=1024)
    copy = tmp_path / "copy-with-another-ipc-dir.json"  # same detector, other file: still the same segments
    copy.write_text(path.read_text().replace('"stats_interval_s"', '"ipc_dir": "/run", "stats_interval_s"'))
    _, other = make_config(detector_name="other" + config.detector_name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    procs = [start_as(bin_dir, "std_assembler", str(path)), start_as(bin_dir, "std_assembler", str(copy)),
             start_as(bin_dir, "std_udp_recv", str(path), "0"), start_as(bin_dir, "std_udp_recv", str(path), "1"),
             start_as(bin_dir, "std_h5_writer", str(other.source))]
    try:
        found = detector_processes(config)
        assert sorted(p.pid for p in found) == sorted(p.pid for p in procs[:4])
        duplicates = duplicate_roles(found)
        assert [(d.role, [p.pid for p in d.processes]) for d in duplicates] == [
            ("image_producer", sorted([procs[0].pid, procs[1].pid]))]
        text = format_status(config, [], None, None, duplicates)
        assert f"  ERROR: 2 processes in the image_producer role: pid {min(procs[0].pid, procs[1].pid)} (" in text
        result = subprocess.run([shutil.which("std-daq"), "status", str(path), "--interval", "0.1"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert "ERROR: 2 processes in the image_producer role" in result.stdout, result.stdout + result.stderr
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
            proc.stdout.close()
    assert duplicate_roles(detector_processes(config)) == []


def test_status_names_the_launcher_that_holds_the_detector(make_config):
    from core_buffer.locks import detector_lock
    from std_daq.status import launcher_of

    _, config = make_config()
    assert launcher_of(config) is None
    with detector_lock(config):
        holder = launcher_of(config)
        assert holder is not None and holder.pid == os.getpid()
        text = format_status(config, [], None, launcher=holder)
        assert text.splitlines()[1] == f"  launcher: pid {os.getpid()} ({holder.command})"
