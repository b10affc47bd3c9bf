"""Module synchronisation: which image ids are ready, and with which modules (pure logic, no I/O).

Frames arrive per module, in each module's own order. An image is *complete* when every module has
delivered the frame of its id. It is *incomplete* (released without the missing modules) when each
missing module has since delivered a newer id (it moved past), or when the image has waited
`timeout_s` since its first frame, or when more than `max_pending` images wait (the oldest goes first:
its frames are about to be overwritten in the FrameBuffer). A silent module therefore delays images by
at most the timeout and never stops the pipeline.

A frame for an id that was already released is late: counted and dropped. A module whose ids jump
back (a restarted detector) is followed: the released ids at or above its new id are forgotten and
every module's last id is reset (they belong to the previous run), so the new, lower ids start new
images; images of the old run still waiting leave by the timeout.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

from core_buffer.formats import ModuleFrame

RELEASED_MEMORY = 4096  # released ids remembered to recognise late frames


@dataclass
class PendingImage:
    image_id: int
    first_seen: float
    frames: dict[int, ModuleFrame] = field(default_factory=dict)


@dataclass
class ReadyImage:
    image_id: int
    frames: dict[int, ModuleFrame]  # module -> frame, only the modules that delivered
    missing: list[int]  # modules without a frame
    reason: str  # "complete", "moved_past", "timeout", "overflow"


class Synchronizer:
    def __init__(self, n_modules: int, timeout_s: float, max_pending: int) -> None:
        self.n_modules = n_modules
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.pending: dict[int, PendingImage] = {}
        self.last_id: list[int | None] = [None] * n_modules
        self._released: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.late_frames = 0
        self.id_jumps_back = 0

    def add(self, frame: ModuleFrame, now: float) -> list[ReadyImage]:
        """Take one module frame; returns the images it made ready, oldest first."""
        m, image_id = frame.module_id, frame.id
        last = self.last_id[m]
        if last is not None and image_id < last:
            # A restarted detector: ids from here on belong to a new run. The other modules' last ids
            # are of the old run, so they must not count as "moved past" the new ids.
            self.id_jumps_back += 1
            for old in [i for i in self._released if i >= image_id]:
                del self._released[old]
            self.last_id = [None] * self.n_modules
        elif image_id in self._released:
            self.late_frames += 1
            return []
        self.last_id[m] = image_id
        pending = self.pending.get(image_id)
        if pending is None:
            pending = self.pending[image_id] = PendingImage(image_id, now)
        pending.frames[m] = frame
        return self._release_stale(now)

    def expire(self, now: float) -> list[ReadyImage]:
        """Images released by the timeout alone (call when no frame arrives)."""
        return self._release_stale(now)

    def _moved_past(self, pending: PendingImage) -> bool:
        for m in range(self.n_modules):
            if m in pending.frames:
                continue
            last = self.last_id[m]
            if last is None or last <= pending.image_id:
                return False
        return True

    def _release_stale(self, now: float) -> list[ReadyImage]:
        out = []
        for image_id in sorted(self.pending):  # oldest first, so images leave in id order where possible
            pending = self.pending[image_id]
            if len(pending.frames) == self.n_modules:
                out.append(self._release(pending, "complete"))
            elif self._moved_past(pending):
                out.append(self._release(pending, "moved_past"))
            elif now - pending.first_seen >= self.timeout_s:
                out.append(self._release(pending, "timeout"))
        while len(self.pending) > self.max_pending:
            out.append(self._release(self.pending[min(self.pending)], "overflow"))
        return out

    def _release(self, pending: PendingImage, reason: str) -> ReadyImage:
        del self.pending[pending.image_id]
        self._released[pending.image_id] = None
        if len(self._released) > RELEASED_MEMORY:
            self._released.popitem(last=False)
        missing = [m for m in range(self.n_modules) if m not in pending.frames]
        return ReadyImage(pending.image_id, pending.frames, missing, reason)
