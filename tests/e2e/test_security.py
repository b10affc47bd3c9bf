"""What a running pipeline exposes: TCP endpoints only on the interfaces the config names, UDP on the
detector's ports, shared memory and output files with the configured permissions."""
from __future__ import annotations

import os
import stat

import psutil
import pytest

from core_buffer.ringbuffer import SHM_DIR
from tests.conftest import free_tcp_port_block

pytestmark = pytest.mark.broker

ANY_ADDRESS = ("0.0.0.0", "::", "")


def sockets_of(pids: list[int]) -> list:
    found = []
    for pid in pids:
        for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            found.extend(proc.net_connections(kind="inet"))
    return found


def listeners(pipe):
    """(listening TCP sockets, the ports of UDP sockets bound to all interfaces) of the pipeline's services."""
    connections = sockets_of([c.process.pid for c in pipe.launcher.children])
    listening_tcp = [c for c in connections if c.type.name == "SOCK_STREAM" and c.status == psutil.CONN_LISTEN]
    udp_on_all = {c.laddr.port for c in connections if c.type.name == "SOCK_DGRAM" and c.laddr.ip in ANY_ADDRESS}
    return listening_tcp, udp_on_all


def test_with_the_defaults_nothing_but_the_detector_udp_ports_listens_on_all_interfaces(
        pipeline_config, pipelines, client, tmp_path):
    """The config names no interface: metrics with a port only (its host left at the default), std_stream_send
    with a replica address only (its live preview left at the default, off). Every TCP listener is on
    127.0.0.1; on all interfaces only the receivers' UDP ports."""
    base_port = free_tcp_port_block(13)
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024, metrics={"base_port": base_port},
                                   stream_send={"to": f"tcp://127.0.0.1:{free_tcp_port_block(1)}"})
    assert "host" not in config.sections["metrics"] and "live" not in config.sections["stream_send"]
    pipe = pipelines(path, config)
    assert {c.spec.label for c in pipe.launcher.children} >= {"udp_recv-0", "udp_recv-1", "assembler",
                                                              "stream_send", "writer_agent", "h5_writer"}
    pipe.simulate("--rate", "50", "--n-images", "forever")
    outcome = client.wait(client.send_write(config.detector_name, {"output_file": str(tmp_path / "out" / "d.h5"),
                                                                   "n_images": 5}), timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    listening_tcp, udp_on_all = listeners(pipe)
    assert len(listening_tcp) == len(pipe.launcher.children)  # one metrics endpoint per service, no more
    assert all(c.laddr.ip == "127.0.0.1" for c in listening_tcp), listening_tcp
    assert {c.laddr.port for c in listening_tcp} <= set(range(base_port, base_port + 13))
    assert udp_on_all == {config.udp_port(m) for m in range(config.n_modules)}, udp_on_all
    print(f"\ndefaults: {len(listening_tcp)} TCP listeners, all on 127.0.0.1 (metrics); on all interfaces only "
          f"UDP {sorted(udp_on_all)} (the detector's ports)")


def test_only_the_detector_udp_ports_listen_on_all_interfaces(pipeline_config, pipelines, client, tmp_path):
    live_port = free_tcp_port_block(1)
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024,
                                   stream_send={"live": f"tcp://127.0.0.1:{live_port}"})
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "50", "--n-images", "forever")
    out = tmp_path / "out" / "perm.h5"
    outcome = client.wait(client.send_write(config.detector_name, {"output_file": str(out), "n_images": 5}),
                          timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"

    listening_tcp, udp_on_all = listeners(pipe)
    assert listening_tcp, "the metrics and live-preview endpoints should be listening"
    assert all(c.laddr.ip == "127.0.0.1" for c in listening_tcp), listening_tcp
    assert live_port in {c.laddr.port for c in listening_tcp}
    assert udp_on_all <= {config.udp_port(m) for m in range(config.n_modules)}, udp_on_all

    for kind in ("frames", "images"):
        mode = stat.S_IMODE(os.stat(os.path.join(SHM_DIR, f"std-daq-{config.detector_name}-{kind}")).st_mode)
        assert mode == config.shm_mode == 0o660
    assert stat.S_IMODE(out.stat().st_mode) == config.file_mode == 0o640
