"""`std_stream_send CONFIG [--to tcp://HOST:PORT] [--live tcp://IFACE:PORT]`: send the ImageBuffer's images
to a replica (std_stream_recv) and/or serve a rate-reduced live preview."""
from __future__ import annotations

import argparse

from core_buffer.service import add_common_arguments, run_daemon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="std_stream_send", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--to", default=None, help="std_stream_recv's address (default: config stream_send.to)")
    parser.add_argument("--live", default=None, help="address to serve the live preview on (default: config "
                                                     "stream_send.live; off when neither is given)")
    parser.add_argument("--live-rate", type=float, default=None, metavar="HZ",
                        help="at most this many preview images per second (default 10; 0 = every image)")
    parser.add_argument("--live-every", type=int, default=None, metavar="N",
                        help="preview every N-th image instead of a rate")
    args = parser.parse_args(argv)

    def build(config):
        from std_stream_send.sender import SenderSettings, StreamSender

        settings = SenderSettings(config, args.to, args.live, args.live_rate, args.live_every)
        return StreamSender(config, settings)

    return run_daemon("std_stream_send", args, build)


if __name__ == "__main__":
    raise SystemExit(main())
