"""`std_stream_recv CONFIG [--bind tcp://IFACE:PORT]`: receive std_stream_send's images into this server's
ImageBuffer and publish their ImageMetadata as std_assembler would."""
from __future__ import annotations

import argparse

from core_buffer.service import add_common_arguments, run_daemon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="std_stream_recv", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--bind", default=None, help="address to listen on (default: config stream_recv.bind)")
    args = parser.parse_args(argv)

    def build(config):
        from std_stream_recv.receiver import ReceiverSettings, StreamReceiver, keep_message_buffers

        keep_message_buffers()
        return StreamReceiver(config, ReceiverSettings(config, args.bind))

    return run_daemon("std_stream_recv", args, build)


if __name__ == "__main__":
    raise SystemExit(main())
