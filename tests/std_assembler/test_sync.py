"""The Synchronizer alone (pure logic): which images leave, when, with which modules, and what is late."""
from __future__ import annotations

import pytest

from core_buffer.formats import ModuleFrame
from std_assembler.sync import RELEASED_MEMORY, RESTART_AFTER_BACKWARD, ReleasedIds, Synchronizer

TIMEOUT = 1.0
SLOTS = 64  # restart_jump: the FrameBuffer depth


class Feed:
    """Feeds frames at a controllable clock and records every image released, in order."""

    def __init__(self, n_modules=2, max_pending=32):
        self.sync = Synchronizer(n_modules, TIMEOUT, max_pending, restart_jump=SLOTS)
        self.now = 0.0
        self.out = []
        self.acquisition = [0] * n_modules  # each module's receiver's token (ModuleFrame.acquisition)

    def frame(self, module, image_id):
        """One frame as a read round of its own."""
        self.read_round([(module, image_id)])

    def read_round(self, frames):
        """(module, id) pairs read in one round: the limits on waiting images apply after the last."""
        for module, image_id in frames:
            frame = ModuleFrame(id=image_id, module_id=module, acquisition=self.acquisition[module])
            self.out += self.sync.add(frame, self.now)
        self.out += self.sync.release_overdue()

    def image(self, image_id, modules=(0, 1)):
        for m in modules:
            self.frame(m, image_id)

    def new_acquisition(self, modules=(0, 1)):
        """The modules' receivers saw their ids start again."""
        for m in modules:
            self.acquisition[m] += 1

    def wait(self, seconds):
        self.now += seconds
        self.out += self.sync.expire(self.now)

    def released(self):
        """(id, missing modules) of everything released so far."""
        return [(r.image_id, tuple(r.missing)) for r in self.out]


def test_complete_images_leave_at_once_in_id_order():
    f = Feed()
    f.image(1)
    f.image(2)
    assert f.released() == [(1, ()), (2, ())]
    assert f.sync.pending == {}


def test_a_duplicated_frame_is_late_and_publishes_nothing_again():
    f = Feed()
    for i in (1, 2, 3):
        f.image(i)
    f.frame(0, 2)  # module 0 repeats an old frame
    f.frame(0, 3)  # ... and its last one
    f.image(4)
    f.wait(2 * TIMEOUT)
    assert f.released() == [(1, ()), (2, ()), (3, ()), (4, ())]
    assert f.sync.late_frames == 2
    assert f.sync.module_restarts == 0
    assert f.sync.last_id == [4, 4]


def test_a_reordered_frame_joins_its_image_if_it_still_waits_and_is_late_otherwise():
    f = Feed()
    f.frame(0, 6)  # module 0 sends 6 before 5 (reordered); 5 is not open yet, so it is
    f.frame(0, 5)  # behind the module's last id: late, not a restart
    f.image(6, modules=(1,))
    f.image(7)
    assert f.released() == [(6, ()), (7, ())]
    assert f.sync.late_frames == 1 and f.sync.module_restarts == 0


def test_a_single_restarted_module_is_dropped_until_it_is_back_in_step_and_nothing_is_republished():
    f = Feed()
    for i in range(1000, 1005):
        f.image(i)
    # Module 1 jumps back far (power-cycled); module 0 goes on.
    f.frame(1, 1)
    f.frame(0, 1005)
    f.frame(1, 2)
    f.frame(0, 1006)
    # Module 1 left the run: the images of module 0 do not wait for it.
    assert f.released()[-2:] == [(1005, (1,)), (1006, (1,))]
    assert f.sync.module_restarts == 1
    for i in range(1007, 1011):  # module 0 goes on for the timeout and does not follow: module 1 was
        f.wait(TIMEOUT / 4)      # out of step
        f.frame(0, i)
    assert f.sync.restarts_not_followed == 1 and f.sync.detector_restarts == 0
    f.frame(1, 3)  # still out of step: late, and module 0's images leave without it at once
    f.frame(0, 1011)
    ids = [i for i, _ in f.released()]
    assert len(ids) == len(set(ids)), "an id was published twice"
    assert all(i >= 1000 for i in ids), "an old id was republished"
    assert f.released()[-5:] == [(i, (1,)) for i in range(1007, 1012)]
    assert f.sync.late_frames == 3  # frames 1, 2 (held, then late) and 3
    # It rejoins as soon as one of its frames is accepted (its ids meet the run's again), and its images
    # are complete again.
    f.image(1012, modules=(1, 0))
    f.image(1013)
    assert f.released()[-2:] == [(1012, ()), (1013, ())]


