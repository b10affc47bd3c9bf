"""`std_assembler CONFIG`: synchronise the modules of a detector and assemble its images."""
from __future__ import annotations

import argparse

from core_buffer.service import add_common_arguments, run_daemon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="std_assembler", description=__doc__)
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    def build(config):
        from std_assembler.assembler import Assembler

        return Assembler(config)

    return run_daemon("std_assembler", args, build)


if __name__ == "__main__":
    raise SystemExit(main())
