"""ImageTally as pure logic: the statuses and the id jumps of the images a request forwarded."""
from __future__ import annotations

from writer_agent.tally import TALLY_FIELDS, ImageTally, describe_tally


def tally_of(images, totals=None) -> ImageTally:
    tally = ImageTally(totals)
    for image_id, status in images:
        tally.add(image_id, status)
    return tally


def test_consecutive_good_images_have_no_gap_and_no_incomplete_image():
    counts = tally_of((i, 0) for i in range(7, 17)).counts()
    assert counts == {**dict.fromkeys(TALLY_FIELDS, 0), "images_good": 10}
    assert describe_tally(counts, 10, skips_expected=False) == []


def test_each_status_is_counted_under_its_name_and_unknown_values_apart():
    counts = tally_of(enumerate([0, 1, 1, 2, 3, 3, 3, 0, 7], start=1)).counts()
    assert (counts["images_good"], counts["images_missing_packets"], counts["images_mismatch"],
            counts["images_missing_module"], counts["images_other_status"], counts["images_incomplete"]) \
        == (2, 2, 1, 3, 1, 7)
    assert describe_tally(counts, 9, skips_expected=False) == [
        "7 of 9 images incomplete (2 missing packets, 1 mismatch, 3 missing module, 1 other status)"]


def test_forward_jumps_count_gaps_and_the_ids_skipped_and_backward_steps_apart():
    # 1..3, a jump over 4..70 (67 ids, an assembler restart), 71..72, a detector restart to 1, a repeated
    # id, then a jump over 3 and 4.
    ids = [1, 2, 3, 71, 72, 1, 2, 2, 5]
    counts = tally_of((i, 0) for i in ids).counts()
    assert (counts["image_id_gaps"], counts["image_ids_skipped"], counts["image_id_backward_jumps"]) == (2, 69, 2)
    assert describe_tally(counts, len(ids), skips_expected=False) == [
        "69 image ids skipped in 2 gaps (images the detector counted that never reached the ImageBuffer, "
        "or that it skipped)",
        "the image id went back 2 time(s) (a detector restart?)"]
    # pulse ids at a reduced rate skip ids by design: counted, not described
    assert describe_tally(counts, len(ids), skips_expected=True) == [
        "the image id went back 2 time(s) (a detector restart?)"]


def test_the_agents_totals_add_up_the_requests_but_not_the_jump_between_them():
    totals = ImageTally()
    tally_of([(1, 0), (2, 3), (10, 0)], totals)
    tally_of([(500, 1), (501, 0)], totals)  # a later request: 10 -> 500 is no gap of either
    counts = totals.counts()
    assert (counts["images_good"], counts["images_incomplete"], counts["image_id_gaps"],
            counts["image_ids_skipped"], counts["image_id_backward_jumps"]) == (3, 2, 1, 7, 0)


def test_ids_of_images_the_agent_missed_or_dropped_are_not_counted_as_skipped():
    # The agent's own losses are reported apart (sequence_gaps, images_dropped), not as the detector's.
    tally = ImageTally()
    tally.add(1, 0)
    tally.add(4, 0, missed=2)  # 2 and 3 missed by the agent (a sequence gap of 2): no skip
    tally.passed(5)  # 5 reached the agent and could not be handed to the writer: no skip
    tally.add(6, 0)
    tally.add(10, 0, missed=1)  # one of 7..9 missed by the agent: 2 ids skipped besides
    tally.add(11, 0, missed=3)  # more missed than the step explains (a sequence from elsewhere): no skip
    tally.add(5, 0, missed=1)  # a backward step stays one, whatever was missed
    counts = tally.counts()
    assert (counts["image_id_gaps"], counts["image_ids_skipped"], counts["image_id_backward_jumps"]) == (1, 2, 1)