def test_a_detector_restart_starts_a_new_run_with_complete_images():
    f = Feed()
    for i in range(500, 503):
        f.image(i)
    f.frame(0, 1)  # module 0 restarts first: its new frame is held until module 1 follows
    f.frame(0, 2)
    assert f.released()[-1] == (502, ())
    f.frame(1, 1)  # module 1 follows: a new run
    f.frame(1, 2)
    f.image(3)
    assert f.released()[3:] == [(1, ()), (2, ()), (3, ())]
    assert f.sync.detector_restarts == 1 and f.sync.module_restarts == 2 and f.sync.late_frames == 0


def test_a_restart_with_a_small_jump_back_is_recognised_after_repeated_backward_frames():
    f = Feed()
    for i in range(20, 30):
        f.image(i)
    for i in range(1, RESTART_AFTER_BACKWARD + 2):  # both modules: ids 1, 2, 3, 4 (below 29, within SLOTS)
        f.image(i)
    assert f.sync.detector_restarts == 1
    assert f.released()[10:] == [(i, ()) for i in range(1, RESTART_AFTER_BACKWARD + 2)]
    assert f.sync.late_frames == 0


def test_a_restart_is_followed_even_when_another_module_is_silent():
    f = Feed(n_modules=3)
    f.image(100, modules=(0, 1, 2))
    f.wait(2 * TIMEOUT)  # module 2 goes silent (dead)
    f.image(101, modules=(0, 1))
    f.frame(0, 1)
    f.frame(1, 1)
    assert f.sync.detector_restarts == 1
    f.wait(TIMEOUT)  # image 1 waits for the silent module as long as any image does
    assert f.released()[-1] == (1, (2,))
    assert f.sync.detector_restarts == 1


def test_a_forward_id_jump_releases_the_skipped_images_and_goes_on():
    f = Feed()
    f.image(1)
    f.frame(0, 2)
    f.frame(0, 10_000)  # module 0 jumps forward: image 2 no longer waits for module 0, only for 1
    f.frame(1, 10_000)  # module 1 too: it moved past 2 as well
    f.image(10_001)
    assert f.released() == [(1, ()), (2, (1,)), (10_000, ()), (10_001, ())]
    assert f.sync.forward_jumps == 2


def test_one_glitched_far_future_id_does_not_stop_the_others():
    f = Feed()
    f.image(1)
    f.frame(0, 1_000_000)  # a glitch: module 0's id jumps far ahead ...
    f.frame(1, 2)
    f.frame(0, 2)  # ... and back (a restart of module 0 as far as it can tell)
    f.frame(1, 3)
    f.frame(0, 3)
    f.wait(TIMEOUT)  # module 1 never follows: module 0's held frames go back into the run
    f.image(4)
    released = dict(f.released())
    assert released[4] == ()
    assert 2 in released and 3 in released
    assert 1_000_000 in released  # released alone by the timeout, as any image


def test_a_very_late_frame_older_than_the_released_memory_does_not_reopen_an_image():
    f = Feed()
    f.frame(0, 0)  # module 0 then goes silent for a long time
    f.wait(2 * TIMEOUT)
    for i in range(1, RELEASED_MEMORY + 100):
        f.frame(1, i)
        f.wait(2 * TIMEOUT)
    n = len(f.out)
    f.frame(0, 5)  # newer than module 0's last id, but long released
    f.wait(2 * TIMEOUT)
    assert len(f.out) == n
    assert f.sync.late_frames == 1


def test_a_silent_module_delays_images_by_the_timeout_only():
    f = Feed()
    f.frame(0, 1)
    f.wait(TIMEOUT / 2)
    assert f.released() == []
    f.wait(TIMEOUT / 2)
    assert f.released() == [(1, (1,))]


