"""One pipeline per detector per machine: flock'ed lock files in the config's ipc_dir.

Why: a ZMQ ipc bind onto a socket path that exists replaces the file, silently taking the address from
the process that bound it first, and a second copy of a service writes into the same shared-memory
segments. So a second copy of a service breaks the running one before anything could notice. The locks
are taken before any of that happens.

Two kinds of lock, both files in ipc_dir, where the sockets they guard live:

- the detector lock, `<ns>-<det>.lock`, held by `std-daq up` and `std-daq demo` for their whole run: a
  second launcher of the same detector is refused before it starts anything or removes anything;
- a role lock per service role, `<ns>-<det>-<role>.lock`, held by every daemon (core_buffer.service.run_daemon)
  from before it creates or attaches a segment or binds a socket until after it has removed the socket
  files it bound. Roles are what a second copy would fight over: one per receiver (`udp_recv-<module>`), one
  for whoever fills the ImageBuffer and publishes on the assembler's address (`image_producer`: std_assembler,
  or std_stream_recv on a replica server), `stream_send`, `writer_agent`, `h5_writer`. Under systemd, where
  each service is a unit of its own and no launcher runs, the role locks are what protects the pipeline.

Why flock: the kernel drops it when its holder dies, however it dies (kill -9, the OOM killer), so there is
never a stale lock to clean up and no pid to check against reuse. The holder writes its pid and command line
into the file, so that a refusal can name it; the kernel's own record of who holds it (/proc/locks) is
preferred when it names a process this one can see.

A holder removes its lock file when it lets go, while it still holds the lock. An acquirer may have opened
the file just before: after it gets the lock it checks that the path still leads to the file it locked,
and starts over if not (as std_h5_writer's record directory does, std_h5_writer/open_files.py).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass

from core_buffer.config import DetectorConfig
from core_buffer.errors import StdDaqError
from core_buffer.ipc import ipc_file, socket_files_bound_by

LOCK_SUFFIX = ".lock"
LOCK_ATTEMPTS = 10  # the file removed under us by a holder that was just letting go: start over
HOLDER_INFO_MAX_BYTES = 64 << 10
LOCK_FILE_MODE = 0o644  # readable by all: a refused process of another user can still say who holds it


class LockHeld(StdDaqError):
    """Another process holds the lock; the message names it."""

    def __init__(self, what: str, path: str, holder: Holder | None) -> None:
        self.path = path
        self.holder = holder
        who = holder.describe() if holder is not None else "a process this one cannot identify"
        super().__init__(f"{what} is held by {who} (lock {path})")


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: the pid as this process sees it (None: a process in another pid namespace, a
    container, whose pid only the lock file tells) and its command line."""

    pid: int | None
    command: str
    recorded_pid: int | None = None  # the pid the holder wrote into the file (its own namespace's)

    def describe(self) -> str:
        if self.pid is not None:
            return f"pid {self.pid} ({self.command or 'command line unknown'})"
        if self.recorded_pid is not None:
            return (f"pid {self.recorded_pid} in another pid namespace, a container? "
                    f"({self.command or 'command line unknown'})")
        return "a process in another pid namespace (a container?)"


@dataclass(frozen=True)
class Role:
    """A service's place in a detector's pipeline, which one process at a time may hold."""

    name: str  # part of the lock file's name: udp_recv-0, image_producer, ...
    service: str  # the service that holds it (for its socket files)
    module_id: int | None = None

    def lock_path(self, config: DetectorConfig) -> str:
        return ipc_file(config, self.name + LOCK_SUFFIX)

    def socket_files(self, config: DetectorConfig) -> list[str]:
        return socket_files_bound_by(config, self.service, self.module_id)


# The roles of the services with one instance per detector. std_stream_recv takes std_assembler's role: it
# fills the same ImageBuffer and publishes on the same address, so a config never runs both (launcher).
_ROLE_NAMES = {"std_assembler": "image_producer", "std_stream_recv": "image_producer",
               "std_stream_send": "stream_send", "writer_agent": "writer_agent", "std_h5_writer": "h5_writer",
               "std_web": "web"}


def service_role(service: str, module_id: int | None = None) -> Role:
    """The role of `service` (std_udp_recv's by its module id); a service std-daq does not know holds a
    role of its own name."""
    if service == "std_udp_recv":
        return Role("udp_recv" if module_id is None else f"udp_recv-{module_id}", service, module_id)
    return Role(_ROLE_NAMES.get(service, service), service)


def detector_lock_path(config: DetectorConfig) -> str:
    return os.path.join(config.ipc_dir, f"{config.namespace}-{config.detector_name}{LOCK_SUFFIX}")


