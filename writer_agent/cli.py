"""`writer_agent CONFIG`: serve write requests for one detector from RabbitMQ ($STD_DAQ_BROKER_URL)."""
from __future__ import annotations

import argparse

from core_buffer.service import add_common_arguments, run_daemon


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="writer_agent", description=__doc__)
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    def build(config):
        from writer_agent.agent import WriterAgent

        return WriterAgent(config)

    return run_daemon("writer_agent", args, build)


if __name__ == "__main__":
    raise SystemExit(main())
