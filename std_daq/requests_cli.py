"""`std-daq write`, `std-daq kill` and `std-daq monitor`: the operator's side of the RabbitMQ protocol.

The tag (routing key) is the detector name: `--tag DET`, or $STD_DAQ_TAG. The broker is $STD_DAQ_BROKER_URL.
Exit codes of `write --wait`: 0 success, 1 request_fail, no writer_agent serves the tag, or RabbitMQ
unreachable, 3 no news of the request for --timeout seconds (default 60), no writer_agent took it (see
DaqClient.wait), or the broker connection broke while waiting (the request may still run), 2 usage.
`monitor` reconnects when the broker connection breaks, and says so.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import TextIO

from core_buffer import broker
from core_buffer.broker import StatusMessage
from std_daq.client import BrokerError, DaqClient, NoAgentError, RequestTimeout, progress_of

TAG_ENV = "STD_DAQ_TAG"
WRITE_TIMEOUT_S = 60.0  # write --wait gives up after this long without news of the request
MONITOR_ROWS = 20
MONITOR_RETRY_MAX_S = 5.0  # monitor: longest pause between attempts to reconnect to the broker


def _tag(args: argparse.Namespace) -> str:
    tag = args.tag or os.environ.get(TAG_ENV)
    if not tag:
        print(f"std-daq: name the detector with --tag DET or ${TAG_ENV}", file=sys.stderr)
        raise SystemExit(2)
    return tag


def _client() -> DaqClient:
    try:
        return DaqClient(broker.broker_url(), name="std-daq command line")
    except BrokerError as exc:
        print(f"std-daq: {exc}; is it running? (rabbitmq-server -detached)", file=sys.stderr)
        raise SystemExit(1) from None


def _bar(written: int, total: int, width: int = 40) -> str:
    filled = width * min(written, total) // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {written}/{total}"


def run_write(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    tag = _tag(args)
    with _client() as daq:
        extra = {} if args.run_id is None else {"run_id": args.run_id}
        if args.user_id is not None:
            extra["user_id"] = args.user_id
        try:
            request_id = daq.submit(args.output_file, args.n_images, tag=tag, **extra)
        except NoAgentError as exc:
            print(f"std-daq: {exc}", file=sys.stderr)
            return 1
        except BrokerError as exc:
            print(f"std-daq: {exc}; the request was not confirmed, it may or may not have been queued "
                  "(std-daq monitor shows what runs)", file=sys.stderr)
            return 1
        print(f"request {request_id}: {args.n_images} images to {args.output_file} (tag {tag})", file=out, flush=True)
        if not args.wait:
            return 0
        tty = out.isatty()

        def show(status: StatusMessage) -> None:
            if status.action == broker.REQUEST_PROGRESS:
                written, total = progress_of(status)
                print(("\r  " if tty else "  ") + _bar(written, total), end="" if tty else "\n", file=out, flush=True)
            elif status.action == broker.REQUEST_START:
                print(f"  started by {status.source}", file=out, flush=True)

        try:
            result = daq.wait(request_id, on_status=show, idle_timeout_s=args.timeout)
        except RequestTimeout as exc:
            print(f"\nstd-daq: {exc}", file=sys.stderr)
            return 3
        except BrokerError as exc:
            print(f"\nstd-daq: {exc} while waiting for request {request_id}; it may still run "
                  "(std-daq monitor shows it once RabbitMQ is back)", file=sys.stderr)
            return 3
        if tty:
            print(file=out)
        if result.ok:
            s = result.summary
            dropped = f", {s['images_dropped']} not handed to the writer" if s.get("images_dropped") else ""
            print(f"done: {s.get('images_written')} images written, {s.get('images_lost', 0)} lost, "
                  f"{s.get('sequence_gaps', 0)} missed by the agent{dropped}, in {s.get('duration_s')} s -> "
                  f"{s.get('output_file')}", file=out)
            if s.get("warning"):  # written, but not n_images consecutive good images: say what is wrong
                print(f"warning: {s['warning']}", file=out)
            return 0
        print(f"FAILED: {result.message}", file=sys.stderr)
        return 1


def run_kill(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    tag = _tag(args)
    with _client() as daq:
        try:
            daq.kill(args.request_id, tag=tag)
        except (NoAgentError, BrokerError) as exc:
            print(f"std-daq: {exc}", file=sys.stderr)
            return 1
        print(f"kill sent for request {args.request_id} (tag {tag})", file=out)
        if not args.wait:
            return 0
        try:
            result = daq.wait(args.request_id, args.timeout)
        except (RequestTimeout, BrokerError) as exc:
            print(f"std-daq: {exc}", file=sys.stderr)
            return 3
        print(f"{result.action}: {result.message}", file=out)
        return 0


class MonitorTable:
    """The latest state of each request, per service that reported on it."""

    def __init__(self) -> None:
        self.rows: collections.OrderedDict[str, dict] = collections.OrderedDict()

    def update(self, status: StatusMessage) -> str:
        row = self.rows.setdefault(status.request_id, {"file": "", "n_images": "", "services": {}})
        try:
            body = json.loads(status.body)
            if isinstance(body, dict):
                path = str(body.get("output_file", ""))
                row["file"] = path if len(path) <= 60 else "..." + path[-57:]  # the file name is what tells runs apart
                row["n_images"] = body.get("n_images", "")
        except ValueError:
            pass
        state = status.action.removeprefix("request_")
        if status.action == broker.REQUEST_PROGRESS:
            written, total = progress_of(status)
            state = f"writing {written}/{total}"
        elif status.action == broker.REQUEST_FAIL:
            state = f"FAIL: {status.message[:100]}"
        elif status.action == broker.REQUEST_SUCCESS:
            state = "success"
            try:
                state = f"success, {json.loads(status.message).get('images_written')} written"
            except (ValueError, AttributeError):
                pass
        row["services"][status.source or "?"] = state
        self.rows.move_to_end(status.request_id)
        while len(self.rows) > MONITOR_ROWS:
            self.rows.popitem(last=False)
        return self.line(status.request_id)

    def line(self, request_id: str) -> str:
        row = self.rows[request_id]
        services = "  ".join(f"{name}: {state}" for name, state in row["services"].items())
        return f"{time.strftime('%H:%M:%S')} {request_id[:8]} {row['file']} ({row['n_images']} images)  {services}"

    def screen(self) -> str:
        return "\n".join(self.line(r) for r in self.rows)


def run_monitor(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Until Ctrl-C, or --duration seconds without a status. A broken broker connection is said on stderr
    and re-established (retries up to MONITOR_RETRY_MAX_S apart); statuses published meanwhile are missed,
    since the monitor's queue goes with its connection. Exit 1 only when --duration passes without the
    broker."""
    table = MonitorTable()
    tty = out.isatty()
    daq = _client()
    print("watching the status exchange; Ctrl-C stops", file=out, flush=True)
    try:
        while True:
            try:
                for status in daq.statuses(args.duration):
                    line = table.update(status)
                    if tty:
                        out.write("\x1b[H\x1b[2J" + table.screen() + "\n")
                    else:
                        out.write(line + "\n")
                    out.flush()
                return 0
            except BrokerError as exc:
                daq.close()
                print(f"std-daq: {exc}; reconnecting", file=sys.stderr, flush=True)
                daq = _reconnect(args.duration)
                if daq is None:
                    print(f"std-daq: no broker for {args.duration:g} s; giving up", file=sys.stderr)
                    return 1
                print("std-daq: reconnected; statuses published meanwhile were missed", file=sys.stderr,
                      flush=True)
    except KeyboardInterrupt:
        return 0
    finally:
        if daq is not None:
            daq.close()


