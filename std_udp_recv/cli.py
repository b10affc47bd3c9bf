"""`std_udp_recv CONFIG MODULE_ID`: the receiver of one module (port start_udp_port + MODULE_ID)."""
from __future__ import annotations

import argparse

from core_buffer.service import add_common_arguments, run_daemon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="std_udp_recv", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("module_id", type=int, help="module (UDP stream) number, 0 to n_modules - 1")
    args = parser.parse_args(argv)

    def build(config):
        from std_udp_recv.receiver import UdpReceiver

        return UdpReceiver(config, args.module_id)

    return run_daemon("std_udp_recv", args, build)


if __name__ == "__main__":
    raise SystemExit(main())
