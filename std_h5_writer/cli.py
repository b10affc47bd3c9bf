"""`std_h5_writer CONFIG`: write images from the ImageBuffer to HDF5 on StoreStream requests."""
from __future__ import annotations

import argparse

from core_buffer.service import add_common_arguments, run_daemon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="std_h5_writer", description=__doc__)
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    def build(config):
        from std_h5_writer.writer import H5Writer

        return H5Writer(config)

    return run_daemon("std_h5_writer", args, build)


if __name__ == "__main__":
    raise SystemExit(main())
