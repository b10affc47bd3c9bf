"""Module synchronisation: which image ids are ready, and with which modules (pure logic, no I/O).

Frames arrive per module, in each module's own order. An image is *complete* when every module has
delivered the frame of its id. It is *incomplete* (released without the missing modules) when each
missing module has since delivered a newer id (it moved past), or when the image has waited
`timeout_s` since its first frame, or when its id is `restart_jump` (the FrameBuffer's depth) or more
behind the newest id of the run (the FrameBuffer slot of its id has been reused: its frames are being
overwritten), or when more than `max_pending` images wait (the oldest goes first). A silent module
therefore delays images by at most the timeout and never stops the pipeline.

Images leave in rising id order within a run, whatever releases them: before an image is released,
every image with a smaller id still waiting is released (incomplete, reason "in_order"), and a frame that
would open a new image just below the last released id (within `restart_jump`) is late. Ids go down only
at a detector restart, or after a far-future id (a glitch) was released.

The last two rules are applied by `release_overdue`, which the caller runs after each *read round* (a
few frames from every module's stream), never in the middle of one: a backlog read one module ahead of
the others must not look like the others falling behind.

Every gap in a module's ids (an id more than one above its last) is counted: `id_gaps` once per gap,
`skipped_ids` the ids it skipped. A gap of one module makes those images incomplete; a gap of the whole
detector (every module skipped the same ids) is counted once per module and costs no image.

An id is published at most once per run: a frame for an id that was already released is *late*,
counted and dropped. The highest RELEASED_MEMORY released ids are remembered exactly, and an id at or
below the highest one forgotten is late too, so a very late frame cannot reopen an old image.

Ids going backwards. A frame at or below its module's last id is a *restart* of the module when its
receiver says so: its `acquisition` token differs from the module's previous frame's (the receiver
changes it when its ids start again, after an idle gap or a confirmed restart). That is how acquisitions
of any length that number their frames from 1 each time are followed, down to one frame each. Without a
new token such a frame is, by default, a duplicate or a reordered frame: late, counted, dropped, and the
module's last id stays. It is then a restart only when the jump back is larger than `restart_jump` (the
FrameBuffer's depth: a frame that far back could not be read any more anyway) or when
RESTART_AFTER_BACKWARD consecutive frames, with rising ids, are all behind the last id (a restart with a
small jump, from receivers that did not see it). A new token with a rising id is no restart (a receiver
restarted, or an idle gap within one acquisition): the module just carries on. A restarted module leaves the current run: images
still waiting stop waiting for it, and its frames are held as the next run. When every module that is
alive (sent a frame within the timeout) has restarted, the detector restarted: the images of the old
run still waiting are released, the released-id memory is cleared, and the held frames become the new
run. If the other modules do not follow within the timeout, it was one module out of step (a
power-cycled module, a glitched id): its held frames go back into the current run, where those whose
ids were released already are late, and until one of its frames is accepted again the module counts as
having moved past every image, so the others are not held back by it.

A restarted module may start yet another acquisition before the others have followed it into the first
(its stream read ahead of theirs). Those frames are *parked*, in order, and taken again once the detector
switched to the run before them (or the restart was not followed): the held run never mixes two
acquisitions' frames of the same id.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from core_buffer.formats import ModuleFrame

RELEASED_MEMORY = 4096  # released ids remembered exactly; lower ones through a floor
RESTART_AFTER_BACKWARD = 3  # consecutive backward frames (rising among themselves) that make a restart


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
    reason: str  # "complete", "moved_past", "timeout", "overwritten", "overflow", "restart"


class ReleasedIds:
    """The ids released in a run: the highest `capacity` of them exactly (a set and a min-heap), lower
    ones through a floor (the highest id forgotten so far; every id at or below it counts as released).
    The smallest id is forgotten first, so one far-future id (a glitch) stays remembered and never
    raises the floor over the ids in use."""

    def __init__(self, capacity: int = RELEASED_MEMORY) -> None:
        self.capacity = capacity
        self._ids: set[int] = set()
        self._heap: list[int] = []
        self.floor = -1

    def add(self, image_id: int) -> None:
        if image_id in self:
            return
        self._ids.add(image_id)
        heapq.heappush(self._heap, image_id)
        if len(self._heap) > self.capacity:
            oldest = heapq.heappop(self._heap)
            self._ids.discard(oldest)
            self.floor = max(self.floor, oldest)

    def __contains__(self, image_id: int) -> bool:
        return image_id <= self.floor or image_id in self._ids

    def below_all(self, image_id: int) -> bool:
        """True when `image_id` is lower than every id remembered (older than the run's images)."""
        return bool(self._heap) and image_id < self._heap[0]

    def clear(self) -> None:
        self._ids.clear()
        self._heap.clear()
        self.floor = -1


class Synchronizer:
    def __init__(self, n_modules: int, timeout_s: float, max_pending: int, restart_jump: int) -> None:
        self.n_modules = n_modules
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.restart_jump = restart_jump
        self.pending: dict[int, PendingImage] = {}  # insertion order = first_seen order
        self._pending_ids: list[int] = []  # min-heap of the pending ids (lazy: released ids popped later)
        self._last_released: int | None = None  # the run's latest release: output is rising from it
        self.last_id: list[int | None] = [None] * n_modules
        self.last_seen: list[float | None] = [None] * n_modules
        self.released = ReleasedIds()
        self._backward: list[list[ModuleFrame]] = [[] for _ in range(n_modules)]
        self._detached: set[int] = set()  # out-of-step modules: moved past every image until accepted
        # A restart in progress: the modules that left the run (-> their last id) and their frames.
        self._restarted: dict[int, int | None] = {}
        self._next_run: dict[int, PendingImage] = {}
        self._restart_began = 0.0
        self._acquisition: list[int | None] = [None] * n_modules  # token of each module's last frame taken
        self._parked: list[list[ModuleFrame]] = [[] for _ in range(n_modules)]  # frames of a later acquisition
        # statistics (plain counters; the Assembler copies them)
        self.late_frames = 0
        self.module_restarts = 0
        self.detector_restarts = 0
        self.restarts_not_followed = 0
        self.forward_jumps = 0
        self.id_gaps = 0
        self.skipped_ids = 0

    @property
    def waiting(self) -> bool:
        """Whether frames wait for more frames or a timeout (the caller should call expire soon)."""
        return bool(self.pending or self._next_run)

    # --- input ----------------------------------------------------------------------------------------

    def add(self, frame: ModuleFrame, now: float) -> list[ReadyImage]:
        """Take one module frame; returns the images it made ready, in id order."""
        m, image_id = frame.module_id, frame.id
        self.last_seen[m] = now
        if self._parked[m]:
            return self._park(frame)  # behind frames of a later acquisition: in order after them
        token = self._acquisition[m]
        new_acquisition = token is not None and frame.acquisition != token
        if m in self._restarted:
            held_last = self._restarted[m]
            if new_acquisition and held_last is not None and image_id <= held_last:
                return self._park(frame)  # yet another acquisition, before the others followed the last
            self._acquisition[m] = frame.acquisition
            return self._add_next_run(frame, now)
        self._acquisition[m] = frame.acquisition
        last = self.last_id[m]
        if last is not None and image_id <= last:
            backward = self._backward[m]
            if new_acquisition or last - image_id > self.restart_jump:
                backward.clear()
                return self._begin_restart(m, [frame], now)
            if image_id < last and (not backward or image_id > backward[-1].id):
                backward.append(frame)
                if len(backward) >= RESTART_AFTER_BACKWARD:
                    self.late_frames -= len(backward) - 1  # counted late one by one; they are the new run
                    frames = list(backward)
                    backward.clear()
                    return self._begin_restart(m, frames, now)
            else:
                backward.clear()
            self.late_frames += 1
            return []
        self._backward[m].clear()
        return self._add_current(frame, now)

    def expire(self, now: float) -> list[ReadyImage]:
        """Images released by the timeout (call regularly, also when no frame arrives)."""
        out = []
        if self._restarted:
            out += self._try_switch(now)
            if self._restarted and now - self._restart_began >= self.timeout_s:
                out += self._restart_not_followed(now)
        expired = []
        for pending in self.pending.values():  # first_seen order: stop at the first that may wait on
            if now - pending.first_seen < self.timeout_s:
                break
            expired.append(pending)
        for p in sorted(expired, key=lambda p: p.image_id):  # (_release takes out only smaller ids)
            out += self._release(p, "timeout")
        return out

    def release_overdue(self) -> list[ReadyImage]:
        """After a read round: release the images whose FrameBuffer slots are being reused (id at least
        `restart_jump` below the newest id of a module in the run) and, oldest first, those beyond
        `max_pending`; drop the oldest held frames of a restart beyond `max_pending`."""
        out = []
        if self.pending:
            newest = max((last for m, last in enumerate(self.last_id)
                          if last is not None and m not in self._restarted), default=None)
            overwritten_below = -1 if newest is None else newest - self.restart_jump
            if len(self.pending) > self.max_pending or min(self.pending) <= overwritten_below:
                for image_id in sorted(self.pending):  # smallest first: nothing smaller is still waiting
                    if image_id <= overwritten_below:
                        out += self._release(self.pending[image_id], "overwritten")
                    elif len(self.pending) > self.max_pending:
                        out += self._release(self.pending[image_id], "overflow")
                    else:
                        break
        while len(self._next_run) > self.max_pending:
            oldest = self._next_run.pop(min(self._next_run))
            self.late_frames += len(oldest.frames)
        for parked in self._parked:
            if len(parked) > self.max_pending:
                self.late_frames += len(parked) - self.max_pending
                del parked[:len(parked) - self.max_pending]
        return out

    # --- the current run ------------------------------------------------------------------------------

    def _add_current(self, frame: ModuleFrame, now: float) -> list[ReadyImage]:
        m, image_id = frame.module_id, frame.id
        last = self.last_id[m]
        if last is not None and image_id - last > 1:
            self.id_gaps += 1
            self.skipped_ids += image_id - last - 1
            if image_id - last > self.restart_jump:
                self.forward_jumps += 1
        self.last_id[m] = image_id
        pending = self.pending.get(image_id)
        if pending is None:
            if image_id in self.released or (m in self._detached and self.released.below_all(image_id)) \
                    or self._behind_output(image_id):
                self.late_frames += 1  # (an out-of-step module rejoins only where its ids meet the run's)
                return []
            pending = self.pending[image_id] = PendingImage(image_id, now)
            heapq.heappush(self._pending_ids, image_id)
        self._detached.discard(m)
        pending.frames[m] = frame
        out = []
        if len(pending.frames) == self.n_modules:
            out += self._release(pending, "complete")
        elif all(self._passed(j, image_id) for j in range(self.n_modules) if j not in pending.frames):
            out += self._release(pending, "moved_past")  # m lags: the others are past this id already
        if last is None or image_id - last > 1:  # m passed the ids in between: images may stop waiting
            out += self._release_moved_past(lambda i: last is None or i > last, image_id)
        if len(out) > 1:
            out.sort(key=lambda r: r.image_id)
        return out

    def _passed(self, module: int, image_id: int) -> bool:
        if module in self._restarted or module in self._detached:
            return True
        last = self.last_id[module]
        return last is not None and last > image_id

    def _release_moved_past(self, after, below: int | float) -> list[ReadyImage]:
        """Release the waiting images with `after(id)` and id < `below` whose missing modules all passed."""
        ready = []
        for image_id in sorted(i for i in self.pending if i < below and after(i)):
            pending = self.pending[image_id]  # (_release takes out only smaller ids: this one still waits)
            if all(self._passed(m, image_id) for m in range(self.n_modules) if m not in pending.frames):
                ready += self._release(pending, "moved_past")
        return ready

    def _behind_output(self, image_id: int) -> bool:
        """A new image `image_id` could not be published in id order: the run released a bigger id
        already. Within `restart_jump` of it that is a late frame; further below it is no frame of the
        images in flight (a far-future id, a glitch, was released before): accepted, a backward step."""
        last = self._last_released
        return last is not None and last - self.restart_jump <= image_id < last

    def _release(self, pending: PendingImage, reason: str) -> list[ReadyImage]:
        """Release `pending`, and before it, in id order, every image with a smaller id still waiting
        (reason "in_order"): a run's images leave in rising id order, whatever released them."""
        out = []
        heap, image_id = self._pending_ids, pending.image_id
        while heap and heap[0] <= image_id:
            smaller = heapq.heappop(heap)
            older = self.pending.get(smaller)
            if older is not None and smaller != image_id:
                out.append(self._release_one(older, "in_order"))
        out.append(self._release_one(pending, reason))
        return out

    def _release_one(self, pending: PendingImage, reason: str) -> ReadyImage:
        del self.pending[pending.image_id]
        self.released.add(pending.image_id)
        self._last_released = pending.image_id
        missing = [m for m in range(self.n_modules) if m not in pending.frames]
        return ReadyImage(pending.image_id, pending.frames, missing, reason)

    # --- restarts -------------------------------------------------------------------------------------

    def _begin_restart(self, module: int, frames: list[ModuleFrame], now: float) -> list[ReadyImage]:
        self.module_restarts += 1
        if not self._restarted:
            self._restart_began = now
        self._restarted[module] = None
        for frame in frames:
            self._hold(frame, now)
        # The module left the run: images waiting for it stop waiting.
        out = self._release_moved_past(lambda i: True, float("inf"))
        return out + self._try_switch(now)

    def _park(self, frame: ModuleFrame) -> list[ReadyImage]:
        self._parked[frame.module_id].append(frame)
        return []

    def _take_parked(self, now: float) -> list[ReadyImage]:
        """The restart ended (switched, or not followed): take the parked frames again, each module's in
        the order they came (they may begin the next restart, and park again behind it)."""
        out = []
        parked, self._parked = self._parked, [[] for _ in range(self.n_modules)]
        for frames in parked:
            for frame in frames:
                out += self.add(frame, now)
        return out

    def _add_next_run(self, frame: ModuleFrame, now: float) -> list[ReadyImage]:
        self._hold(frame, now)
        return self._try_switch(now)

    def _hold(self, frame: ModuleFrame, now: float) -> None:
        """Keep a frame of a restarted module for the next run."""
        m, image_id = frame.module_id, frame.id
        last = self._restarted[m]
        if last is not None and image_id <= last:
            if last - image_id <= self.restart_jump:
                self.late_frames += 1  # a duplicate or reordered frame within the new run
                return
            self.module_restarts += 1  # restarted again: follow it
        self._restarted[m] = image_id
        held = self._next_run.get(image_id)
        if held is None:
            held = self._next_run[image_id] = PendingImage(image_id, now)
        held.frames[m] = frame

    def _try_switch(self, now: float) -> list[ReadyImage]:
        """Start the new run when every module that is alive has restarted."""
        for m in range(self.n_modules):
            if m in self._restarted:
                continue
            seen = self.last_seen[m]
            if seen is not None and now - seen < self.timeout_s:
                return []
        self.detector_restarts += 1
        for m in range(self.n_modules):  # gaps within the new run's first frames
            ids = sorted(i for i, held in self._next_run.items() if m in held.frames)
            for a, b in zip(ids, ids[1:]):
                if b - a > 1:
                    self.id_gaps += 1
                    self.skipped_ids += b - a - 1
        out = [self._release_one(self.pending[i], "restart") for i in sorted(self.pending)]
        self.released.clear()
        self._last_released = None  # the new run's ids start afresh (a backward step: the restart)
        self.last_id = [self._restarted.get(m) for m in range(self.n_modules)]
        self._backward = [[] for _ in range(self.n_modules)]
        self._detached.clear()
        self.pending = dict(sorted(self._next_run.items(), key=lambda item: item[1].first_seen))
        self._pending_ids = sorted(self.pending)  # (a sorted list is a heap)
        self._next_run = {}
        self._restarted = {}
        for image_id in sorted(self.pending):
            held = self.pending.get(image_id)
            if held is not None and len(held.frames) == self.n_modules:
                out += self._release(held, "complete")
        out += self._release_moved_past(lambda i: True, float("inf"))
        return out + self._take_parked(now)

    def _restart_not_followed(self, now: float) -> list[ReadyImage]:
        """The other modules did not restart: the restarted ones were out of step. Their held frames go
        back into the current run; a module whose latest frame is late stays detached until accepted."""
        self.restarts_not_followed += 1
        modules = dict(self._restarted)
        held = sorted((f for p in self._next_run.values() for f in p.frames.values()), key=lambda f: f.id)
        self._restarted = {}
        self._next_run = {}
        out = []
        for m in modules:
            self.last_id[m] = None
            self._detached.add(m)
        for frame in held:
            late_before = self.late_frames
            out += self._add_current(frame, now)
            if self.late_frames == late_before:
                self._detached.discard(frame.module_id)
            else:
                self._detached.add(frame.module_id)
        out += self._release_moved_past(lambda i: True, float("inf"))
        return sorted(out, key=lambda r: r.image_id) + self._take_parked(now)
