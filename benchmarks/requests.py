"""Small write requests through writer_agent over the real RabbitMQ: requests per second, and the time from
publish to final status.

    flock /tmp/std-daq-heavy.lock python benchmarks/requests.py [--requests 200] [--clients 4] [--images 5]

Real processes and the real broker ($STD_DAQ_BROKER_URL, default the local RabbitMQ): std_h5_writer and
writer_agent run as `python -m <service>`, so an older checkout to compare with, made the working directory
and put first on PYTHONPATH, is what runs. This process plays std_assembler (small images, 128x128 uint16,
into a real ImageBuffer, their ImageMetadata on the real PUB address, at --rate, from a process of its own)
and the clients, written from DESIGN.md §5 alone: each publisher has its own connection and publishes with
confirms; one listener stamps every status of the benchmark's requests as it arrives.

1. alone: --alone requests one after the other (each published once the previous one's final came):
   publish to final, the floor per request when nothing waits.
2. burst: --requests requests from --clients clients, all published at once (each client its share, back to
   back): requests/s from the first publish to the last final; publish to final p50/p99 (mostly the wait
   behind the requests ahead); the gap between consecutive finals (the agent's turnaround between writes);
   how long before its own final a request's request_start came (a request queued behind others should get
   it when the agent takes it, long before its final).
Every request must get exactly one request_start, then one request_success, and its file the next --images
images, consecutive and with the pixels produced; the count of those that did is printed too. One figure
per line: name, value, unit.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

import h5py
import numpy as np
import pika
import zmq

from core_buffer import broker
from core_buffer.config import load_config
from core_buffer.formats import ImageMetadata
from core_buffer.ipc import image_metadata_address, make_socket
from core_buffer.ringbuffer import ImageBuffer

SHAPE = (128, 128)  # uint16: 32 KiB an image
READY_S = 30.0
FINALS = ("request_success", "request_fail")


def make_config(workdir: str) -> str:
    """An Eiger config (no FrameBuffer to look for) with small images; sockets and records in workdir."""
    raw = {
        "detector_name": f"benchreq{os.getpid()}",
        "detector_type": "eiger",
        "n_modules": 1,
        "bit_depth": 16,
        "image_pixel_height": SHAPE[0],
        "image_pixel_width": SHAPE[1],
        "start_udp_port": 50000,
        "frame_buffer_slots": 2,
        "image_buffer_slots": 1000,
        "stats_interval_s": 10.0,
        "ipc_dir": workdir,
        "output_dirs": [os.path.join(workdir, "out")],
    }
    path = os.path.join(workdir, "bench-requests.json")
    with open(path, "w") as f:
        json.dump(raw, f)
    return path


class Service:
    """One service as `python -m <name> CONFIG`, its log in the workdir."""

    def __init__(self, name: str, config_path: str, workdir: str) -> None:
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", name, config_path], stdout=subprocess.DEVNULL,
                                         stderr=log, stdin=subprocess.DEVNULL)

    def wait_ready(self, text: str) -> None:
        deadline = time.monotonic() + READY_S
        while True:
            with open(self.log_path) as f:
                if text in f.read():
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                with open(self.log_path) as f:
                    raise RuntimeError(f"{self.name} did not start:\n{f.read()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fill_value(image_id: int) -> int:
    """The uint16 every pixel of an image holds: both bytes id % 251, so a row is checked by value."""
    return (image_id % 251) * 257


def produce(config_path: str, rate_hz: float, stop: Any, ready: Any) -> None:
    """std_assembler's part, in a process of its own (in this one, its thread would take the GIL from the
    listener and skew the times it stamps): images into the ImageBuffer and their ImageMetadata published
    at a steady rate, catching up in small batches when late."""
    config = load_config(config_path)
    images = ImageBuffer.for_config(config, create=False)
    pub = make_socket(zmq.Context.instance(), zmq.PUB, hwm=100000)
    pub.bind(image_metadata_address(config))
    nbytes, period = SHAPE[0] * SHAPE[1] * 2, 1.0 / rate_hz
    image_id, next_at = 1, time.monotonic()
    ready.set()
    try:
        while not stop.is_set():
            for _ in range(20):
                if time.monotonic() < next_at:
                    break
                images.begin_image(image_id)[:nbytes] = image_id % 251
                meta = ImageMetadata(image_id, *SHAPE, user_1=image_id, user_2=image_id)
                images.commit_image(meta)
                pub.send(meta.encode())
                image_id, next_at = image_id + 1, next_at + period
            stop.wait(max(0.0, next_at - time.monotonic()))
    finally:
        pub.close()
        images.close()


class Producer:
    """The ImageBuffer (made and removed here) and the process that fills it (`produce`)."""

    def __init__(self, config, config_path: str, rate_hz: float) -> None:
        self.images = ImageBuffer.for_config(config)
        context = multiprocessing.get_context("spawn")
        self._stop, ready = context.Event(), context.Event()
        self._process = context.Process(target=produce, args=(config_path, rate_hz, self._stop, ready), daemon=True)
        self._process.start()
        if not ready.wait(30):
            self.close()
            raise RuntimeError("the image producer did not start")

    def close(self) -> None:
        self._stop.set()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self.images.close()
        self.images.unlink()


class Listener:
    """Every status of the benchmark's requests, stamped with its arrival (time.monotonic), in a thread with
    its own connection, bound to the status exchange before anything is published."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.wanted: set[str] = set()
        self.seen: dict[str, list[tuple[float, str]]] = {}
        self.finals = 0
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self.ready.wait(10):
            raise RuntimeError(f"the status listener did not connect: {self._error!r}")

    def expect(self, request_ids: list[str]) -> None:
        with self.lock:
            self.wanted.update(request_ids)

    def _on_status(self, _channel, _method, properties, _body) -> None:
        now = time.monotonic()
        rid = properties.correlation_id or ""
        with self.lock:
            if rid not in self.wanted:
                return  # another detector's (the status exchange is a fanout shared by everyone)
            action = str((properties.headers or {}).get("action", ""))
            self.seen.setdefault(rid, []).append((now, action))
            if action in FINALS:
                self.finals += 1

    def _run(self) -> None:
        try:
            connection = broker.connect(self.url, connection_name="benchmark listener")
            channel = connection.channel()
            broker.declare_exchanges(channel)
            queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue=queue, exchange=broker.STATUS_EXCHANGE)
            channel.basic_consume(queue=queue, on_message_callback=self._on_status, auto_ack=True)
        except Exception as exc:  # noqa: BLE001 - reported by the constructor
            self._error = exc
            return
        self.ready.set()
        try:
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.05)
            connection.close()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._error = exc  # the broker went away: the statuses still missing say so

    def wait_finals(self, n: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if self.finals >= n:
                    return True
            time.sleep(0.002)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Publisher:
    """One client: its own connection, requests published with confirms (as std-daq's client does)."""

    def __init__(self, url: str, name: str) -> None:
        self.connection = broker.connect(url, connection_name=name)
        self.channel = self.connection.channel()
        broker.declare_exchanges(self.channel)
        self.channel.confirm_delivery()
        self.published: dict[str, float] = {}

    def publish(self, tag: str, request_id: str, output_file: str, n_images: int) -> None:
        body = json.dumps({"output_file": output_file, "n_images": n_images}).encode()
        self.published[request_id] = time.monotonic()
        self.channel.basic_publish(exchange=broker.REQUEST_EXCHANGE, routing_key=tag, body=body, mandatory=True,
                                   properties=pika.BasicProperties(correlation_id=request_id))

    def close(self) -> None:
        try:
            self.connection.close()
        except (pika.exceptions.AMQPError, OSError):
            pass  # broken already (the broker restarted): nothing to close


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def request_ok(statuses: list[tuple[float, str]]) -> bool:
    """Exactly one request_start, first, and exactly one final, last, a success."""
    actions = [a for _, a in statuses if a != "request_progress"]
    return actions == ["request_start", "request_success"]


def file_ok(path: str, tag: str, n_images: int) -> bool:
    try:
        with h5py.File(path, "r") as f:
            data, ids = f["/entry/data/data"][:], f[f"/{tag}/image_id"][:]
    except (OSError, KeyError):
        return False
    if data.shape[0] != n_images or ids.size != n_images or np.any(np.diff(ids.astype(np.int64)) != 1):
        return False
    return all(np.all(data[i] == fill_value(int(ids[i]))) for i in range(n_images))


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: str) -> None:
        self.args, self.workdir = args, workdir
        self.url = broker.broker_url()
        self.out = os.path.join(workdir, "out")
        os.mkdir(self.out)
        config_path = make_config(workdir)
        self.config = load_config(config_path)
        self.tag = self.config.detector_name
        self.services: list[Service] = []
        self.publishers: list[Publisher] = []
        self.listener: Listener | None = None
        self.producer = Producer(self.config, config_path, args.rate)
        try:
            self.listener = Listener(self.url)
            self.publishers = [Publisher(self.url, f"benchmark client {i}") for i in range(args.clients)]
            for name, ready in (("std_h5_writer", "std_h5_writer running"), ("writer_agent", "serving tag")):
                self.services.append(Service(name, config_path, workdir))
                self.services[-1].wait_ready(ready)
        except BaseException:
            self.close()
            raise

    def new_requests(self, n: int, prefix: str) -> list[tuple[str, str]]:
        made = [(str(uuid.uuid4()), os.path.join(self.out, f"{prefix}{i}.h5")) for i in range(n)]
        self.listener.expect([rid for rid, _ in made])
        return made

    def alone(self) -> tuple[list[tuple[str, str]], list[float]]:
        """Requests sent one at a time, and their seconds from publish to final."""
        publisher, seconds = self.publishers[0], []
        requests = self.new_requests(self.args.alone, "alone")
        for k, (rid, path) in enumerate(requests):
            publisher.publish(self.tag, rid, path, self.args.images)
            if not self.listener.wait_finals(k + 1, 30):
                raise RuntimeError(f"request {rid} got no final status within 30 s")
            with self.listener.lock:
                final_at = self.listener.seen[rid][-1][0]
            seconds.append(final_at - publisher.published[rid])
        return requests, seconds

    def published(self) -> dict[str, float]:
        """When each request was published (time.monotonic, just before basic_publish)."""
        return {rid: t for p in self.publishers for rid, t in p.published.items()}

    def burst(self) -> tuple[list[tuple[str, str]], float]:
        """All requests published at once by the clients; (requests, seconds from the first publish until
        the last final status)."""
        requests = self.new_requests(self.args.requests, "burst")
        shares = [requests[i::len(self.publishers)] for i in range(len(self.publishers))]
        finals_before = self.listener.finals
        go = threading.Barrier(len(self.publishers))

        def client(publisher: Publisher, share: list[tuple[str, str]]) -> None:
            go.wait()
            for rid, path in share:
                publisher.publish(self.tag, rid, path, self.args.images)

        threads = [threading.Thread(target=client, args=(p, s)) for p, s in zip(self.publishers, shares)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not self.listener.wait_finals(finals_before + len(requests), self.args.timeout):
            raise RuntimeError(f"only {self.listener.finals - finals_before} of {len(requests)} requests got a "
                               f"final status within {self.args.timeout:g} s")
        with self.listener.lock:
            last_final = max(self.listener.seen[rid][-1][0] for rid, _ in requests)
        first_publish = min(self.published()[rid] for rid, _ in requests)
        return requests, last_final - first_publish

    def close(self) -> None:
        try:
            for service in reversed(self.services):
                service.stop()
            for publisher in self.publishers:
                publisher.close()
            if self.listener is not None:
                self.listener.close()
        finally:
            self.producer.close()  # whatever happened: it removes the ImageBuffer


def report(bench: Bench, alone: tuple[list[tuple[str, str]], list[float]], requests: list[tuple[str, str]],
           elapsed: float) -> int:
    seen, published = bench.listener.seen, bench.published()
    latency = [seen[rid][-1][0] - published[rid] for rid, _ in requests]
    finals = sorted(seen[rid][-1][0] for rid, _ in requests)
    gaps = [b - a for a, b in zip(finals, finals[1:])]
    # A request's request_start before its final: with the writes one at a time, every request but the first
    # waits behind others; its start should come when the agent takes it, not when its turn comes.
    start_lead = [seen[rid][-1][0] - next(t for t, a in seen[rid] if a == "request_start")
                  for rid, _ in requests if any(a == "request_start" for _, a in seen[rid])]
    n = bench.args.images
    everything = alone[0] + requests
    good = sum(1 for rid, path in everything if request_ok(seen[rid]) and file_ok(path, bench.tag, n))
    taken = [next(t for t, a in seen[rid] if a == "request_start") - published[rid] for rid, _ in alone[0]
             if any(a == "request_start" for _, a in seen[rid])]
    print(f"alone: publish to request_start p50: {1000 * statistics.median(taken):.1f} ms")
    print(f"alone: publish to final p50: {1000 * statistics.median(alone[1]):.1f} ms")
    print(f"requests: {len(requests) / elapsed:.1f} requests/s")
    print(f"publish to final p50: {1000 * percentile(latency, 50):.1f} ms")
    print(f"publish to final p99: {1000 * percentile(latency, 99):.1f} ms")
    print(f"final to next final min: {1000 * min(gaps):.1f} ms")
    print(f"final to next final p50: {1000 * statistics.median(gaps):.1f} ms")
    print(f"request_start before its final p50: {1000 * statistics.median(start_lead):.1f} ms")
    print(f"requests correct: {good} of {len(everything)} requests")
    return 0 if good == len(everything) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests in the burst (default 200)")
    parser.add_argument("--clients", type=int, default=4, help="clients publishing the burst (default 4)")
    parser.add_argument("--images", type=int, default=5, help="images per request (default 5)")
    parser.add_argument("--alone", type=int, default=20, help="requests sent one at a time first (default 20)")
    parser.add_argument("--rate", type=float, default=2000.0, help="images per second produced (default 2000)")
    parser.add_argument("--timeout", type=float, default=40.0, help="seconds the burst may take (default 40)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="std-daq-bench-requests-")
    print(f"load average: {os.getloadavg()[0]:.2f}")
    bench = None
    try:
        bench = Bench(args, workdir)
        alone = bench.alone()
        requests, elapsed = bench.burst()
        return report(bench, alone, requests, elapsed)
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        for service in bench.services if bench is not None else ():
            with open(service.log_path) as f:
                print(f"--- {service.name} log (end) ---\n{f.read()[-3000:]}", file=sys.stderr)
        return 1
    finally:
        try:
            if bench is not None:
                bench.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # sockets, the agent's record, files, logs


if __name__ == "__main__":
    raise SystemExit(main())
