"""`std_web CONFIG [--host IFACE] [--port PORT]`: the REST API, pushed status and web page of a detector's
pipeline (docs/std_web.md)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import threading

from core_buffer.service import StatsReporter, add_common_arguments, install_stop_handlers, run, setup_logging

log = logging.getLogger("std_web")



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="std_web", description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--host", default=None, help="interface to listen on (default: config web.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: config web.port, 5000)")
    args = parser.parse_args(argv)
    # core_buffer.service.run_daemon's steps, with the role `web`: run_daemon derives a role from the
    # service name, and std_web serves its metrics on its own HTTP port, not on a metrics base_port offset.
    from core_buffer.config import load_config
    from core_buffer.errors import ConfigError, StdDaqError
    from core_buffer.locks import LockHeld, role_lock, service_role

    setup_logging(args.log_level)
    # pika logs every mandatory message the broker returns; a request or listing nobody serves is an answer
    # std_web gives (NoAgentError), not something to log once a second.
    logging.getLogger("pika.adapters.blocking_connection").setLevel(logging.ERROR)
    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        config = load_config(args.config)
        from std_web.config import WebSettings

        settings = WebSettings.from_config(config)
    except ConfigError as exc:
        log.error("std_web: bad config: %s", exc)
        return 2
    if args.host is not None:
        settings = dataclasses.replace(settings, host=args.host)
    if args.port is not None:
        if not 1 <= args.port <= 65535:
            log.error("std_web: --port %d is not a TCP port (1 to 65535)", args.port)
            return 2
        settings = dataclasses.replace(settings, port=args.port)
    lock = role_lock(config, service_role("std_web"))
    try:
        lock.acquire()
    except LockHeld as exc:
        log.error("std_web: not starting: %s", exc)
        return 1
    except StdDaqError as exc:
        log.error("std_web: cannot start: %s", exc)
        return 1
    try:
        from std_web.web import WebService

        try:
            service = WebService(config, settings)
        except (StdDaqError, OSError) as exc:
            log.error("std_web: cannot start: %s", exc)
            return 1
        interval = args.stats_interval if args.stats_interval is not None else config.stats_interval_s
        reporter = StatsReporter("std_web", {"detector_name": config.detector_name}, interval,
                                 WebService.rate_counters, form=config.stats_log)
        return run(service, stop, reporter)
    finally:
        lock.release()


if __name__ == "__main__":
    raise SystemExit(main())