def test_overflow_releases_the_oldest_first():
    f = Feed(max_pending=3)
    for i in range(1, 6):
        f.frame(0, i)
    assert f.released() == [(1, (1,)), (2, (1,))]
    assert [r.reason for r in f.out] == ["overflow", "overflow"]


def test_the_pending_limit_applies_only_after_every_module_had_its_turn_in_a_read_round():
    f = Feed(max_pending=3)
    f.read_round([(0, i) for i in range(1, 9)] + [(1, i) for i in range(1, 9)])  # module 0's backlog first
    assert f.released() == [(i, ()) for i in range(1, 9)]


def test_an_image_leaves_once_the_newest_id_is_a_frame_buffer_depth_ahead():
    f = Feed(n_modules=3, max_pending=1000)
    f.image(1, modules=(0, 1))  # module 2 lags far behind (its frames queued up), 0 and 1 go on
    for i in range(2, SLOTS + 1):
        f.image(i, modules=(0, 1))
    assert f.released() == []  # the frames of image 1 are still in the FrameBuffer: it waits
    f.image(SLOTS + 1, modules=(0, 1))  # slot of 1 reused by SLOTS + 1: its frames are being overwritten
    assert f.released() == [(1, (2,))]
    assert f.out[0].reason == "overwritten"
    f.frame(2, 2)  # module 2 catches up: image 2 is still readable and complete
    assert f.released()[-1] == (2, ())


def test_every_gap_in_a_module_s_ids_is_counted():
    f = Feed()
    f.image(1)
    f.image(3)  # both modules skip 2: the detector skipped a trigger
    f.frame(0, 4)
    f.frame(0, 5)
    f.frame(1, 5)  # module 1 skips 4
    f.image(6)
    f.image(6 + 10 * SLOTS)  # a large jump: also a forward jump
    assert (f.sync.id_gaps, f.sync.skipped_ids) == (2 + 1 + 2, 2 * 1 + 1 + 2 * (10 * SLOTS - 1))
    assert f.sync.forward_jumps == 2
    assert f.released() == [(1, ()), (3, ()), (4, (1,)), (5, ()), (6, ()), (6 + 10 * SLOTS, ())]


@pytest.mark.parametrize("ids", [[5, 1, 9, 3], list(range(20)), [7, 30, 2, 11, 12, 40, 3]])
def test_released_ids_remember_the_highest_exactly_and_the_older_ones_by_a_floor(ids):
    released = ReleasedIds(capacity=4)
    for i in ids:
        released.add(i)
    kept = sorted(ids)[-4:]
    forgotten = sorted(ids)[:-4]
    floor = max(forgotten, default=-1)
    assert released.floor == floor
    for i in range(max(ids) + 2):
        assert (i in released) == (i <= floor or i in kept), i


def test_one_far_future_id_never_raises_the_floor_over_the_ids_in_use():
    released = ReleasedIds(capacity=4)
    released.add(10**9)
    for i in range(100):
        released.add(i)
    assert released.floor == 96 and 99 in released and 100 not in released and 10**9 in released


def _assert_in_order_once(f, expected_ids):
    ids = [i for i, _ in f.released()]
    assert ids == sorted(ids), f"published out of id order: {ids}"
    assert len(ids) == len(set(ids)), f"an id was published twice: {ids}"
    assert set(ids) == set(expected_ids), f"lost: {set(expected_ids) - set(ids)}"


def test_timeouts_release_in_id_order_when_an_older_image_was_first_seen_later():
    # The reviewer's case: module 0 skips 50..59 and sends 60, module 1 sends 50 later, module 2 is
    # silent. 60 times out first; 50 (first seen later) must leave before it, not after.
    f = Feed(n_modules=3)
    f.frame(0, 60)
    f.wait(TIMEOUT / 2)
    f.frame(1, 50)
    f.wait(TIMEOUT / 2)  # 60 has waited the timeout, 50 only half of it
    assert f.released() == [(50, (0, 2)), (60, (1, 2))]
    assert [r.reason for r in f.out] == ["in_order", "timeout"]
    # Module 1 goes on with 51..: below the published 60, those images could only be published out of
    # order: late, not reopened. From 61 on the images are in step again.
    for i in range(51, 64):
        f.frame(1, i)
    for i in range(61, 64):
        f.frame(0, i)
    f.wait(2 * TIMEOUT)
    assert f.sync.late_frames == 10  # module 1's 51..60
    assert f.released()[2:] == [(i, (2,)) for i in range(61, 64)]
    _assert_in_order_once(f, [50, 60, 61, 62, 63])
    assert f.sync.pending == {} and f.sync.detector_restarts == 0


