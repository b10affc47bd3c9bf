"""Every image a write forwards is accounted for in its final status: how many of each ImageMetadata status,
and the image ids skipped between them, equal to what the file holds. writer_agent and std_h5_writer as
real processes, the real RabbitMQ, a scripted producer on the real ImageBuffer and PUB address."""
from __future__ import annotations

import json
import time

import h5py
import numpy as np
import pytest

from core_buffer import broker
from core_buffer.formats import ImageMetadata
from tests.producer import ImageProducer, expected_image
from tests.writer_agent.rig import Rig, rig  # noqa: F401 - fixture

pytestmark = pytest.mark.broker

# The audit's case: a std_assembler killed -9 mid-write and restarted. Its images so far, then those of the
# restarted one: the ids jump by 68 (67 ids the detector sent were never assembled) and the sequence
# number (user_1) begins again at 1, so no sequence gap shows it. Some images are incomplete.
# (id, status, user_1); ImageBuffer slots are id % 64: no two ids of the script share one.
BEFORE_KILL = [(11, 0, 1), (12, 0, 2), (13, 1, 3), (14, 0, 4), (15, 3, 5), (16, 3, 6), (17, 0, 7)]
AFTER_RESTART = [(85, 3, 1), (86, 2, 2), (87, 0, 3), (88, 0, 4), (89, 1, 5), (90, 0, 6), (91, 0, 7),
                 (92, 0, 8)]
ASSEMBLER_RESTART = BEFORE_KILL + AFTER_RESTART


def publish(producer: ImageProducer, script) -> None:
    """Put each image of the script into the ImageBuffer (the simulator's pattern) and publish its
    ImageMetadata, as std_assembler does."""
    config = producer.config
    for image_id, status, sequence in script:
        pixels = expected_image(config, image_id)
        producer.images.begin_image(image_id)[:pixels.nbytes] = pixels.reshape(-1).view(np.uint8)
        meta = ImageMetadata(image_id, *config.image_shape, status=status, user_1=sequence, user_2=image_id)
        producer.images.commit_image(meta)
        producer.pub.send(meta.encode())
        time.sleep(0.002)


def wait_until_writing(r: Rig, request_id: str, timeout_s: float = 15.0) -> None:
    """Until a progress report shows std_h5_writer has taken the start: the images published from then
    on are those written."""
    deadline = time.monotonic() + timeout_s
    while True:
        for s in list(r.client.received):
            if s.request_id == request_id and s.action == broker.REQUEST_PROGRESS:
                report = json.loads(s.message)
                if report["state"] == "writing" and "waiting_for" not in report:
                    return
        assert time.monotonic() < deadline, r.logs()
        r.client.connection.process_data_events(time_limit=0.1)


def scripted_write(r: Rig, name: str, script):
    path = r.out / name
    request_id = r.client.submit(str(path), len(script), tag=r.tag)
    wait_until_writing(r, request_id)
    publish(r.producer, script)
    return path, r.client.wait(request_id, timeout_s=30)


def file_ids_and_statuses(r: Rig, path):
    with h5py.File(path, "r") as f:
        return f[f"/{r.tag}/image_id"][:].astype(np.int64), f[f"/{r.tag}/status"][:]


def test_skipped_ids_and_incomplete_images_are_counted_exactly_and_the_success_warns(rig):
    r = rig(rate_hz=0)
    path, result = scripted_write(r, "restart.h5", ASSEMBLER_RESTART)
    assert result.ok, result.message + r.logs()
    s = result.summary
    # the existing fields, unchanged
    assert (s["images_written"], s["images_lost"], s["images_dropped"], s["sequence_gaps"]) == (15, 0, 0, 0), s
    # the new ones
    assert (s["images_good"], s["images_missing_packets"], s["images_mismatch"], s["images_missing_module"],
            s["images_other_status"], s["images_incomplete"]) == (9, 2, 1, 3, 0, 6), s
    assert (s["image_id_gaps"], s["image_ids_skipped"], s["image_id_backward_jumps"]) == (1, 67, 0), s
    assert s["warning"] == ("67 image ids skipped in 1 gap (images the detector counted that never reached the "
                            "ImageBuffer, or that it skipped); 6 of 15 images incomplete (2 missing packets, "
                            "1 mismatch, 3 missing module)")
    # ... and they are what the file holds: the jumps in its ids, the statuses of its rows
    ids, statuses = file_ids_and_statuses(r, path)
    assert ids.tolist() == [image_id for image_id, _, _ in ASSEMBLER_RESTART]
    steps = np.diff(ids)
    assert (int((steps > 1).sum()), int((steps[steps > 1] - 1).sum())) == (s["image_id_gaps"], s["image_ids_skipped"])
    assert [int((statuses == code).sum()) for code in range(4)] == \
        [s["images_good"], s["images_missing_packets"], s["images_mismatch"], s["images_missing_module"]]


