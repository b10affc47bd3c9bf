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

    pids = [c.process.pid for c in pipe.launcher.children]
    connections = sockets_of(pids)
    listening_tcp = [c for c in connections if c.type.name == "SOCK_STREAM" and c.status == psutil.CONN_LISTEN]
    assert listening_tcp, "the metrics and live-preview endpoints should be listening"
    assert all(c.laddr.ip == "127.0.0.1" for c in listening_tcp), listening_tcp
    assert live_port in {c.laddr.port for c in listening_tcp}
    udp_on_all = {c.laddr.port for c in connections if c.type.name == "SOCK_DGRAM" and c.laddr.ip in ANY_ADDRESS}
    assert udp_on_all <= {config.udp_port(m) for m in range(config.n_modules)}, udp_on_all

    for kind in ("frames", "images"):
        mode = stat.S_IMODE(os.stat(os.path.join(SHM_DIR, f"std-daq-{config.detector_name}-{kind}")).st_mode)
        assert mode == config.shm_mode == 0o660
    assert stat.S_IMODE(out.stat().st_mode) == config.file_mode == 0o640
