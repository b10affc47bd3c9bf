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
    return [int(part) for part in text.split(",") if part]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="std_udp_sim", description=__doc__)
    p.add_argument("config", help="detector config JSON file")
    p.add_argument("--rate", type=float, default=10.0, help="images per second (0 = as fast as possible)")
    p.add_argument("--n-images", type=_n_images, default=100, metavar="N|forever")
    p.add_argument("--start-id", type=int, default=1, help="id of the first image (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="where the receivers listen (default 127.0.0.1)")
    p.add_argument("--modules", type=_modules, default=None, help="comma-separated modules to send (default all)")
    faults = p.add_argument_group("fault injection")
    faults.add_argument("--drop", type=float, default=0.0, metavar="FRACTION", help="drop packets at random")
    faults.add_argument("--drop-every", type=int, default=0, metavar="N",
                        help="drop one packet of every image whose id is a multiple of N")
    faults.add_argument("--duplicate", type=float, default=0.0, metavar="FRACTION", help="send packets twice")
    faults.add_argument("--reorder", action="store_true", help="shuffle the packets within each frame")
    faults.add_argument("--malformed", type=int, default=0, metavar="N", help="malformed datagrams per frame")
    faults.add_argument("--seed", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"std_udp_sim: bad config: {exc}", file=sys.stderr)
        return 2
    from std_udp_recv.sim import Faults, Simulator

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    modules = args.modules
    if modules is not None and any(not 0 <= m < config.n_modules for m in modules):
        print(f"std_udp_sim: --modules must be between 0 and {config.n_modules - 1}", file=sys.stderr)
        return 2
    sim = Simulator(config, modules, args.host, Faults(args.drop, args.drop_every, args.duplicate, args.reorder,
                                                      args.malformed, args.seed))
    try:
        stats = sim.run(args.rate, args.n_images, args.start_id, stop)
    finally:
        sim.close()
    print(f"std_udp_sim: sent {stats.images} images, {stats.packets} packets to {len(sim.senders)} modules "
          f"({stats.dropped} dropped, {stats.duplicated} duplicated, {stats.malformed} malformed on purpose)",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
