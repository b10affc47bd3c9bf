"""`std-daq write`, `kill`, `requests` and `monitor`: the operator's side of the RabbitMQ protocol.

The tag (routing key) is the detector name: `--tag DET`, or $STD_DAQ_TAG. The broker is $STD_DAQ_BROKER_URL.
Exit codes: 0 done; 1 the service said no (request_fail, kill refused), no writer_agent serves the tag, or
RabbitMQ unreachable or refusing the login; 2 usage, including what the command line can tell is wrong
before sending (n_images below 1, a negative run or user id, an output file that names a directory);
3 gave up waiting: `write --wait` saw no image written for --timeout seconds (default 60), no writer_agent
took the request (see DaqClient.wait), or the broker connection broke while waiting (the request may still
run); a kill or `requests` got no answer within --timeout (an agent older than the answers, or a hung one).
`monitor` reconnects when the broker connection breaks, and says so.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Any, Callable, TextIO

from core_buffer import broker
from core_buffer.broker import KILL_ACCEPTED, KILL_CURRENT, KILL_PREFIX_MIN, KILL_REFUSED, REQUEST_LIST, StatusMessage
from std_daq.client import (BrokerError, BrokerLoginRefused, DaqClient, ListedRequest, NoAgentError, NoAnswer,
                            QueryNotUnderstood, RequestResult, RequestTimeout, progress_of)

TAG_ENV = "STD_DAQ_TAG"
WRITE_TIMEOUT_S = 60.0  # write --wait gives up after this long without an image written
KILL_TIMEOUT_S = 10.0  # kill: for the agent's answer, and with --wait for the final status after it
LIST_TIMEOUT_S = 5.0  # requests: for the agent's answer (it answers at once)
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
        url = broker.broker_url()
    except broker.BrokerConfigError as exc:
        print(f"std-daq: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        return DaqClient(url, name="std-daq command line")
    except BrokerLoginRefused as exc:  # it answered: asking whether it runs would send the reader astray
        print(f"std-daq: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except BrokerError as exc:
        print(f"std-daq: {exc}; is it running? (rabbitmq-server -detached)", file=sys.stderr)
        raise SystemExit(1) from None


def _bar(written: int, total: int, width: int = 40) -> str:
    filled = width * min(written, total) // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {written}/{total}"


# -- write ---------------------------------------------------------------------------------------------

def _whole_number(minimum: int, note: str = "") -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`; `note` is added to the refusal."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}{note}")
        return value

    return parse


def output_file_to_send(given: str) -> str:
    """The output file as it goes into the request: an absolute path unchanged (the agent resolves `..` and
    symlinks on its own host), a relative one resolved against the current directory. ValueError for what
    is wrong on any host: an empty name, or one that ends in '/' (a directory). Whether the directory exists
    and is allowed only the agent can tell: this command may run on another machine than the writer."""
    if not given.strip():
        raise ValueError("the output file name is empty")
    if given.endswith("/"):
        raise ValueError(f"{given} ends in '/': it names a directory; give the file to create in it")
    if os.path.isabs(given):
        return given
    try:
        return os.path.abspath(given)
    except FileNotFoundError:  # the shell's current directory was deleted under it
        raise ValueError(f"{given} is relative and the current directory no longer exists; give an "
                         "absolute path") from None


def run_write(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    tag = _tag(args)
    try:
        output_file = output_file_to_send(args.output_file)
    except ValueError as exc:
        print(f"std-daq write: {exc}", file=sys.stderr)
        return 2
    if output_file != args.output_file:  # say what is sent, since the agent checks that path, not the one typed
        print(f"output file {args.output_file} is relative: sending {output_file} (resolved against the "
              "current directory)", file=out)
    with _client() as daq:
        extra = {} if args.run_id is None else {"run_id": args.run_id}
        if args.user_id is not None:
            extra["user_id"] = args.user_id
        try:
            request_id = daq.submit(output_file, args.n_images, tag=tag, **extra)
        except NoAgentError as exc:
            print(f"std-daq: {exc}", file=sys.stderr)
            return 1
        except BrokerError as exc:
            print(f"std-daq: {exc}; the request was not confirmed, it may or may not have been queued "
                  "(std-daq monitor shows what runs)", file=sys.stderr)
            return 1
        print(f"request {request_id}: {args.n_images} images to {output_file} (tag {tag})", file=out, flush=True)
        if not args.wait:
            return 0
        return _follow_write(daq, request_id, tag, args.timeout, out)


def _follow_write(daq: DaqClient, request_id: str, tag: str, stall_timeout_s: float, out: TextIO) -> int:
    """Show the request's progress until its final status; the exit code of `write --wait`."""
    tty = out.isatty()
    last_bar = [""]  # off a terminal, a line only when the bar changes: the agent repeats it every second

    def show(status: StatusMessage) -> None:
        if status.action == broker.REQUEST_PROGRESS:
            bar = _bar(*progress_of(status))
            if tty:
                print("\r  " + bar, end="", file=out, flush=True)
            elif bar != last_bar[0]:
                print("  " + bar, file=out, flush=True)
            last_bar[0] = bar
        elif status.action == broker.REQUEST_START:
            print(f"  started by {status.source}", file=out, flush=True)

    try:
        result = daq.wait(request_id, on_status=show, stall_timeout_s=stall_timeout_s)
    except RequestTimeout as exc:
        print(f"\nstd-daq: {exc}; it may still run: `std-daq kill {request_id[:8]} --tag {tag}` stops it, "
              "`std-daq monitor` shows it", file=sys.stderr)
        return 3
    except BrokerError as exc:
        print(f"\nstd-daq: {exc} while waiting for request {request_id}; it may still run "
              "(std-daq monitor shows it once RabbitMQ is back)", file=sys.stderr)
        return 3
    if tty:
        print(file=out)
    return _print_write_result(result, out)


