"""std_h5_writer throughput, page cache and memory, against a plain write loop with the same page-cache policy.

std_h5_writer runs as its own process (the console script); the benchmark plays the assembler and
writer_agent: it commits 1 MiB uint16 images into an ImageBuffer ring of RING_SLOTS slots ahead of the
writer (never more than AHEAD images ahead of what the writer reported written, so no image is
overwritten before it was written) and sends start, a write per image and stop over ZMQ; a run is timed
from the start message to the final status. The ceiling is measured in the same run: a plain loop that
writes the same bytes (straight from the same ring slots) to a new file in the same directory with the
same page-cache policy (writer.page_cache: "bounded" through std_h5_writer.page_cache with the same
window, "kernel" plain writes). Rounds alternate raw and writer, and which goes first; each run starts
after a sync; the figures are medians over the rounds, with the spread in brackets.

Prints, one figure per line with its unit:
1. per page-cache mode: writer and raw GB/s, `ratio writer/raw`, the writer's CPU-seconds per GiB, and
   what stays in memory during the write (maxima of samples every SAMPLE_S): the file's own cached pages
   (mincore), Dirty + Writeback of the whole machine (/proc/meminfo: other work shows in it too) and the
   writer's private resident memory (RssAnon; the ImageBuffer pages it reads are shared memory, RssShmem);
2. the disk itself: a raw loop with O_DIRECT (one 1 MiB request in flight, as `dd oflag=direct bs=1M`);
3. the writer's cost per file (a 1-image run), and bitshuffle-LZ4 images/s on Jungfrau-like and random data
   with 1 and 2 compression threads (bounded page cache).

By default each figure comes from runs of RUN_GIB GiB in bounded mode and KERNEL_RUN_GIB in kernel mode
(within a minute here; a kernel-mode run of a few GiB fits in the page cache, which then hides the disk);
--long writes 10 GiB a run in both modes (so the page cache cannot hide the disk; about 4 minutes here,
most of it kernel mode: on this VM a page cache that grows pays a host fault a page, docs/operations.md).
--windows 4,8,16,32 measures bounded mode for each window size (how the default was chosen), --alignment
the raw loop with chunks at page boundaries and off them (how the chunk alignment was chosen). Files are
removed after each run; a run refuses to start without room for two runs' files on the disk.

    flock /tmp/std-daq-heavy.lock .venv/bin/python benchmarks/h5_writer.py [--long] [--windows 4,8,16,32]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import zmq

from core_buffer.config import load_config
from core_buffer.formats import ImageMetadata, StoreOp, StoreStream, WriterState, WriterStatus
from core_buffer.ipc import ipc_file, make_socket, remove_socket_file, store_stream_address, writer_status_address
from core_buffer.ringbuffer import ImageBuffer
from std_h5_writer.h5file import PAGE_CACHE_WINDOW_MIB
from std_h5_writer.page_cache import BoundedPageCache, cached_bytes

SHAPE = (512, 1024)
IMAGE_BYTES = SHAPE[0] * SHAPE[1] * 2
GIB, MIB = 1 << 30, 1 << 20
RING_SLOTS = 1024  # 1 GiB of shared memory
AHEAD = 768  # images committed beyond what the writer reported written: its slot was written long before
STATUS_INTERVAL_S = 0.05  # the writer's statuses, which say how far it is
SAMPLE_S = 0.1
COLD_PAUSE_S = 3.0  # longer than the ~2 s after which memory freed by the guest is handed back to the host
RUN_GIB, KERNEL_RUN_GIB, LONG_RUN_GIB = 2, 1, 10
EIGER_500K_BYTES = 514 * 1030 * 2  # an image that is not a whole number of pages (--alignment)
# Where the raw loop puts its first image: where the writer's first chunk lies, after HDF5's superblock and
# the file's first object headers (16 KiB in a Jungfrau file), so that the ceiling has the writer's
# placement: the page cache's folio sizes follow the write offsets, and its cost with them (--alignment).
RAW_OFFSET = 16 << 10


def jungfrau_like(rng: np.random.Generator) -> np.ndarray:
    pedestal = rng.normal(1500, 20, SHAPE)
    photons = rng.poisson(0.05, SHAPE) * 40
    return np.clip(pedestal + photons + rng.normal(0, 3, SHAPE), 0, 0x3FFF).astype(np.uint16)


def fill(images: ImageBuffer, data: str) -> None:
    """Every slot holds one of 16 distinct images (the pixels stay; commits later change only metadata)."""
    rng = np.random.default_rng(1)
    distinct = [jungfrau_like(rng) if data == "jungfrau-like" else rng.integers(0, 2**16, SHAPE, dtype=np.uint16)
                for _ in range(16)]
    for slot in range(RING_SLOTS):
        images.begin_image(slot)[:IMAGE_BYTES] = distinct[slot % len(distinct)].reshape(-1).view(np.uint8)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def resident_kib(pid: int) -> dict[str, int]:
    """RssAnon, RssFile, RssShmem of a process, in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Rss"):
                name, kib, _ = line.split()
                values[name.rstrip(":")] = int(kib)
    return values


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted",
                                                      "nr_recently_evicted")]