def test_every_release_rule_publishes_a_run_in_rising_id_order():
    # The limits on waiting images and complete images release the older images still waiting first.
    f = Feed(n_modules=3, max_pending=4)
    f.frame(0, 10)
    f.wait(TIMEOUT / 2)
    f.frame(1, 5)  # first seen after 10, smaller id
    f.image(11, modules=(0, 1, 2))  # complete: 5 and 10 (module 2 moved past them) leave first
    assert [i for i, _ in f.released()] == [5, 10, 11]
    f.frame(0, 20)
    f.wait(TIMEOUT / 2)
    for i in (12, 13, 14, 15):  # overflow: the oldest by id goes first, 20 after the smaller ones
        f.frame(1, i)
    f.wait(2 * TIMEOUT)
    _assert_in_order_once(f, [5, 10, 11, 12, 13, 14, 15, 20])


@pytest.mark.parametrize("gap_s", [0.0, 0.2, 2 * TIMEOUT], ids=["back-to-back", "short-gap", "long-gap"])
@pytest.mark.parametrize("length", [1, 2, 3, 4])
def test_acquisitions_of_any_length_numbered_from_one_each_time_are_all_published(length, gap_s):
    f = Feed()
    for a in range(5):
        if a:
            f.wait(gap_s)
            f.new_acquisition()
        for i in range(1, length + 1):
            f.image(i)
    assert f.released() == [(i, ()) for _ in range(5) for i in range(1, length + 1)]
    assert [r.reason for r in f.out] == ["complete"] * 5 * length
    assert f.sync.late_frames == 0 and f.sync.detector_restarts == 4 and f.sync.pending == {}


def test_a_module_a_whole_acquisition_ahead_of_the_others_is_followed_in_order():
    # Module 0's stream is read three acquisitions ahead of module 1's (a backlog): its later acquisitions
    # wait (parked) until module 1 has followed, and no two acquisitions' frames of one id are mixed.
    f = Feed()
    f.read_round([(0, 1), (1, 1)])
    f.read_round([(0, 2)])
    for _ in range(2):
        f.new_acquisition(modules=(0,))
        f.read_round([(0, 1), (0, 2)])
    assert f.released() == [(1, ())]
    f.read_round([(1, 2)])
    for _ in range(2):
        f.new_acquisition(modules=(1,))
        f.read_round([(1, 1), (1, 2)])
    assert f.released() == [(1, ()), (2, ())] * 3
    assert all(r.reason == "complete" for r in f.out)
    assert all({fr.acquisition for fr in r.frames.values()} == {k // 2} for k, r in enumerate(f.out))
    assert f.sync.late_frames == 0 and f.sync.detector_restarts == 2


def test_a_new_acquisition_token_with_rising_ids_is_no_restart():
    # A restarted receiver, or an idle gap within an acquisition whose ids go on (Jungfrau): carry on.
    f = Feed()
    f.image(10)
    f.new_acquisition(modules=(0,))
    f.image(11)
    f.new_acquisition()
    f.image(12)
    assert f.released() == [(10, ()), (11, ()), (12, ())]
    assert f.sync.module_restarts == 0 and f.sync.detector_restarts == 0


def test_a_late_duplicate_of_the_same_acquisition_is_still_late():
    f = Feed()
    f.image(1)
    f.image(2)
    f.frame(0, 2)  # same token: a duplicate, not a restart
    assert f.sync.late_frames == 1 and f.sync.module_restarts == 0
    assert f.released() == [(1, ()), (2, ())]