def _print_write_result(result: RequestResult, out: TextIO) -> int:
    if not result.ok:
        print(f"FAILED: {result.message}", file=sys.stderr)
        return 1
    s = result.summary
    dropped = f", {s['images_dropped']} not handed to the writer" if s.get("images_dropped") else ""
    print(f"done: {s.get('images_written')} images written, {s.get('images_lost', 0)} lost, "
          f"{s.get('sequence_gaps', 0)} missed by the agent{dropped}, in {s.get('duration_s')} s -> "
          f"{s.get('output_file')}", file=out)
    if s.get("warning"):  # written, but not n_images consecutive good images: say what is wrong
        print(f"warning: {s['warning']}", file=out)
    return 0


# -- kill and requests ---------------------------------------------------------------------------------

def _kill_target(args: argparse.Namespace) -> str:
    """What the kill names: a request id or a prefix of one, or KILL_CURRENT; exit 2 when unclear."""
    if args.current and args.request_id:
        print("std-daq kill: name the request or pass --current, not both", file=sys.stderr)
        raise SystemExit(2)
    if not args.current and not args.request_id:
        print("std-daq kill: name the request (its id, or a unique prefix of it), or pass --current for the "
              "write running now", file=sys.stderr)
        raise SystemExit(2)
    if args.current:
        return KILL_CURRENT
    if len(args.request_id) < KILL_PREFIX_MIN:
        print(f"std-daq kill: {args.request_id!r} is too short: give at least {KILL_PREFIX_MIN} characters "
              "of the request id", file=sys.stderr)
        raise SystemExit(2)
    return args.request_id