_libc = ctypes.CDLL(None, use_errno=True)
CACHESTAT = 451  # the system call's number on x86_64 and aarch64 (Linux 6.5+)


def file_cached_bytes(fd: int) -> int:
    """The file's bytes in the page cache: cachestat(2), which visits only the cached pages (0.1 ms for a
    10 GiB file here, where mincore over the whole file takes 36 ms), else mincore."""
    stat = _CacheStat()
    if os.uname().machine in ("x86_64", "aarch64") and _libc.syscall(
            CACHESTAT, fd, ctypes.byref(_CacheStatRange(0, 0)), ctypes.byref(stat), 0) == 0:
        return stat.nr_cache * mmap.PAGESIZE
    return cached_bytes(fd)


def dirty_and_writeback_bytes() -> int:
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(("Dirty:", "Writeback:")):
                total += int(line.split()[1]) << 10
    return total


class MemorySampler:
    """Maxima, sampled every SAMPLE_S while a run writes `path`: the file's cached bytes, Dirty + Writeback,
    and the private resident memory (RssAnon) of process `pid`; and, sampled once more when stopped (after
    the final status, before the file is removed), the file's cached bytes the run left."""

    def __init__(self, path: str, pid: int) -> None:
        self.path, self.pid = path, pid
        self.file_cached = self.dirty_writeback = self.rss_anon = self.left_cached = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        fd = -1
        try:
            while True:
                if fd < 0:
                    try:
                        fd = os.open(self.path, os.O_RDONLY)
                    except FileNotFoundError:
                        pass
                stopping = self.stopping.is_set()
                if fd >= 0:
                    cached = file_cached_bytes(fd)
                    self.file_cached = max(self.file_cached, cached)
                    self.left_cached = cached if stopping else 0
                self.dirty_writeback = max(self.dirty_writeback, dirty_and_writeback_bytes())
                self.rss_anon = max(self.rss_anon, resident_kib(self.pid)["RssAnon"] << 10)
                if stopping:
                    return
                self.stopping.wait(SAMPLE_S)
        finally:
            if fd >= 0:
                os.close(fd)

    def stop(self) -> MemorySampler:
        self.stopping.set()
        self.thread.join(timeout=10)
        return self


class Run:
    """One timed run's figures."""

    def __init__(self, seconds: float, cpu: float, nbytes: int, memory: MemorySampler | None = None) -> None:
        self.seconds, self.cpu, self.nbytes, self.memory = seconds, cpu, nbytes, memory

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9


