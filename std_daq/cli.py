"""The operator's command line: `std-daq <command>`."""
from __future__ import annotations

import argparse
import sys

from core_buffer.config import load_config
from core_buffer.errors import ConfigError
from std_daq import buffers, demo


# What docs/operations.md sends readers to `std-daq up --help` for; the figures are std_daq/launcher.py's.
UP_DESCRIPTION = """\
Run every service of one detector as child processes, their output prefixed with the service's name.

What runs comes from the config: a std_udp_recv per module, std_assembler, std_stream_send (when
`stream_send` has an address), writer_agent and std_h5_writer; on a replica server (a config with
`stream_recv.bind`) std_stream_recv instead of the receivers and the assembler.

Start: downstream first (writer, agent, stream sender, assembler, receivers), so every stage listens
before the one upstream produces. One pipeline per detector on a machine: while another `std-daq up` of
the detector, or any of its services, runs already, it is refused (exit 1) and starts nothing.

Restart: a service that exits while the launcher is not stopping is restarted after a pause of 1 s,
doubling up to 30 s, back to 1 s once it has run for 60 s; each exit and restart is said in the output.

Stop: Ctrl-C or SIGTERM stops the services in the reverse order, receivers first, each with SIGTERM and
15 s of grace before SIGKILL, then removes the detector's shared-memory segments (not one a live
process still maps: that one is named); exit code 0. The services get SIGTERM too if the launcher itself
dies. See docs/operations.md.
"""


def _buffers_list(args: argparse.Namespace) -> int:
    print(buffers.format_segments(buffers.list_segments(args.prefix)))
    return 0


def _buffers_rm(args: argparse.Namespace) -> int:
    if not args.names and not args.all:
        print("std-daq buffers rm: name the segments to remove, or pass --all", file=sys.stderr)
        return 2
    try:
        removed, missing = buffers.remove_segments(args.names, args.prefix)
    except buffers.RemovalRefused as exc:
        print(f"std-daq buffers rm: {exc}", file=sys.stderr)
        return 2
    for name in removed:
        print(f"removed {name}")
    for name in missing:
        print(f"not found (or not a {args.prefix}* segment): {name}", file=sys.stderr)
    return 1 if missing else 0


def _load(path: str) -> object:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"std-daq: bad config: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _up(args: argparse.Namespace) -> int:
    from std_daq.launcher import run_up

    return run_up(args.config, _load(args.config))


def _status(args: argparse.Namespace) -> int:
    from std_daq.status import run_status

    return run_status(_load(args.config), interval_s=args.interval, watch=args.watch)


def _pedestal(args: argparse.Namespace) -> int:
    from std_assembler.pedestal import main as pedestal_main

    return pedestal_main(args.args)


def _positive(kind: type) -> object:
    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="std-daq", description="Operate a std-daq detector pipeline.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    buf = commands.add_parser("buffers", help="list or remove the shared-memory ring buffers")
    buf_commands = buf.add_subparsers(dest="buffers_command", required=True, metavar="ACTION")
    for action, func, help_text in (("list", _buffers_list, "list segments and their layouts"),
                                    ("rm", _buffers_rm, "remove segments by name, or all with --all")):
        sub = buf_commands.add_parser(action, help=help_text)
        sub.add_argument("--prefix", default="std-daq", help="segment name prefix (default: std-daq)")
        if action == "rm":
            sub.add_argument("names", nargs="*", help="segment names as `buffers list` shows them")
            sub.add_argument("--all", action="store_true", help="remove every segment with the prefix")
        sub.set_defaults(func=func)

    up = commands.add_parser("up", help="run every service of a detector as child processes",
                             description=UP_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("config", help="detector config JSON file")
    up.set_defaults(func=_up)

    status = commands.add_parser("status", help="one screen of pipeline health from the services' metrics")
    status.add_argument("config", help="detector config JSON file")
    status.add_argument("--interval", type=float, default=1.0, metavar="S",
                        help="seconds between the two scrapes that rates are computed from (default 1)")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.set_defaults(func=_status)

    from std_daq import requests_cli

    requests_cli.add_commands(commands)

    pedestal = commands.add_parser("pedestal", add_help=False,
                                   help="Jungfrau pedestals from dark runs written by std_h5_writer "
                                        "(std-daq pedestal --help)")
    pedestal.add_argument("args", nargs=argparse.REMAINDER)
    pedestal.set_defaults(func=_pedestal)

    demo_cmd = commands.add_parser("demo", help="run a small local pipeline from the bundled config")
    demo_cmd.add_argument("--images", type=_positive(int), default=demo.DEFAULT_IMAGES, help="images to write (default %(default)s)")
    demo_cmd.add_argument("--rate", type=_positive(float), default=demo.DEFAULT_RATE_HZ, help="simulated frame rate in Hz (default %(default)s)")
    demo_cmd.add_argument("--dir", default="std-daq-demo", help="where the config, logs and file go (default ./%(default)s)")
    demo_cmd.set_defaults(func=lambda args: demo.run_demo(args.images, args.rate, args.dir))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pedestal"]:  # its own parser, options included
        return _pedestal(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)