class PidLock:
    """An exclusive flock on a file that names its holder; `acquire` raises LockHeld, never waits."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what  # for messages: "detector JF01", "role image_producer of detector JF01"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> PidLock:
        if self._fd is not None:
            return self
        for _ in range(LOCK_ATTEMPTS):
            fd = _open_lock_file(self.path)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise LockHeld(self.what, self.path, holder_of(self.path)) from None
                if _same_file(fd, self.path):
                    _record_holder(fd)
                    self._fd = fd
                    return self
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the file was removed (or replaced) between our open and our lock
        raise StdDaqError(f"could not lock {self.path}: it was removed and made again {LOCK_ATTEMPTS} times "
                          "meanwhile")

    def release(self) -> None:
        """Remove the lock file (still holding the lock, so nobody takes the removed one for free) and let
        go. A file this process may not remove (another user's, in a sticky ipc_dir) stays; it is free."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _same_file(fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> PidLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def detector_lock(config: DetectorConfig) -> PidLock:
    return PidLock(detector_lock_path(config), f"detector {config.detector_name}")


def role_lock(config: DetectorConfig, role: Role) -> PidLock:
    return PidLock(role.lock_path(config), f"the {role.name} role of detector {config.detector_name}")


def holder_of(path: str) -> Holder | None:
    """Who holds the lock at `path` right now; None when nobody does (or there is no such file).

    Looks, never locks: /proc/locks lists every flock of the machine, so this cannot make a process that is
    acquiring the lock at this moment fail."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    pids = flock_holders(st)
    if pids is None:  # no /proc/locks: ask the lock itself
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pids = [0]
        else:
            return None
        finally:
            os.close(fd)  # drops a lock it took
    if not pids:
        return None
    recorded_pid, recorded_command = _read_holder_record(path)
    visible = [pid for pid in pids if pid > 0]
    if visible:
        pid = visible[0]
        command = process_command(pid) or (recorded_command if recorded_pid == pid else "")
        return Holder(pid, command, recorded_pid)
    return Holder(None, recorded_command, recorded_pid)


def flock_holders(st: os.stat_result) -> list[int] | None:
    """Pids holding a flock on the file of `st` (0 for a process in another pid namespace), from
    /proc/locks; None when /proc/locks cannot be read."""
    # A line: "1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF"; a waiter's line has "->" in field 1.
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            lines = locks.readlines()
    except OSError:
        return None
    pids = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            try:
                pids.append(max(int(fields[4]), 0))
            except ValueError:
                continue
    return pids


def process_command(pid: int) -> str:
    """The command line of a live process on one line (control characters escaped), '' when it is gone or
    not ours to read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    text = " ".join(part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0"))
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _open_lock_file(path: str) -> int:
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, LOCK_FILE_MODE)
    except PermissionError:
        # Another user's lock file (a sticky /tmp with fs.protected_regular refuses O_CREAT on it): flock
        # works on a descriptor opened for reading, only the holder record cannot be written.
        try:
            return os.open(path, os.O_RDONLY | flags)
        except OSError as exc:
            raise StdDaqError(f"cannot open the lock file {path}: {exc.strerror}; remove it if no std-daq "
                              "process of this detector runs, or set ipc_dir to a directory of its own") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StdDaqError(f"the lock file {path} is a symbolic link; refusing it (remove it)") from None
        raise StdDaqError(f"cannot open the lock file {path}: {exc.strerror} (is ipc_dir {os.path.dirname(path)} "
                          "an existing, writable directory?)") from None


def _same_file(fd: int, path: str) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _record_holder(fd: int) -> None:
    """Write this process's pid and command line into the lock file it holds (best effort: a descriptor
    opened read-only cannot, and the kernel's /proc/locks still names the holder)."""
    record = json.dumps({"pid": os.getpid(), "command": process_command(os.getpid()),
                         "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode() + b"\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except OSError:
        pass


def _read_holder_record(path: str) -> tuple[int | None, str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None, ""
    try:
        record = json.loads(os.read(fd, HOLDER_INFO_MAX_BYTES) or b"{}")
        pid = record.get("pid")
        return (pid if isinstance(pid, int) else None), str(record.get("command", ""))
    except (OSError, ValueError, AttributeError):
        return None, ""  # being written right now, or not one of ours
    finally:
        os.close(fd)


def detector_roles(config: DetectorConfig) -> list[Role]:
    """Every role of a detector's pipeline, a replica server's included (its std_stream_recv holds the
    image_producer role)."""
    roles = [service_role("std_udp_recv", m) for m in range(config.n_modules)]
    return roles + [service_role(s) for s in ("std_assembler", "std_stream_send", "writer_agent", "std_h5_writer",
                                              "std_web")]
