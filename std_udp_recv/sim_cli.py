"""`std_udp_sim CONFIG`: send simulated detector packets to the receivers of a detector config."""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from core_buffer.config import load_config
from core_buffer.errors import ConfigError


def _n_images(text: str) -> int | None:
    if text == "forever":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1, or 'forever'")
    return value


def _modules(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError("module numbers, comma- or space-separated, e.g. 0,1 or 0 1") from None


def _numbers(what: str, example: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            numbers = tuple(int(part) for part in text.split(",") if part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a comma-separated list of {what}, e.g. {example}") from None
        if any(k < 0 for k in numbers):
            raise argparse.ArgumentTypeError(f"{what} are 0 or more")
        return numbers

    return parse


_packet_numbers = _numbers("packet numbers", "0,5,127")
_image_ids = _numbers("image ids", "3,4,5")


def _kinds(text: str) -> tuple[str, ...]:
    from std_udp_recv.sim import MALFORMED_KINDS

    kinds = tuple(part for part in text.split(",") if part)
    unknown = sorted(set(kinds) - set(MALFORMED_KINDS))
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"kinds are {','.join(MALFORMED_KINDS)}")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="std_udp_sim", description=__doc__)
    p.add_argument("config", help="detector config JSON file")
    p.add_argument("--rate", type=float, default=10.0, help="images per second, 0 = as fast as possible (default %(default)g)")
    p.add_argument("--n-images", type=_n_images, default=100, metavar="N|forever",
                   help="images to send, or 'forever' until Ctrl-C (default %(default)s)")
    p.add_argument("--start-id", type=int, default=1, help="id of the first image (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="where the receivers listen (default 127.0.0.1)")
    p.add_argument("--modules", type=_modules, nargs="+", default=None, metavar="M",
                   help="modules to send, comma- or space-separated: 0,1 or 0 1 (default all)")
    faults = p.add_argument_group("fault injection")
    faults.add_argument("--drop", type=float, default=0.0, metavar="FRACTION",
                        help="fraction of packets to drop at random, 0 to 1 (default 0)")
    faults.add_argument("--drop-every", type=int, default=0, metavar="N",
                        help="drop one packet of every image whose id is a multiple of N")
    faults.add_argument("--drop-images", type=_image_ids, default=(), metavar="ID,ID,...",
                        help="image ids whose frames are not sent at all (every module)")
    faults.add_argument("--duplicate", type=float, default=0.0, metavar="FRACTION",
                        help="fraction of packets to send twice, 0 to 1 (default 0)")
    faults.add_argument("--drop-packets", type=_packet_numbers, default=(), metavar="K,K,...",
                        help="drop these packet numbers from every frame")
    faults.add_argument("--reorder", nargs="?", const="shuffle", default="", choices=("shuffle", "swap"),
                        help="reorder the packets within each frame: shuffle them (the default when given "
                             "alone), or swap neighbours (0, 2, 1, 4, 3, ...)")
    faults.add_argument("--malformed", type=int, default=0, metavar="N",
                        help="malformed datagrams per frame, sent in the middle of it")
    faults.add_argument("--malformed-kinds", type=_kinds, default=None, metavar="KIND,...",
                        help="which kinds, in turn (default all: short,long,garbage,bad_number,wrong_type,"
                             "foreign_id)")
    faults.add_argument("--seed", type=int, default=1,
                        help="seed of the random choices of --drop, --duplicate, --reorder shuffle and "
                             "--malformed, so a run can be repeated (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"std_udp_sim: bad config: {exc}", file=sys.stderr)
        return 2
    from std_udp_recv.sim import Faults, HostError, Simulator

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    modules = None if args.modules is None else [m for group in args.modules for m in group]
    if modules is not None and any(not 0 <= m < config.n_modules for m in modules):
        print(f"std_udp_sim: --modules must be between 0 and {config.n_modules - 1}", file=sys.stderr)
        return 2
    faults = Faults(drop_fraction=args.drop, drop_every=args.drop_every, duplicate_fraction=args.duplicate,
                    reorder=args.reorder, malformed_per_frame=args.malformed, seed=args.seed,
                    drop_packets=args.drop_packets, drop_images=args.drop_images)
    if args.malformed_kinds:
        faults.malformed_kinds = args.malformed_kinds
    try:
        sim = Simulator(config, modules, args.host, faults)
    except HostError as exc:
        print(f"std_udp_sim: --host: {exc}", file=sys.stderr)
        return 2
    try:
        stats = sim.run(args.rate, args.n_images, args.start_id, stop)
    finally:
        sim.close()
    print(f"std_udp_sim: sent {stats.images} images, {stats.packets} packets to {len(sim.senders)} modules "
          f"({stats.dropped} dropped, {stats.duplicated} duplicated, {stats.malformed} malformed on purpose) "
          f"in {stats.seconds:.2f} s: {stats.rate_hz:.0f} images/s achieved", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
