"""`std-daq buffers list|rm`: the project's shared-memory segments in /dev/shm.

Nothing here removes a segment a live process uses (`segment_users`): removing the name does not free the
memory of a process that maps it, but the next service to start would create a new segment under that name
and the pipeline would be split between the two, each half looking healthy. The check looks at
/proc/*/maps, so it sees the processes this one may look into (all of them as root; another user's
services only as root), and a process that maps the segment between the check and the removal is not seen.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from core_buffer.config import DEFAULT_NAMESPACE
from core_buffer.locks import flock_holders, process_command
from core_buffer.ringbuffer import PAGE, SEGMENT_NAME_RE, SHM_DIR, BufferLayout, read_header, unlink
from core_buffer.ringbuffer import _processes_mapping as processes_mapping  # shared, not re-implemented


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    size: int
    layout: BufferLayout | None  # None: no std-daq header (being created, or its creator died)
    mode: int
    uid: int


class RemovalRefused(ValueError):
    """A removal refused as a whole, removing nothing: an empty prefix (it would select the segments of
    everybody), or segments that live processes use."""




def segment_users(name: str) -> list[int]:
    """Pids of the live processes other than this one that use segment `name`: those that map it, and a
    creator that holds its lock while it initialises the segment (before it maps it). [] when there are
    none, or no such segment."""
    try:
        st = os.stat(os.path.join(SHM_DIR, name))
    except OSError:
        return []
    users = set(processes_mapping(name, st.st_ino))
    users.update(pid for pid in flock_holders(st) or () if pid != os.getpid())  # 0: another pid namespace's
    return sorted(users)


def describe_users(pids: list[int]) -> str:
    """'pid 12 (std_assembler /etc/std-daq/jf.json), pid 0 (...)' for messages."""
    return ", ".join(f"pid {pid} ({process_command(pid) or 'in another pid namespace or gone'})" if pid
                     else "a process in another pid namespace (a container?)" for pid in pids)


def is_std_daq_name(name: str, prefix: str = DEFAULT_NAMESPACE) -> bool:
    """Whether `name` is called like a std-daq segment (<namespace>-<detector>-frames|images) and starts
    with `prefix`: nothing else in /dev/shm (a database's, a browser's) is ever listed or removed."""
    return name.startswith(prefix) and SEGMENT_NAME_RE.match(name) is not None


def list_segments(prefix: str = DEFAULT_NAMESPACE) -> list[SegmentInfo]:
    """std-daq segments whose name starts with `prefix`, sorted by name."""
    found = []
    try:
        names = sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return []
    for name in names:
        if not is_std_daq_name(name, prefix):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                layout = None
                if st.st_size >= PAGE:
                    with mmap.mmap(f.fileno(), PAGE, prot=mmap.PROT_READ) as head:
                        header = read_header(head)
                    layout = header[0] if header else None
        except OSError:
            continue  # removed meanwhile, or not ours to read
        found.append(SegmentInfo(name, st.st_size, layout, st.st_mode & 0o777, st.st_uid))
    return found


def format_segments(segments: list[SegmentInfo]) -> str:
    if not segments:
        return "no std-daq shared-memory segments"
    lines = [f"{'NAME':40} {'SIZE':>10} {'MODE':>5}  LAYOUT"]
    for seg in segments:
        layout = seg.layout.describe() if seg.layout else "no std-daq header (uninitialised)"
        lines.append(f"{seg.name:40} {seg.size / 2**20:8.1f}Mi {seg.mode:>5o}  {layout}")
    return "\n".join(lines)


def remove_segments(names: list[str], prefix: str = DEFAULT_NAMESPACE) -> tuple[list[str], list[str]]:
    """Remove named segments (or all with `prefix` if `names` is empty); returns (removed, missing).

    Only names called like std-daq segments that start with the prefix are touched, so a typo cannot
    remove another program's segment; an empty prefix is refused (RemovalRefused), since with --all it would
    take every std-daq segment on the machine, other users' and other pipelines' included. So is a removal
    that would take a segment a live process uses (RemovalRefused naming the segments and the processes):
    stop the services first."""
    if not prefix:
        raise RemovalRefused("an empty prefix would select every std-daq segment on the machine; give the "
                             f"namespace (default {DEFAULT_NAMESPACE}) or the segment names")
    targets = [name.lstrip("/") for name in names] or [seg.name for seg in list_segments(prefix)]
    in_use = {name: users for name in targets if is_std_daq_name(name, prefix) and (users := segment_users(name))}
    if in_use:
        busy = "; ".join(f"{name} is used by {describe_users(users)}" for name, users in in_use.items())
        hint = "stop those processes first" + ("" if names else ", or name the segments to remove")
        raise RemovalRefused(f"removed nothing: {busy}; {hint}")
    removed, missing = [], []
    for name in targets:
        if not is_std_daq_name(name, prefix):
            missing.append(name)
        elif unlink(name):
            removed.append(name)
        else:
            missing.append(name)
    return removed, missing
