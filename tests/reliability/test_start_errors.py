"""A service that cannot start says why in one line and exits non-zero, without a traceback."""
from __future__ import annotations

import socket
import subprocess

from std_daq.launcher import console_script


def test_a_receiver_whose_udp_port_is_taken_says_so_and_exits_1(make_config):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("0.0.0.0", 0))
        path, _ = make_config(start_udp_port=taken.getsockname()[1])
        result = subprocess.run([console_script("std_udp_recv"), str(path), "0"], capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "Address already in use" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