class WriterProcess:
    """A std_h5_writer process for one config, and the sockets writer_agent would hold."""

    def __init__(self, config_path: str, images: ImageBuffer) -> None:
        self.config = load_config(config_path)
        self.images = images
        ctx = zmq.Context.instance()
        self.push = make_socket(ctx, zmq.PUSH, hwm=100000)
        self.push.bind(store_stream_address(self.config))
        self.status = make_socket(ctx, zmq.PULL, hwm=100000)
        self.status.connect(writer_status_address(self.config))
        self.proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "std_h5_writer"),
                                      config_path, "--log-level", "WARNING"], stdout=subprocess.DEVNULL)
        self.run_id = 0
        self.next_id = 0  # image ids go on from run to run: every run's images are new ones

    def write(self, path: str, n: int, sample: bool = False) -> Run:
        """A run of n images to `path`, images committed AHEAD of the writer; the file is removed after."""
        self.run_id += 1
        run_id, first = self.run_id, self.next_id
        self.next_id += n
        cpu0, t0 = cpu_seconds(self.proc.pid), time.perf_counter()
        memory = MemorySampler(path, self.proc.pid) if sample else None
        self.push.send_multipart([StoreStream(StoreOp.START, 0, n, 0, run_id).encode(),
                                  json.dumps({"output_file": path, "n_images": n}).encode()])
        sent = written = 0
        final = None
        while final is None:
            while sent < n and sent < written + AHEAD:
                meta = ImageMetadata(first + sent, *SHAPE, user_1=first + sent)
                self.images.commit_image(meta)
                self.push.send(StoreStream(StoreOp.WRITE, sent, n, 0, run_id, meta).encode())
                sent += 1
                if sent == n:
                    self.push.send(StoreStream(StoreOp.STOP, n, n, 0, run_id).encode())
            if not self.status.poll(60000):
                raise RuntimeError(f"the writer sent no status within 60 s ({written} of {n} written)")
            status = WriterStatus.decode(self.status.recv())
            if status.run_id != run_id:
                continue
            written = status.n_written
            if status.state != WriterState.WRITING:
                final = status
        seconds, cpu = time.perf_counter() - t0, cpu_seconds(self.proc.pid) - cpu0
        if memory is not None:
            memory.stop()
        if final.state != WriterState.FINISHED or final.n_written != n:
            raise RuntimeError(f"writer did not finish cleanly: {final}")
        if final.details.get("page_cache_fallback"):
            raise RuntimeError(f"the writer fell back to kernel mode: {final.details['page_cache_fallback']}")
        nbytes = os.path.getsize(path)
        os.unlink(path)
        return Run(seconds, cpu, nbytes, memory)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.push.close()
        self.status.close()
        remove_socket_file(ipc_file(self.config, "writer_agent"))  # the StoreStream's, bound here


def prepare(mode: str) -> None:
    """The same memory state before every timed run: a sync, and in kernel mode a pause, after which the
    memory the last run's file held has been handed back to the host, so raw and writer runs both pay the
    first touch of their page cache (bounded runs reuse a few windows of pages)."""
    os.sync()
    if mode == "kernel":
        time.sleep(COLD_PAUSE_S)