def test_backward_jumps_and_the_agents_own_misses_are_not_skips_and_the_statistics_add_up(rig):
    r = rig(rate_hz=0)
    # a detector restart: its frame counter begins again at 1 (a new std_assembler run, same sequence)
    script = [(40, 0, 1), (41, 0, 2), (42, 1, 3), (1, 0, 4), (2, 0, 5), (3, 0, 6)]
    _, result = scripted_write(r, "detector-restart.h5", script)
    assert result.ok, result.message + r.logs()
    s = result.summary
    assert (s["image_id_gaps"], s["image_ids_skipped"], s["image_id_backward_jumps"], s["images_incomplete"]) \
        == (0, 0, 1, 1), s
    assert s["warning"] == ("the image id went back 1 time(s) (a detector restart?); "
                            "1 of 6 images incomplete (1 missing packets)")
    # a clean write: no warning; the agent's statistics add both up (not the jump from 3 to 20 between them)
    clean = [(20 + i, 0, 10 + i) for i in range(5)]
    _, result = scripted_write(r, "clean.h5", clean)
    assert result.ok, result.message + r.logs()
    assert "warning" not in result.summary
    assert (result.summary["images_good"], result.summary["image_id_gaps"]) == (5, 0)
    stats = r.agent_stats()
    assert (stats["images_good"], stats["images_missing_packets"], stats["image_id_gaps"],
            stats["image_ids_skipped"], stats["image_id_backward_jumps"]) == (10, 1, 0, 0, 1), stats
    # ids 32 and 33 are missed by the agent (sequence numbers 12 and 13 never reach it): counted as sequence
    # gaps only; 35..39 are skipped by the detector's side (the sequence goes on by one): counted as skipped
    missed = [(30, 0, 10), (31, 0, 11), (34, 0, 14), (40, 0, 15), (41, 0, 16)]
    _, result = scripted_write(r, "missed.h5", missed)
    assert result.ok, result.message + r.logs()
    s = result.summary
    assert (s["sequence_gaps"], s["image_id_gaps"], s["image_ids_skipped"]) == (2, 1, 5), s
    assert s["warning"] == ("5 image ids skipped in 1 gap (images the detector counted that never reached the "
                            "ImageBuffer, or that it skipped); 2 images missed by writer_agent (sequence gaps)")


def test_progress_reports_carry_the_counts_so_far_and_a_kill_names_them(rig):
    r = rig(rate_hz=0)
    path = r.out / "killed.h5"
    request_id = r.client.submit(str(path), 100, tag=r.tag)
    wait_until_writing(r, request_id)
    publish(r.producer, ASSEMBLER_RESTART)
    deadline = time.monotonic() + 15
    while not any(s.request_id == request_id and s.action == broker.REQUEST_PROGRESS
                  and json.loads(s.message)["n_forwarded"] == len(ASSEMBLER_RESTART) for s in list(r.client.received)):
        assert time.monotonic() < deadline, r.logs()
        r.client.connection.process_data_events(time_limit=0.1)
    report = next(json.loads(s.message) for s in list(r.client.received)
                  if s.request_id == request_id and s.action == broker.REQUEST_PROGRESS
                  and json.loads(s.message)["n_forwarded"] == len(ASSEMBLER_RESTART))
    assert (report["images_incomplete"], report["image_id_gaps"], report["image_ids_skipped"]) == (6, 1, 67), report
    r.client.kill(request_id, tag=r.tag)
    result = r.client.wait(request_id, timeout_s=15)
    assert not result.ok and result.message.startswith("interrupted by a kill after 15 of 100 images"), result.message
    assert result.message.endswith("; of the images forwarded: 67 image ids skipped in 1 gap (images the detector "
                                   "counted that never reached the ImageBuffer, or that it skipped); 6 of 15 images "
                                   "incomplete (2 missing packets, 1 mismatch, 3 missing module)"), result.message