def run_kill(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    tag = _tag(args)
    target = _kill_target(args)
    with _client() as daq:
        try:
            answer = daq.kill_and_confirm(target, tag=tag, timeout_s=args.timeout)
        except (NoAgentError, BrokerError) as exc:
            print(f"std-daq: {exc}", file=sys.stderr)
            return 1
        except NoAnswer as exc:
            print(f"std-daq: {exc}", file=sys.stderr)
            return 3
        if not answer.accepted:
            print(f"std-daq: kill {target} refused by {answer.source or 'the agent'} of tag {tag}: {answer.message}",
                  file=sys.stderr)
            return 1
        request_id = answer.request_id or target
        print(f"kill accepted by {answer.source or 'the agent'} of tag {tag}: stopping request {request_id}",
              file=out, flush=True)
        if not args.wait:
            return 0
        try:
            result = daq.wait(request_id, args.timeout)
        except (RequestTimeout, BrokerError) as exc:
            print(f"std-daq: {exc}", file=sys.stderr)
            return 3
        print(f"{result.action}: {result.message}", file=out)
        return 0


def format_requests(tag: str, listed: list[ListedRequest]) -> str:
    if not listed:
        return f"tag {tag}: no running or queued requests"
    n_running = sum(1 for r in listed if r.state == "running")
    lines = [f"tag {tag}: {n_running} running, {len(listed) - n_running} queued"]
    lines += [f"  {r.state:<8} {r.request_id}  {r.n_written}/{r.n_images}  {r.output_file}" for r in listed]
    return "\n".join(lines)


def run_requests(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    tag = _tag(args)
    with _client() as daq:
        try:
            listed = daq.list_requests(tag=tag, timeout_s=args.timeout)
        except (NoAgentError, BrokerError, QueryNotUnderstood) as exc:
            print(f"std-daq: {exc}", file=sys.stderr)
            return 1
        except NoAnswer as exc:
            print(f"std-daq: {exc}", file=sys.stderr)
            return 3
    print(format_requests(tag, listed), file=out)
    return 0


# -- monitor -------------------------------------------------------------------------------------------

def _progress_state(status: StatusMessage) -> str:
    """'writing 37/100', and in brackets the state when it is not `writing` and what the agent waits for."""
    written, total = progress_of(status)
    try:
        report = json.loads(status.message)
    except ValueError:
        report = {}
    report = report if isinstance(report, dict) else {}
    notes = [str(report["state"])] if report.get("state") not in (None, "", "writing") else []
    if report.get("waiting_for"):
        notes.append(f"waiting for {report['waiting_for']}")
    return f"writing {written}/{total}" + (f" ({', '.join(notes)})" if notes else "")


def _success_state(message: str) -> str:
    try:
        summary = json.loads(message)
    except ValueError:
        return "success"
    if not isinstance(summary, dict):
        return "success"
    state = f"success, {summary.get('images_written')} written"
    return state + (f"; warning: {summary['warning']}" if summary.get("warning") else "")


class MonitorTable:
    """The latest state of each request, per service that reported on it. `update` returns the line to
    print, or None when the status changed nothing shown (the agent repeats its progress every second)."""

    def __init__(self) -> None:
        self.rows: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def update(self, status: StatusMessage) -> str | None:
        if status.action == REQUEST_LIST:  # an answer to `std-daq requests`, not a request's news
            return None
        if status.action == KILL_REFUSED:  # keyed by what the kill named, which may be no request at all
            return self._note(f"kill {status.request_id}", f"kill refused by {status.source or '?'}: {status.message}")
        request_id = status.message if status.action == KILL_ACCEPTED and status.message else status.request_id
        row = self.rows.setdefault(request_id, {"file": "", "n_images": "", "services": {}})
        before = (row["file"], row["n_images"], dict(row["services"]))
        self._take_body(row, status.body)
        row["services"][status.source or "?"] = self._state(status)
        self.rows.move_to_end(request_id)
        self._trim()
        if (row["file"], row["n_images"], row["services"]) == before:
            return None
        return self.line(request_id)

    @staticmethod
    def _take_body(row: dict[str, Any], body: bytes) -> None:
        try:
            parsed = json.loads(body)
        except ValueError:
            return
        if isinstance(parsed, dict) and "output_file" in parsed:
            path = str(parsed.get("output_file", ""))
            row["file"] = path if len(path) <= 60 else "..." + path[-57:]  # the file name is what tells runs apart
            row["n_images"] = parsed.get("n_images", "")

    @staticmethod
    def _state(status: StatusMessage) -> str:
        if status.action == broker.REQUEST_PROGRESS:
            return _progress_state(status)
        if status.action == broker.REQUEST_FAIL:
            return f"FAIL: {status.message}"  # whole: the reason is often at its end
        if status.action == broker.REQUEST_SUCCESS:
            return _success_state(status.message)
        if status.action == KILL_ACCEPTED:
            return "kill accepted"
        return status.action.removeprefix("request_")

    def _note(self, key: str, text: str) -> str:
        self.rows[key] = {"note": text}
        self.rows.move_to_end(key)
        self._trim()
        return self.line(key)

    def _trim(self) -> None:
        while len(self.rows) > MONITOR_ROWS:
            self.rows.popitem(last=False)

    def line(self, request_id: str) -> str:
        row = self.rows[request_id]
        if "note" in row:
            return f"{time.strftime('%H:%M:%S')} {row['note']}"
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
                    if line is None:
                        continue
                    out.write("\x1b[H\x1b[2J" + table.screen() + "\n" if tty else line + "\n")
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


# -- the commands --------------------------------------------------------------------------------------

def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _add_tag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tag", help=f"the writer_agent's tag, by default the detector name (default ${TAG_ENV})")


def add_commands(commands: argparse._SubParsersAction) -> None:
    write = commands.add_parser("write", help="ask writer_agent for a write of N images (over RabbitMQ)")
    write.add_argument("output_file", help="the HDF5 file to create; a relative path is resolved against the "
                                           "current directory (the path sent is printed)")
    write.add_argument("n_images", type=_whole_number(1, " (the most is the agent's writer_agent.max_images)"),
                       help="number of images to write")
    _add_tag(write)
    write.add_argument("--run-id", type=_whole_number(0), default=None,
                       help="run id stored in the file (default: the agent derives one from the time)")
    write.add_argument("--user-id", type=_whole_number(0), default=None,
                       help="uid the file should belong to (default: the writer's own)")
    write.add_argument("--wait", action="store_true", help="follow the request and exit non-zero on failure")
    write.add_argument("--timeout", type=_seconds, default=WRITE_TIMEOUT_S, metavar="S",
                       help="with --wait: give up (exit 3) after S seconds in which no image was written, "
                            "however many progress reports came meanwhile; while the request is queued, "
                            "a request ahead of it moving on counts (default %(default)g). The request may "
                            "still run after that")
    write.set_defaults(func=run_write)

    kill = commands.add_parser("kill", help="stop a running or queued write",
                               description="Stop a running or queued write: the agent answers whether it "
                                           "stops one; exit 0 if so, 1 if it refused (the request finished "
                                           "already, is unknown, or the prefix is ambiguous), 3 without an "
                                           "answer.")
    kill.add_argument("request_id", nargs="?",
                      help=f"the request's id, or a prefix of it of at least {KILL_PREFIX_MIN} characters that "
                           "names one running or queued request (the 8 that `std-daq monitor` shows will do)")
    kill.add_argument("--current", action="store_true", help="stop the write running now, whatever its id")
    _add_tag(kill)
    kill.add_argument("--wait", action="store_true", help="also wait for the stopped request's final status")
    kill.add_argument("--timeout", type=_seconds, default=KILL_TIMEOUT_S, metavar="S",
                      help="seconds to wait for the agent's answer, and with --wait then for the request's "
                           "final status (default %(default)g)")
    kill.set_defaults(func=run_kill)

    requests = commands.add_parser("requests", help="list the running and queued writes of a detector's agent")
    _add_tag(requests)
    requests.add_argument("--timeout", type=_seconds, default=LIST_TIMEOUT_S, metavar="S",
                          help="seconds to wait for the agent's answer (default %(default)g)")
    requests.set_defaults(func=run_requests)

    monitor = commands.add_parser("monitor", help="requests and their statuses as they arrive",
                                  description="One line per request whenever what it shows changes.")
    monitor.add_argument("--duration", type=_seconds, default=None, metavar="S",
                         help="stop after S seconds without a status (default: until Ctrl-C)")
    monitor.set_defaults(func=run_monitor)
