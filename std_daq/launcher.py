"""`std-daq up CONFIG`: run every service of one detector as child processes.

On a detector server these are a std_udp_recv per module, std_assembler, std_stream_send when the config
has a `stream_send` address, writer_agent and std_h5_writer. A replica server's config (one with
`stream_recv.bind`, see `is_replica`) runs std_stream_recv in place of the receivers and the assembler.

The launcher starts the services downstream first (writer, agent, stream sender, assembler, then the
receivers), so nothing upstream produces before its consumer listens; it stops them in the opposite order
(receivers first: stop intake, then let each stage drain), each with SIGTERM and a grace period before
SIGKILL; and it removes the detector's shared-memory segments at the end (never one a live process still
maps: std_daq.buffers.segment_users).

One pipeline per detector per machine (core_buffer.locks): `claim_detector` takes the detector's lock for
the launcher's whole run and refuses, naming the process, when another launcher holds it, when a service of
the detector runs already (its role lock is held: systemd units, a service started by hand) or when a live
process maps the detector's segments (a pipeline of the same detector with another ipc_dir). A refused
launcher has started nothing and removes nothing.

Children run in their own sessions, so a Ctrl-C in the terminal reaches only the launcher, which then
stops them in order; and they get SIGTERM if the launcher itself dies (PR_SET_PDEATHSIG, see
`_DIE_WITH_PARENT`). A child that
exits while the launcher is not stopping is restarted after a backoff that doubles from 1 s up to 30 s
and resets once the child has run for 60 s.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Callable

from core_buffer.config import DetectorConfig
from core_buffer.errors import StdDaqError
from core_buffer.ipc import remove_socket_file
from core_buffer.locks import LockHeld, PidLock, detector_lock, detector_roles, holder_of
from core_buffer.ringbuffer import KINDS, shm_name, unlink
from std_daq.buffers import describe_users, segment_users

log = logging.getLogger(__name__)

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
STOP_GRACE_S = 15.0
STAGE_SETTLE_S = 0.5  # pause between starting one stage and the next upstream one

# Every child starts as this small program, which asks the kernel for SIGTERM when its parent dies and then
# execs the service in place (same pid). Why not `preexec_fn`: it runs Python between fork and exec while
# the launcher's log-reading threads may hold locks (the import lock, malloc's, ctypes' dlopen), and the
# child can deadlock there; the subprocess docs call it unsafe with threads. Why not `setpriv --pdeathsig`:
# util-linux is not in every image. The cost is one interpreter start-up (tens of ms) per (re)start.
# The check of getppid closes the race where the launcher died before prctl took effect.
# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so spawn from a thread that lives
# as long as the launcher (run() spawns from its caller's thread). When the whole launcher is killed, the
# kernel re-parents the child to each remaining launcher thread in turn and signals it every time, so a
# child can get several SIGTERMs in quick succession: a service's handler must be safe to re-enter.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass  # not Linux: the child outlives a launcher that is killed with SIGKILL\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(0)  # the launcher is already gone\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as exc:\n"
    "    sys.exit(f'cannot start {sys.argv[2]}: {exc}')\n"
)


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


def console_script(name: str) -> str:
    """The console script of the environment this launcher runs in (else the one on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"console script {name} not found (is std-daq installed?)")
    return found


@dataclass
class ServiceSpec:
    label: str  # unique name in logs, e.g. udp_recv-0
    argv: list[str]
    stop_rank: int  # lower ranks stop first


@dataclass
class _Child:
    spec: ServiceSpec
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    pump: threading.Thread | None = field(default=None, repr=False)


def is_replica(config: DetectorConfig) -> bool:
    """Whether the config describes a replica server: it receives the images from std_stream_send
    (`stream_recv.bind`) instead of assembling them. std_stream_recv then publishes the ImageMetadata on
    the address std_assembler would use (docs/std_stream.md), so one config never runs both."""
    return bool(config.sections.get("stream_recv", {}).get("bind"))