def raw_write(images: ImageBuffer, path: str, n: int, mode: str, window_bytes: int, image_bytes: int = IMAGE_BYTES,
              stride: int | None = None, offset: int = RAW_OFFSET) -> Run:
    """A plain loop: n images from the ring's slots, one pwrite each at offset + k * stride (stride: the
    image size, packed), with the page-cache policy `mode` ("bounded", "kernel", "direct": O_DIRECT from a
    page-aligned copy of one image, as the disk takes it). The file is removed after."""
    stride = stride or image_bytes
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if mode == "direct" else 0)
    prepare(mode)
    cpu0, t0 = os.times(), time.perf_counter()
    memory = MemorySampler(path, os.getpid())
    fd = os.open(path, flags, 0o644)
    aligned = None
    try:
        cache = BoundedPageCache(fd, window_bytes, path) if mode == "bounded" else None
        if mode == "direct":
            aligned = mmap.mmap(-1, image_bytes)  # O_DIRECT needs page-aligned memory
            aligned.write(images.raw_bytes(0, image_bytes).tobytes())
        try:
            for k in range(n):
                view = aligned if aligned is not None else images.raw_bytes(k % RING_SLOTS, image_bytes)
                at = offset + k * stride
                os.pwrite(fd, view, at)
                if cache is not None:
                    cache.written(at, image_bytes)
            if cache is not None:
                cache.finish()
        finally:
            if cache is not None:
                cache.close()
    finally:
        os.close(fd)
        if aligned is not None:
            aligned.close()
    seconds, cpu1 = time.perf_counter() - t0, os.times()
    memory.stop()
    if cache is not None and cache.fallback:
        raise RuntimeError(f"the raw loop fell back to kernel mode: {cache.fallback}")
    os.unlink(path)
    return Run(seconds, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), n * image_bytes, memory)


class Bench:
    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.name = f"benchw-{os.getpid()}"
        self.images = ImageBuffer.for_config(load_config(self.config("none", 1, "bounded", PAGE_CACHE_WINDOW_MIB)))

    def config(self, compression: str, threads: int, page_cache: str, window_mib: int) -> str:
        path = os.path.join(self.workdir, f"bench-{compression}-{threads}-{page_cache}-{window_mib}.json")
        with open(path, "w") as f:
            json.dump({
                "detector_name": self.name, "detector_type": "jungfrau", "n_modules": 1,
                "bit_depth": 16, "image_pixel_height": SHAPE[0], "image_pixel_width": SHAPE[1],
                "start_udp_port": 50000, "image_buffer_slots": RING_SLOTS, "frame_buffer_slots": 4,
                "output_dirs": [self.workdir], "overwrite_files": True,
                "writer": {"compression": compression, "compression_threads": threads,
                           "status_interval_s": STATUS_INTERVAL_S, "page_cache": page_cache,
                           "page_cache_window_mib": window_mib}}, f)
        return path

    def writer(self, compression: str = "none", threads: int = 1, page_cache: str = "bounded",
               window_mib: int = PAGE_CACHE_WINDOW_MIB) -> WriterProcess:
        writer = WriterProcess(self.config(compression, threads, page_cache, window_mib), self.images)
        # Untimed: connects, loads the code, and reads every slot of the ring once, so that the timed runs
        # do not pay the first touch of the ring's pages in this new process (its page tables: a writer
        # that runs for hours pays it once).
        writer.write(self.path("warm-up.h5"), RING_SLOTS if compression == "none" else 1)
        return writer

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def close(self) -> None:
        self.images.close()
        self.images.unlink()


def median(values: list[float]) -> float:
    return float(np.median(values))


def spread(values: list[float], digits: int = 2) -> str:
    return f"[{min(values):.{digits}f}..{max(values):.{digits}f}]"


def compare(bench: Bench, mode: str, window_mib: int, n: int, rounds: int) -> tuple[list[Run], list[Run], list[Run]]:
    """Alternating rounds of the raw loop and the writer in one page-cache mode, then 9 runs of one image
    (what a file costs whatever its size: creating the layout, closing it, the statuses): (writer runs,
    raw runs, one-image runs)."""
    writer = bench.writer(page_cache=mode, window_mib=window_mib)
    writer_runs, raw_runs = [], []
    try:
        for r in range(rounds):
            for which in (("raw", "writer") if r % 2 == 0 else ("writer", "raw")):
                if which == "raw":
                    raw_runs.append(raw_write(bench.images, bench.path("raw.bin"), n, mode, window_mib * MIB))
                else:
                    prepare(mode)
                    writer_runs.append(writer.write(bench.path("bench.h5"), n, sample=True))
        one_image_runs = [writer.write(bench.path("one.h5"), 1) for _ in range(9)]
    finally:
        writer.close()
    return writer_runs, raw_runs, one_image_runs


