"""`std-daq buffers list|rm`: the project's shared-memory segments in /dev/shm."""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

from core_buffer.config import DEFAULT_NAMESPACE
from core_buffer.ringbuffer import PAGE, SEGMENT_NAME_RE, SHM_DIR, BufferLayout, read_header, unlink


@dataclass(frozen=True)
class SegmentInfo:
    name: str
    size: int
    layout: BufferLayout | None  # None: no std-daq header (being created, or its creator died)
    mode: int
    uid: int


class PrefixError(ValueError):
    """A prefix that would select segments of everybody (the empty one)."""


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
    remove another program's segment; an empty prefix is refused (PrefixError), since with --all it would
    take every std-daq segment on the machine, other users' and other pipelines' included. Processes that
    still have a segment mapped keep their mapping until they exit."""
    if not prefix:
        raise PrefixError("an empty prefix would select every std-daq segment on the machine; give the "
                          f"namespace (default {DEFAULT_NAMESPACE}) or the segment names")
    targets = names or [seg.name for seg in list_segments(prefix)]
    removed, missing = [], []
    for name in targets:
        name = name.lstrip("/")
        if not is_std_daq_name(name, prefix):
            missing.append(name)
        elif unlink(name):
            removed.append(name)
        else:
            missing.append(name)
    return removed, missing
