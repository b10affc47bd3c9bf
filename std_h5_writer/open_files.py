"""The record of the file std_h5_writer has open, so that the next writer of the detector marks it
interrupted when this one dies without closing it (kill -9, the OOM killer, a crash inside HDF5).

Where: a private directory `<ipc_dir>/<namespace>-<det>-std_h5_writer/`, next to the ipc sockets as
writer_agent's record is: mode 0700 and the writer's own (one that belongs to another user, lets others
in, or is a symbolic link is refused: whoever can put a record there can have the writer modify a file).
The writer holds an exclusive flock on it for its lifetime. That is how a starting writer knows the
files recorded there are not being written: their writer is gone (the kernel drops a killed process's
locks). A second writer of the same detector therefore refuses to start, instead of marking the first
one's open file; two would split every run's images between them anyway (PUSH/PULL round robin).

One record a file, `<pid>-<n>.open.json`: the output path, run id, the request (JSON) and the writer's
pid. Written right before the file is created (to a temporary name, then renamed, so a kill never
leaves half a record), removed once the file is closed: two small file operations per file, nothing
per image. Written before the create, not after, so a kill while the file is being made is covered
too; what ties the record to the file is the file's own `request` attribute (h5file.mark_interrupted),
not its inode, so a file that was never created or was replaced since is left alone.

At start, every record left behind names a file a dead writer had open: the record is renamed
`<pid>-<n>.marking.json`, the file marked (h5file.mark_interrupted), and the record removed. A
`.marking.json` found at start means a writer died while marking that file (HDF5 crashed or hung on
it): it is reported and not tried again, so one broken file cannot keep the writer from starting.

The records survive the writer's process, not the machine: in an ipc_dir on tmpfs (/tmp, /run) a
reboot loses them, and files left open by a host crash keep `state` "writing" (docs/std_h5_writer.md).
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
from dataclasses import dataclass
from typing import Iterable

from core_buffer.config import DetectorConfig
from core_buffer.errors import StdDaqError
from core_buffer.ipc import ipc_file
from std_h5_writer.h5file import Interrupted, local_time, mark_interrupted

log = logging.getLogger("std_h5_writer")

RECORD_SUFFIX = ".open.json"
MARKING_SUFFIX = ".marking.json"
TMP_SUFFIX = ".tmp"
RECORD_MAX_BYTES = 16 << 20  # a record holds the request; anything bigger is not one of ours
LOCK_ATTEMPTS = 10  # the directory removed under us by a writer that was just closing (see _lock)


class WriterRunningError(StdDaqError):
    """Another std_h5_writer of the same detector holds the record directory."""


@dataclass(frozen=True)
class Recovery:
    """A file a dead writer had open, and what became of it."""

    output_file: str
    run_id: int
    request: dict
    pid: int  # the dead writer's
    marked: Interrupted | None  # None: not marked, `error` says why
    error: str | None = None


def record_directory(config: DetectorConfig) -> str:
    return ipc_file(config, "std_h5_writer")


class OpenFileRecords:
    """The record directory of one detector's writer, locked for the life of this object (close)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.dir_fd: int | None = _lock(directory)
        self.n_records = 0

    @classmethod
    def for_config(cls, config: DetectorConfig) -> OpenFileRecords:
        return cls(record_directory(config))

    # --- while writing ----------------------------------------------------------------------------------

    def note(self, output_file: str, run_id: int, request: dict) -> str | None:
        """Record that `output_file` is about to be created for `run_id`: the record's name, to forget()
        once the file is closed. A record that cannot be written is logged and the write goes on (a crash
        during it would then leave the file "writing")."""
        self.n_records += 1
        name = f"{os.getpid()}-{self.n_records}{RECORD_SUFFIX}"
        body = json.dumps({"output_file": output_file, "run_id": run_id, "request": request, "pid": os.getpid(),
                           "created": local_time()}).encode()
        tmp = f".{name}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self.dir_fd)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except OSError as exc:
            log.warning("cannot record that %s is open in %s (%s); if this writer dies while writing it, "
                        "nothing will mark it interrupted", output_file, self.directory, exc)
            return None
        return name

    def forget(self, name: str | None) -> None:
        """The file of record `name` is closed (cleanly, or as far as HDF5 could)."""
        if name is None:
            return
        try:
            os.unlink(name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the record %s/%s (%s): the next start will find the file closed and "
                        "leave it as it is", self.directory, name, exc)

    # --- at start ---------------------------------------------------------------------------------------

    def recover(self, output_dirs: Iterable[str]) -> list[Recovery]:
        """Mark interrupted every file a dead writer left open (records left behind), log each, and
        return what became of them. Never raises for a file or a record: what cannot be done is logged
        (naming the path) and returned with its reason."""
        output_dirs = tuple(output_dirs)
        recoveries = []
        for name in sorted(os.listdir(self.dir_fd)):
            if name.endswith(TMP_SUFFIX):  # a record cut off while it was written: its file was not made yet
                self.forget(name)
            elif name.endswith(MARKING_SUFFIX):
                recovery = self._read(name, "marking")
                self.forget(name)
                if recovery is not None:
                    error = (f"a previous std_h5_writer died while marking {recovery.output_file} interrupted "
                             "(HDF5 crashed or hung on it?); not tried again")
                    log.error("%s (left open by std_h5_writer pid %d, run %d); check it with h5dump or h5clear",
                              error, recovery.pid, recovery.run_id)
                    recoveries.append(_failed(recovery, error))
            elif name.endswith(RECORD_SUFFIX):
                recovery = self._read(name, "record")
                if recovery is None:
                    self.forget(name)
                    continue
                marking = name[:-len(RECORD_SUFFIX)] + MARKING_SUFFIX
                try:
                    os.rename(name, marking, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
                except OSError as exc:
                    log.error("cannot rename %s/%s (%s); marking its file anyway", self.directory, name, exc)
                    marking = name
                recoveries.append(self._mark(recovery, output_dirs))
                self.forget(marking)
            else:
                log.warning("%s/%s is not a record of std_h5_writer; left as it is", self.directory, name)
        return recoveries

    def _read(self, name: str, kind: str) -> Recovery | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.dir_fd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_size > RECORD_MAX_BYTES:
                    raise ValueError("not a record file")
                data = b""
                while chunk := os.read(fd, RECORD_MAX_BYTES + 1 - len(data)):
                    data += chunk
            finally:
                os.close(fd)
            record = json.loads(data)
            request = record["request"]
            if not isinstance(request, dict):
                raise ValueError("its request is not a JSON object")
            return Recovery(str(record["output_file"]), int(record["run_id"]), request, int(record["pid"]), None)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("ignoring the unreadable %s %s/%s (%s): if a writer died with a file open, that file "
                      "still says state 'writing'", kind, self.directory, name, exc)
            return None

    def _mark(self, recovery: Recovery, output_dirs: tuple[str, ...]) -> Recovery:
        path = recovery.output_file
        note = (f"std_h5_writer (pid {recovery.pid}) died with the file open (killed or crashed); the rows "
                f"after its last flush are lost; marked by std_h5_writer pid {os.getpid()} at its start, "
                f"{local_time()}")
        try:
            marked = mark_interrupted(path, output_dirs, recovery.request, note)
        except FileNotFoundError:
            error = f"{path} no longer exists (or was never created)"
            log.warning("std_h5_writer pid %d died writing run %d: %s", recovery.pid, recovery.run_id, error)
            return _failed(recovery, error)
        except Exception as exc:  # noqa: BLE001 - a broken file is reported, never the end of the writer
            error = f"{path} cannot be marked interrupted: {exc}"
            log.error("std_h5_writer pid %d died writing run %d, and %s", recovery.pid, recovery.run_id, error)
            return _failed(recovery, error)
        log.warning("std_h5_writer pid %d died writing run %d to %s: %s interrupted, %d images readable "
                    "(%d rows: %d written, %d lost, %d rejected)", recovery.pid, recovery.run_id, path,
                    "it was marked" if marked.already_marked else "marked it", marked.n_written, marked.n_rows,
                    marked.n_written, marked.n_lost, marked.n_rejected)
        return Recovery(path, recovery.run_id, recovery.request, recovery.pid, marked)

    # --- the end ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the lock; the directory goes too if no record is left in it."""
        if self.dir_fd is None:
            return
        try:
            if not os.listdir(self.dir_fd):
                os.rmdir(self.directory)  # under the lock: see _lock for a writer starting meanwhile
        except OSError:
            pass
        os.close(self.dir_fd)
        self.dir_fd = None


def _failed(recovery: Recovery, error: str) -> Recovery:
    return Recovery(recovery.output_file, recovery.run_id, recovery.request, recovery.pid, None, error)


def _lock(directory: str) -> int:
    """A descriptor of `directory` (made 0700 if missing) holding an exclusive flock on it.

    A writer that closes removes an empty directory while it holds the lock; one starting meanwhile may
    have opened it already and get the lock once it is gone: it then finds the path no longer leads to
    what it locked, and starts over."""
    for _ in range(LOCK_ATTEMPTS):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StdDaqError(f"{directory} is not a directory (a symbolic link?); std_h5_writer keeps the "
                                  "record of its open file there and refuses it") from None
            raise
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise StdDaqError(f"{directory} belongs to uid {st.st_uid}, not to this writer's uid "
                                  f"{os.geteuid()}; remove it (or set ipc_dir to a private directory)")
            if st.st_mode & 0o077:
                raise StdDaqError(f"{directory} has mode {stat.S_IMODE(st.st_mode):o}: others may put records "
                                  "in it; make it 0700 (or remove it)")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WriterRunningError(f"another std_h5_writer of this detector is running (it holds "
                                         f"{directory}); two would split every run's images") from None
            try:
                now = os.stat(directory, follow_symlinks=False)
                same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise StdDaqError(f"could not lock {directory}: it was removed and made again {LOCK_ATTEMPTS} times meanwhile")