def print_mode(mode: str, window_mib: int, writer_runs: list[Run], raw_runs: list[Run], one_image_runs: list[Run],
               headline: bool) -> None:
    ratios = [raw.seconds / w.seconds for w, raw in zip(writer_runs, raw_runs)]
    w_rates, raw_rates = [r.gb_per_s for r in writer_runs], [r.gb_per_s for r in raw_runs]
    label = f"{mode} ({window_mib} MiB windows)" if mode == "bounded" else mode
    print(f"writer {label}: {median(w_rates):.2f} GB/s {spread(w_rates)}")
    print(f"raw loop {label}: {median(raw_rates):.2f} GB/s {spread(raw_rates)}")
    name = "ratio writer/raw" if headline else f"ratio writer/raw {mode}"
    print(f"{name}: {median(ratios):.2f} {spread(ratios)} (median of {len(ratios)} rounds; target 0.95: "
          f"{median(ratios) / 0.95:.2f} of it)")
    cpu = [r.cpu / (r.nbytes / GIB) for r in writer_runs]
    print(f"writer {label} CPU: {median(cpu):.2f} CPU-seconds per GiB {spread(cpu)}")
    raw_cpu = [r.cpu / (r.nbytes / GIB) for r in raw_runs]
    print(f"raw loop {label} CPU: {median(raw_cpu):.2f} CPU-seconds per GiB {spread(raw_cpu)}")
    for who, runs in (("writer", writer_runs), ("raw loop", raw_runs)):
        cached = max(r.memory.file_cached for r in runs)
        windows = f" ({cached / (window_mib * MIB):.1f} windows)" if mode == "bounded" else ""
        print(f"{who} {label} file's cached pages, max: {cached / MIB:.0f} MiB{windows}")
        print(f"{who} {label} Dirty+Writeback of the machine, max: "
              f"{max(r.memory.dirty_writeback for r in runs) / MIB:.0f} MiB")
        print(f"{who} {label} file's cached pages left after the run, max: "
              f"{max(r.memory.left_cached for r in runs) / MIB:.0f} MiB")
    print(f"writer {label} private resident memory (RssAnon), max: "
          f"{max(r.memory.rss_anon for r in writer_runs) / MIB:.0f} MiB")
    one = [r.seconds * 1e3 for r in one_image_runs]
    print(f"writer {label} per-file cost (a 1-image run, start to final status): {median(one):.1f} ms "
          f"{spread(one, 1)}")