def pipeline_services(config_path: str, config: DetectorConfig) -> list[ServiceSpec]:
    """The services of a detector's pipeline, with their command lines: receivers and assembler on the
    detector server, std_stream_recv in their place on a replica server (`is_replica`)."""
    if is_replica(config):
        specs = [ServiceSpec("stream_recv", [console_script("std_stream_recv"), config_path], 1)]
    else:
        specs = [ServiceSpec(f"udp_recv-{m}", [console_script("std_udp_recv"), config_path, str(m)], 0)
                 for m in range(config.n_modules)]
        specs.append(ServiceSpec("assembler", [console_script("std_assembler"), config_path], 1))
    stream = config.sections.get("stream_send", {})
    if stream.get("to") or stream.get("live"):  # the addresses come from the config
        specs.append(ServiceSpec("stream_send", [console_script("std_stream_send"), config_path], 2))
    specs.append(ServiceSpec("writer_agent", [console_script("writer_agent"), config_path], 3))
    specs.append(ServiceSpec("h5_writer", [console_script("std_h5_writer"), config_path], 4))
    if config.sections.get("web"):  # a non-empty `web` section: std_web, stopped first (it only watches)
        specs.append(ServiceSpec("web", [console_script("std_web"), config_path], -1))
    return specs


class Launcher:
    """Starts, watches, restarts and stops a set of services."""

    def __init__(self, specs: list[ServiceSpec], output: IO[str] | None = None,
                 cleanup: Callable[[], None] | None = None) -> None:
        self.children = [_Child(spec, backoff_s=BACKOFF_START_S) for spec in specs]
        self.output = output if output is not None else sys.stdout
        self.cleanup = cleanup
        self._output_lock = threading.Lock()
        self.stopping = threading.Event()

    def say(self, text: str) -> None:
        with self._output_lock:
            print(f"[std-daq up] {text}", file=self.output, flush=True)

    def _pump(self, label: str, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self._output_lock:
                print(f"[{label}] {line}", file=self.output, flush=True)
        stream.close()

    def _spawn(self, child: _Child) -> None:
        # start_new_session: setsid() in the child, done by the C fork/exec code, not by Python.
        child.process = subprocess.Popen(_with_parent_death_signal(child.spec.argv), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        child.started_at = time.monotonic()
        child.restart_at = None
        child.pump = threading.Thread(target=self._pump, args=(child.spec.label, child.process.stdout),
                                      daemon=True)
        child.pump.start()

    def start(self) -> None:
        ranks = sorted({c.spec.stop_rank for c in self.children}, reverse=True)
        for i, rank in enumerate(ranks):
            if i:
                time.sleep(STAGE_SETTLE_S)  # let the stage downstream bind its sockets first
            for child in self.children:
                if child.spec.stop_rank == rank:
                    self._spawn(child)
                    self.say(f"started {child.spec.label} (pid {child.process.pid})")

    def watch_once(self) -> None:
        """Restart children that died; call periodically while running."""
        now = time.monotonic()
        for child in self.children:
            if self.stopping.is_set():
                return
            proc = child.process
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    self._spawn(child)
                    self.say(f"restarted {child.spec.label} (pid {child.process.pid}, restart "
                             f"{child.restarts})")
                continue
            if proc is None or proc.poll() is None:
                if proc is not None and now - child.started_at > STABLE_AFTER_S:
                    child.backoff_s = BACKOFF_START_S
                continue
            if child.pump is not None:
                child.pump.join(timeout=1)
            self.say(f"{child.spec.label} exited with code {proc.returncode}; restarting in "
                     f"{child.backoff_s:.1f} s")
            child.restart_at = now + child.backoff_s
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)

    def stop(self) -> None:
        """Stop every child, receivers first, then remove the shared memory."""
        self.stopping.set()
        for rank in sorted({c.spec.stop_rank for c in self.children}):
            group = [c for c in self.children if c.spec.stop_rank == rank and c.process is not None
                     and c.process.poll() is None]
            for child in group:
                child.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            for child in group:
                try:
                    child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.say(f"{child.spec.label} did not stop within {STOP_GRACE_S:.1f} s; killing it")
                    child.process.kill()
                    child.process.wait()
                self.say(f"stopped {child.spec.label} (exit code {child.process.returncode})")
        for child in self.children:
            if child.pump is not None:
                child.pump.join(timeout=2)
        if self.cleanup is not None:
            self.cleanup()

    def run(self, stop: threading.Event, poll_s: float = 0.2) -> int:
        self.start()
        try:
            while not stop.wait(poll_s):
                self.watch_once()
        finally:
            self.stop()
        return 0


class PipelineRunning(StdDaqError):
    """The detector's pipeline (or a part of it) runs already on this machine; the message names who."""


def claim_detector(config: DetectorConfig) -> PidLock:
    """The detector's lock, held, once nothing of the detector's pipeline runs; else PipelineRunning
    naming the process in the way. Starts nothing and removes nothing either way."""
    lock = detector_lock(config)
    try:
        lock.acquire()
    except LockHeld as exc:
        raise PipelineRunning(f"{exc}; one pipeline per detector on a machine: stop that one first") from None
    try:
        running = [(role, holder) for role in detector_roles(config)
                   if (holder := holder_of(role.lock_path(config))) is not None]
        if running:
            who = "; ".join(f"{role.name} by {holder.describe()}" for role, holder in running)
            raise PipelineRunning(f"services of detector {config.detector_name} run already, without a "
                                  f"launcher (systemd units, or started by hand): {who}; stop them first")
        in_use = {name: segment_users(name) for name in (shm_name(config, kind) for kind in KINDS)}
        in_use = {name: users for name, users in in_use.items() if users}
        if in_use:
            who = "; ".join(f"{name} by {describe_users(users)}" for name, users in in_use.items())
            raise PipelineRunning(f"the shared memory of detector {config.detector_name} is in use: {who} (a "
                                  "pipeline of this detector with another ipc_dir?); stop it first")
    except BaseException:
        lock.release()
        raise
    return lock


def remove_stale_sockets(config: DetectorConfig) -> list[str]:
    """Remove the detector's ipc socket files of roles nobody holds (left by a service that was killed);
    returns the paths removed. A service removes its own when it stops; this is for those that could not."""
    removed = []
    for role in detector_roles(config):
        if holder_of(role.lock_path(config)) is None:
            removed += [path for path in role.socket_files(config) if remove_socket_file(path)]
    return removed


@dataclass(frozen=True)
class BufferRemoval:
    removed: list[str]
    in_use: dict[str, list[int]]  # segments left because live processes use them, with their pids

    def describe(self) -> str:
        text = f"removed shared memory: {', '.join(self.removed) or 'none left'}"
        for name, users in self.in_use.items():
            text += f"; left {name}: in use by {describe_users(users)}"
        return text


def remove_buffers(config: DetectorConfig) -> BufferRemoval:
    """Remove the detector's segments that no live process uses."""
    removed, in_use = [], {}
    for name in (shm_name(config, kind) for kind in KINDS):
        users = segment_users(name)
        if users:
            in_use[name] = users
        elif unlink(name):
            removed.append(name)
    return BufferRemoval(removed, in_use)


def output_warnings(config: DetectorConfig) -> list[str]:
    """What the operator must know at start about where files can be written: with no `output_dirs` every
    write is refused (the first write would be the first to say so), and a directory that does not exist
    refuses the writes into it."""
    if not config.output_dirs:
        return [f"no output_dirs in {config.source or 'the config'}: every write will be refused; set config "
                'key output_dirs, e.g. "output_dirs": ["/data/' + config.detector_name + '"]']
    return [f"output_dirs entry {path} is not an existing directory: writes into it will be refused until it is"
            for path in config.output_dirs if not os.path.isdir(path)]


def run_up(config_path: str, config: DetectorConfig) -> int:
    try:
        lock = claim_detector(config)
    except PipelineRunning as exc:
        print(f"std-daq up: not starting: {exc}. Nothing was started or removed.", file=sys.stderr)
        return 1
    try:
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        launcher = Launcher(pipeline_services(os.path.abspath(config_path), config))
        stale = remove_stale_sockets(config)
        if stale:
            launcher.say(f"removed ipc socket files left by services that were killed: {', '.join(stale)}")

        def cleanup() -> None:
            launcher.say(remove_buffers(config).describe())
            remove_stale_sockets(config)  # those of services killed at the end of the grace period

        launcher.cleanup = cleanup
        where = (f" (replica server: images from std_stream_send on {config.sections['stream_recv']['bind']})"
                 if is_replica(config) else "")
        launcher.say(f"detector {config.detector_name}{where}: {len(launcher.children)} services; Ctrl-C stops "
                     "them")
        for warning in output_warnings(config):
            launcher.say(f"WARNING: {warning}")
        return launcher.run(stop)
    finally:
        lock.release()