def _reconnect(limit_s: float | None) -> DaqClient | None:
    """A new client once RabbitMQ answers again; None when `limit_s` passes first."""
    deadline = None if limit_s is None else time.monotonic() + limit_s
    pause = 0.5
    while deadline is None or time.monotonic() < deadline:
        try:
            return DaqClient(broker.broker_url(), name="std-daq command line")
        except BrokerError:
            time.sleep(pause)
            pause = min(pause * 2, MONITOR_RETRY_MAX_S)
    return None


def add_commands(commands: argparse._SubParsersAction) -> None:
    write = commands.add_parser("write", help="ask writer_agent for a write of N images (over RabbitMQ)")
    write.add_argument("output_file", help="absolute path of the HDF5 file to create")
    write.add_argument("n_images", type=int, help="number of images to write")
    write.add_argument("--tag", help=f"detector name (default ${TAG_ENV})")
    write.add_argument("--run-id", type=int, default=None, help="run id stored in the file (default: the agent's)")
    write.add_argument("--user-id", type=int, default=None, help="uid the file should belong to")
    write.add_argument("--wait", action="store_true", help="follow the request and exit non-zero on failure")
    write.add_argument("--timeout", type=float, default=WRITE_TIMEOUT_S, metavar="S",
                       help="with --wait: give up (exit 3) after S seconds without news of the request "
                            "(default %(default)g; progress reports come every second or so while it runs)")
    write.set_defaults(func=run_write)

    kill = commands.add_parser("kill", help="stop a running or queued write")
    kill.add_argument("request_id")
    kill.add_argument("--tag", help=f"detector name (default ${TAG_ENV})")
    kill.add_argument("--wait", action="store_true", help="wait for the request's final status")
    kill.add_argument("--timeout", type=float, default=30.0, metavar="S")
    kill.set_defaults(func=run_kill)

    monitor = commands.add_parser("monitor", help="requests and their statuses as they arrive")
    monitor.add_argument("--duration", type=float, default=None, metavar="S",
                         help="stop after S seconds without a status (default: until Ctrl-C)")
    monitor.set_defaults(func=run_monitor)