def alignment_check(bench: Bench, mode: str, n: int, rounds: int) -> None:
    """The raw loop with images at MiB boundaries, at page boundaries and off them (h5file.CHUNK_ALIGNMENT)."""
    window = PAGE_CACHE_WINDOW_MIB * MIB
    page_stride = -(-EIGER_500K_BYTES // 4096) * 4096
    cases = {
        "1 MiB images at MiB boundaries": {"offset": 0},
        "1 MiB images at page boundaries 16 KiB in": {"offset": RAW_OFFSET},
        "1 MiB images 2 KiB off page boundaries": {"offset": RAW_OFFSET + 2048},
        f"{EIGER_500K_BYTES}-byte images packed": {"image_bytes": EIGER_500K_BYTES},
        f"{EIGER_500K_BYTES}-byte images at page boundaries": {"image_bytes": EIGER_500K_BYTES, "stride": page_stride},
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        for name in (list(cases) if r % 2 == 0 else list(reversed(cases))):
            run = raw_write(bench.images, bench.path("align.bin"), n, mode, window, **cases[name])
            rates[name].append(run.gb_per_s)
            cpu[name].append(run.cpu / (run.nbytes / GIB))
    for name in cases:
        print(f"raw loop {mode}, {name}: {median(rates[name]):.2f} GB/s {spread(rates[name])}, "
              f"{median(cpu[name]):.2f} CPU-seconds per GiB")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help=f"{LONG_RUN_GIB} GiB a run in both modes (~4 minutes)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating writer/raw rounds per mode (default 3)")
    parser.add_argument("--modes", default="bounded,kernel", help="page-cache modes to measure (default both)")
    parser.add_argument("--window-mib", type=int, default=PAGE_CACHE_WINDOW_MIB,
                        help=f"bounded mode's window (default {PAGE_CACHE_WINDOW_MIB}, the writer's default)")
    parser.add_argument("--windows", default="", help="also measure bounded mode with these windows, e.g. 4,8,16,32")
    parser.add_argument("--alignment", action="store_true", help="also the raw loop at and off page boundaries")
    parser.add_argument("--compressed-images", type=int, default=600, help="images per compressed run (0: none)")
    parser.add_argument("--compressed-rounds", type=int, default=1, help="runs per compressed case (default 1)")
    parser.add_argument("--threads", default="1,2", help="compression thread counts to show (default 1,2)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    began = time.monotonic()
    modes = args.modes.split(",")
    run_gib = {"bounded": LONG_RUN_GIB if args.long else RUN_GIB,
               "kernel": LONG_RUN_GIB if args.long else KERNEL_RUN_GIB}
    workdir = tempfile.mkdtemp(prefix="std-daq-bench-h5-", dir=args.dir)
    try:
        free = shutil.disk_usage(workdir).free
        needed = 2 * max(run_gib[m] for m in modes) * GIB + GIB  # a run's file and the next one's, and slack
        print(f"cpu: {cpu_model()}")
        print(f"load average: {os.getloadavg()[0]:.2f}")
        print(f"free space where the files go: {free / GIB:.1f} GiB")
        if free < needed:
            print(f"not run: the files need {needed / GIB:.0f} GiB free in {workdir}", file=sys.stderr)
            return 2
        bench = Bench(workdir)
        try:
            fill(bench.images, "jungfrau-like")
            for mode in modes:
                n = run_gib[mode] * GIB // IMAGE_BYTES
                print(f"run size {mode}: {run_gib[mode]} GiB ({n} images of 1 MiB)")
                print_mode(mode, args.window_mib, *compare(bench, mode, args.window_mib, n, args.rounds),
                           headline=mode == modes[0])
            direct = [raw_write(bench.images, bench.path("direct.bin"), run_gib[modes[0]] * GIB // IMAGE_BYTES,
                                "direct", 0).gb_per_s for _ in range(args.rounds)]
            print(f"raw loop O_DIRECT (the disk, one 1 MiB request in flight): {median(direct):.2f} GB/s "
                  f"{spread(direct)}")
            for window in (int(w) for w in args.windows.split(",") if w):
                n = run_gib["bounded"] * GIB // IMAGE_BYTES
                print_mode("bounded", window, *compare(bench, "bounded", window, n, args.rounds), headline=False)
            if args.alignment:
                for mode in modes:
                    alignment_check(bench, mode, run_gib[mode] * GIB // IMAGE_BYTES, args.rounds)


            n = args.compressed_images
            for data in (("jungfrau-like", "random") if n else ()):
                fill(bench.images, data)
                for threads in (int(t) for t in args.threads.split(",")):
                    writer = bench.writer("bitshuffle-lz4", threads)
                    try:
                        runs = [writer.write(bench.path("bench.h5"), n) for _ in range(args.compressed_rounds)]
                    finally:
                        writer.close()
                    seconds = median([r.seconds for r in runs])
                    cpu = median([r.cpu for r in runs])
                    print(f"writer bitshuffle-lz4 {data} {threads} thread(s): {n / seconds:.0f} images/s")
                    print(f"writer bitshuffle-lz4 {data} {threads} thread(s): {n / cpu:.0f} images per CPU-second")
                print(f"bitshuffle-lz4 {data} compression ratio: {n * IMAGE_BYTES / runs[0].nbytes:.2f}")
        finally:
            bench.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"benchmark duration: {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
