"""Faults in a whole pipeline of real processes: kill -9 of each service mid-write, packet loss, a receiver,
the assembler or the writer that falls behind. Whatever happens, a request ends with a final status and no
wrong pixel reaches a file: an image is either equal to the simulator's pattern or its status says what is
missing. `-s` prints what each fault cost (the figures in docs/reliability.md)."""
from __future__ import annotations

import json
import os
import signal
import time

import h5py
import numpy as np
import psutil
import pytest

from std_daq.launcher import ServiceSpec, console_script
from std_h5_writer.h5file import STATUS_LOST, STATUS_NOT_WRITTEN
from tests.conftest import free_tcp_port_block, skip_or_fail
from tests.e2e.expected import raw_image

pytestmark = pytest.mark.broker

MISSING_PACKETS, MISSING_MODULE = 1, 3


def read(path, det):
    with h5py.File(path, "r") as f:
        return (f["entry/data/data"][:], f[f"{det}/image_id"][:], f[f"{det}/status"][:], dict(f.attrs))


def assert_no_wrong_pixel(config, data, ids, statuses):
    """Status 0: the pattern, bit for bit. Status 1 (lost packets): every pixel is the pattern's or 0.
    Status 3 (missing module): the same, and at least one module all zeros. Status 4 (lost in the buffer):
    all zeros. No other status."""
    for image, image_id, st in zip(data, ids, statuses):
        assert st in (0, MISSING_PACKETS, MISSING_MODULE, STATUS_LOST), (image_id, st)
        if st == STATUS_LOST:
            assert not image.any(), image_id
            continue
        expected = raw_image(config, int(image_id))
        if st == 0:
            assert np.array_equal(image, expected), image_id
            continue
        assert np.all((image == expected) | (image == 0)), (image_id, st)
        if st == MISSING_MODULE and config.module_positions is None:  # modules stacked in module order
            modules = image.reshape(config.n_modules, -1, image.shape[-1])
            assert any(not m.any() for m in modules), image_id


def id_gaps(ids) -> tuple[int, int, int]:
    """(jumps, image ids skipped, largest jump) in a file's image ids, each of which must appear once. Taken
    in sorted order: the assembler may publish an image that waited for a late module after newer ones
    (docs/std_assembler.md), so a file's ids need not increase row by row."""
    ordered = np.sort(ids.astype(np.int64))
    steps = np.diff(ordered)
    assert (steps >= 1).all(), f"image ids more than once in the file: {ordered[1:][steps < 1]}"
    jumps = steps[steps > 1]
    return len(jumps), int((jumps - 1).sum()), int(steps.max(initial=1))


def assert_summary_reports(summary: dict, ids, statuses) -> None:
    """The request's summary reports what the file shows: the image ids missing from it (writer_agent counts
    them in the order it forwarded the images; the file's are sorted, so the two agree when none came after a
    newer one) and, when the writer lost nothing in its buffer, how many images had each status; and a success
    whose file is not consecutive good images carries a warning."""
    _, skipped, _ = id_gaps(ids)
    # Every id missing from the file is reported once: skipped before the stream reached the agent, missed by
    # the agent's subscription (a sequence gap: also where a replica's source had a gap, as the replica
    # advances its sequence by it), or not handed to the writer.
    reported = summary["image_ids_skipped"] + summary["sequence_gaps"] + summary.get("images_dropped", 0)
    if summary["image_id_backward_jumps"] == 0:
        assert reported == skipped, summary
    else:
        assert reported >= skipped, summary
    if summary["images_lost"] == 0:
        counts = status_counts(statuses)
        assert [summary[f] for f in ("images_good", "images_missing_packets", "images_mismatch",
                                     "images_missing_module")] == [counts.get(s, 0) for s in (0, 1, 2, 3)], summary
    assert ("warning" in summary) == bool(skipped or summary["images_lost"] or (statuses != 0).any()), summary


def status_counts(statuses) -> dict[int, int]:
    return dict(zip(*(a.tolist() for a in np.unique(statuses, return_counts=True))))


def write(client, tag_or_config, path, n):
    tag = getattr(tag_or_config, "detector_name", tag_or_config)
    return client.send_write(tag, {"output_file": str(path), "n_images": n})


def wait_until_dead(pid: int, timeout_s: float = 10.0) -> None:
    """Until the process is gone or a zombie (its files closed, nothing more written)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still alive {timeout_s} s after SIGKILL")


def metrics_once_assembled(pipe, last_id: int, timeout_s: float = 10.0) -> dict:
    """The pipeline's metrics from a snapshot taken after the assembler made image `last_id` (snapshots come
    every stats_interval_s, so an earlier scrape could miss the counts of the file's last images)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = pipe.metrics()
        if metrics.get("std_assembler", {}).get("last_image_id", -1) >= last_id or time.monotonic() > deadline:
            return metrics
        time.sleep(0.2)


def wait_for_metric(pipe, label: str, name: str, at_least: float, timeout_s: float = 30.0) -> float:
    """The value of a service's metric once it reached `at_least`."""
    deadline = time.monotonic() + timeout_s
    while (value := pipe.metrics().get(label, {}).get(name, 0)) < at_least:
        assert time.monotonic() < deadline, f"{label} {name} stayed at {value}\n{pipe.log_tail()}"
        time.sleep(0.1)
    return value


FLUSH_INTERVAL_S = 0.3
WRITER = {"flush_interval_s": FLUSH_INTERVAL_S, "status_interval_s": 0.2}


def replicated(pipeline_config, pipelines):
    """A detector server (the pipeline plus std_stream_send) and a replica server (std_stream_recv,
    writer_agent, std_h5_writer in their own namespace, as on a second machine; writes go to the tag
    '<det>-replica'), as in tests/e2e/test_pipeline.py. Returns (detector side, replica side, replica config)."""
    port = free_tcp_port_block(1)
    path, config = pipeline_config(stream_send={"to": f"tcp://127.0.0.1:{port}"})
    replica_path, replica = pipeline_config(namespace="replica", stream_recv={"bind": f"tcp://127.0.0.1:{port}"},
                                            writer_agent={"tag": config.detector_name + "-replica",
                                                          "writer_timeout_s": 3.0}, writer=WRITER)
    replica_side = pipelines(replica_path, replica, specs=[
        ServiceSpec(label, [console_script(script), str(replica_path)], rank)
        for rank, (label, script) in enumerate((("stream_recv", "std_stream_recv"),
                                                ("writer_agent", "writer_agent"), ("h5_writer", "std_h5_writer")))])
    detector_side = pipelines(path, config)
    return detector_side, replica_side, replica


N_DURING = 200  # images of the write a service is killed under: 4 s at 50 Hz


def kill_mid_write(client, sides, victim_side, victim: str, tag: str, config, out) -> None:
    """A 200-image write at 50 Hz; 1 s into it the victim gets SIGKILL, the launcher restarts it. The
    request ends with a final status; the file holds no wrong pixel; the image ids it skips are measured
    and printed (a gap is where the data path stood still: a receiver, the assembler, the sender or the
    replica restarting)."""
    log_tails = lambda: "\n".join(side.log_tail() for side in sides)  # noqa: E731
    request_id = write(client, tag, out, N_DURING)
    client.wait(request_id, timeout_s=30, until="request_progress")
    time.sleep(1.0)
    written_before = 0
    if victim == "h5_writer":  # what it had written (its last metrics snapshot: a lower bound) ...
        written_before = wait_for_metric(victim_side, "std_h5_writer", "images_written", 20)
        time.sleep(3 * FLUSH_INTERVAL_S)  # ... and at least one flush after that
    pid = victim_side.pid(victim)
    os.kill(pid, signal.SIGKILL)
    wait_until_dead(pid)
    if victim == "h5_writer":  # the file as the dead writer left it, before anything after it touches it
        # (without HDF5's file lock: the killed process's lock goes only once its last thread has exited)
        with h5py.File(out, "r", locking=False) as f:
            state_at_kill = f.attrs["state"]
            statuses_at_kill = f[f"{config.detector_name}/status"][:]
    outcome = client.wait(request_id, timeout_s=60)
    assert outcome.final_action in ("request_success", "request_fail"), outcome

    if victim in ("udp_recv-0", "assembler", "stream_send", "stream_recv"):
        # the data path stalls and resumes; the write completes
        assert outcome.succeeded, f"{outcome}\n{log_tails()}"
        summary = json.loads(outcome.message)
        data, ids, statuses, attrs = read(out, config.detector_name)
        assert attrs["state"] == "complete" and data.shape[0] == len(ids) == N_DURING
        assert summary["images_written"] + summary["images_lost"] == N_DURING
        assert summary["images_lost"] == int((statuses == STATUS_LOST).sum())
        assert_no_wrong_pixel(config, data, ids, statuses)
        jumps, skipped, largest = id_gaps(ids)
        assert_summary_reports(summary, ids, statuses)
        print(f"\nkill -9 {victim}: {N_DURING} images written, statuses {status_counts(statuses)}, image ids "
              f"{int(ids.min())}-{int(ids.max())}: {jumps} gap(s), {skipped} ids skipped (largest jump {largest}); "
              f"summary images_lost {summary['images_lost']}, sequence_gaps {summary['sequence_gaps']}")
    elif victim == "writer_agent":
        assert not outcome.succeeded and "writer_agent restarted during the write" in outcome.message
        data, ids, statuses, attrs = read(out, config.detector_name)
        assert attrs["state"] in ("complete", "interrupted") and data.shape[0] == len(ids) > 0
        assert_no_wrong_pixel(config, data, ids, statuses)
        jumps, skipped, largest = id_gaps(ids)
        print(f"\nkill -9 writer_agent: request_fail; the file: {len(ids)} images, state {attrs['state']}, "
              f"{jumps} gap(s), {skipped} ids skipped")
    else:
        # (the reason: "std_h5_writer sent no status ..."; with the marking of a dead writer's file under
        # way in std_h5_writer, "std_h5_writer: std_h5_writer died while writing ...")
        assert not outcome.succeeded and "std_h5_writer" in outcome.message, outcome.message
        # Killed mid-file, the file says it was never finished and holds every image the writer had written
        # by its last flush (at most FLUSH_INTERVAL_S before the kill, so all it had written 3 intervals
        # before); the rows after that read "not written", so the accounted rows come first, all of them.
        assert state_at_kill == "writing"
        flushed = int((statuses_at_kill != STATUS_NOT_WRITTEN).sum())
        assert (statuses_at_kill[:flushed] != STATUS_NOT_WRITTEN).all()
        assert flushed >= written_before > 0, (flushed, written_before)
        with h5py.File(out, "r") as f:
            det = config.detector_name
            ids = f[f"{det}/image_id"][:flushed]
            assert_no_wrong_pixel(config, f["entry/data/data"][:flushed], ids, f[f"{det}/status"][:flushed])
        # The restarted writer finds the file its predecessor left open and marks it interrupted, trimmed to
        # the rows that flush accounted for.
        deadline = time.monotonic() + 30
        while (attrs := read(out, config.detector_name)[3])["state"] == "writing":
            assert time.monotonic() < deadline, victim_side.log_tail()
            time.sleep(0.1)
        with h5py.File(out, "r") as f:
            assert f.attrs["state"] == "interrupted" and "interruption" in f.attrs, dict(f.attrs)
            assert f["entry/data/data"].shape[0] == flushed
        jumps, skipped, _ = id_gaps(ids)
        print(f"\nkill -9 h5_writer: the file as it was left: state 'writing', {flushed} of {N_DURING} rows "
              f"flushed, the rest status {STATUS_NOT_WRITTEN}; the writer had written >= {written_before:.0f} "
              f"images {3 * FLUSH_INTERVAL_S:g} s (3 flush intervals) before the kill; {jumps} id gap(s)")


def then_a_write_succeeds(client, sides, tag: str, config, out) -> None:
    """Once the launcher restarted the victim, a write is complete, good and bit for bit."""
    for side in sides:
        side.wait_ready()
    outcome = client.wait(write(client, tag, out, 20), timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n" + "\n".join(side.log_tail() for side in sides)
    data, ids, statuses, _ = read(out, config.detector_name)
    assert not statuses.any() and id_gaps(ids)[0] == 0
    assert_no_wrong_pixel(config, data, ids, statuses)


# The writer killed with either page cache (docs/std_h5_writer.md, writer.page_cache): bounded with 1 MiB
# windows, so windows are written back and dropped before the kill, or left to the kernel.
@pytest.mark.parametrize("victim,page_cache", [("udp_recv-0", "bounded"), ("assembler", "bounded"),
                                               ("writer_agent", "bounded"), ("h5_writer", "bounded"),
                                               ("h5_writer", "kernel")])
def test_kill_9_of_a_service_mid_write_ends_the_request_and_the_pipeline_resumes(
        victim, page_cache, pipeline_config, pipelines, client, tmp_path):
    path, config = pipeline_config(writer_agent={"writer_timeout_s": 3.0},
                                   writer={**WRITER, "page_cache": page_cache, "page_cache_window_mib": 1})
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "50", "--n-images", "forever")
    kill_mid_write(client, [pipe], pipe, victim, config.detector_name, config, tmp_path / "out" / "during.h5")
    then_a_write_succeeds(client, [pipe], config.detector_name, config, tmp_path / "out" / "after.h5")


def test_kill_9_of_the_stream_sender_and_then_of_the_replica_mid_write_on_the_replica(
        pipeline_config, pipelines, client, tmp_path):
    """The same, under writes on a replica server: std_stream_send killed during one, std_stream_recv during
    the next (one set-up for both: a replica costs three more processes)."""
    detector_side, replica_side, config = replicated(pipeline_config, pipelines)
    detector_side.simulate("--rate", "50", "--n-images", "forever")
    sides, tag = [detector_side, replica_side], config.detector_name + "-replica"
    for victim, side in (("stream_send", detector_side), ("stream_recv", replica_side)):
        kill_mid_write(client, sides, side, victim, tag, config, tmp_path / "out" / f"during-{victim}.h5")
        then_a_write_succeeds(client, sides, tag, config, tmp_path / "out" / f"after-{victim}.h5")


def test_dropped_packets_give_status_1_on_exactly_those_images(pipeline_config, pipelines, client, tmp_path):
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024)
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "50", "--n-images", "forever", "--drop-every", "5")
    # The write starts once the stream is under way: a module's first frame may come late to the assembler
    # (missing module, status 3), which this test is not about (it failed once so on a busy machine).
    deadline = time.monotonic() + 30
    while pipe.metrics().get("std_assembler", {}).get("images", 0) < 10:
        assert time.monotonic() < deadline, pipe.log_tail()
        time.sleep(0.1)
    out = tmp_path / "out" / "lossy.h5"
    outcome = client.wait(write(client, config, out, 30), timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    data, ids, statuses, _ = read(out, config.detector_name)
    assert list(statuses) == [1 if i % 5 == 0 else 0 for i in ids]
    assert_no_wrong_pixel(config, data, ids, statuses)
    for image, image_id in zip(data[statuses == 1], ids[statuses == 1]):
        assert (image != raw_image(config, int(image_id))).any()  # the lost packet's pixels are zeros


def stalled(pipe, label: str, seconds: float) -> None:
    """SIGSTOP, then SIGCONT `seconds` later: the service's CPU is stolen meanwhile."""
    pid = pipe.pid(label)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_receiver_that_falls_behind_loses_counted_packets_and_no_wrong_pixel(
        pipeline_config, pipelines, client, tmp_path):
    """Receiver 1 stopped for 0.5 s at 100 Hz with a 1 MiB socket buffer: the kernel drops what does not
    fit. Its lost packets are counted, the assembler counts the images with a module missing or packets
    lost, every such image in the file is among them, and none has a wrong pixel."""
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024, udp_recv={"rcvbuf_bytes": 1 << 20})
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "100", "--n-images", "forever")
    out = tmp_path / "out" / "behind.h5"
    request_id = write(client, config, out, 200)  # 2 s at 100 Hz: the stall falls inside
    client.wait(request_id, timeout_s=30, until="request_progress")
    stalled(pipe, "udp_recv-1", 0.5)
    outcome = client.wait(request_id, timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    data, ids, statuses, _ = read(out, config.detector_name)
    counts = status_counts(statuses)
    metrics = metrics_once_assembled(pipe, int(ids.max()))
    receiver, assembler = metrics["std_udp_recv-1"], metrics["std_assembler"]
    assert set(counts) <= {0, MISSING_PACKETS, MISSING_MODULE}, counts  # nothing lost in the buffers
    assert counts.get(MISSING_PACKETS, 0) + counts.get(MISSING_MODULE, 0) > 0, counts  # the stall shows ...
    assert_no_wrong_pixel(config, data, ids, statuses)  # ... and not as wrong pixels
    assert receiver["lost_packets"] > 0  # the frame the full socket buffer cut short ...
    assert receiver["frames_missed"] > 0  # ... and the frames it never saw, counted by their frame index
    assert assembler["images_missing_module"] > 0  # the frames that never reached the receiver
    assert counts.get(MISSING_PACKETS, 0) <= assembler["images_missing_packets"]
    assert counts.get(MISSING_MODULE, 0) <= assembler["images_missing_module"]
    summary = json.loads(outcome.message)
    assert summary["images_lost"] == 0
    assert_summary_reports(summary, ids, statuses)  # the incomplete images, reported to the user
    jumps, skipped, _ = id_gaps(ids)
    print(f"\nfalls behind, receiver: {len(statuses)} images written, statuses {counts}, receiver 1 lost "
          f"{receiver['lost_packets']:.0f} packets (receiver 0: {metrics['std_udp_recv-0']['lost_packets']:.0f}), "
          f"assembler: {assembler['images_missing_module']:.0f} images missing a module, "
          f"{assembler['images_missing_packets']:.0f} missing packets; {jumps} id gap(s), {skipped} ids skipped, "
          f"{int((np.diff(ids.astype(np.int64)) < 0).sum())} image(s) after a newer one")


@pytest.mark.parametrize("victim", ["assembler", "h5_writer"])
def test_a_consumer_that_falls_behind_has_its_buffer_overwritten_detected_counted_and_no_wrong_pixel(
        victim, pipeline_config, pipelines, client, tmp_path):
    """The assembler or the writer stopped for 0.8 s at 100 Hz, with buffers of 16 slots: its producer
    laps it. The assembler finds FrameBuffer slots overwritten (frames_overwritten, the image's status 3,
    the module zeroed); the writer finds ImageBuffer slots overwritten (status 4, zeros, counted in the
    request's images_lost). Every image of the file is accounted for by a counter and none has a wrong
    pixel."""
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024, frame_buffer_slots=16,
                                   image_buffer_slots=16)
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "100", "--n-images", "forever")
    out = tmp_path / "out" / "stall.h5"
    request_id = write(client, config, out, 200)
    client.wait(request_id, timeout_s=30, until="request_progress")
    stalled(pipe, victim, 0.8)
    outcome = client.wait(request_id, timeout_s=60)
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    summary = json.loads(outcome.message)
    data, ids, statuses, _ = read(out, config.detector_name)
    counts = status_counts(statuses)
    metrics = metrics_once_assembled(pipe, int(ids.max()))
    assembler = metrics["std_assembler"]
    n_lost = counts.get(STATUS_LOST, 0)
    jumps, skipped, _ = id_gaps(ids)
    figures = (f"falls behind, {victim}: statuses {counts}; assembler frames_overwritten "
               f"{assembler['frames_overwritten']:.0f}, images_missing_module {assembler['images_missing_module']:.0f}, "
               f"late_frames {assembler.get('late_frames', 0):.0f}, restarts {sum(c.restarts for c in pipe.launcher.children)}; "
               f"summary images_lost "
               f"{summary['images_lost']}; {jumps} id gap(s), {skipped} ids skipped")
    print("\n" + figures)  # before the checks: a failure shows what happened
    assert len(ids) == 200 and summary["images_written"] + summary["images_lost"] == 200
    assert summary["images_lost"] == n_lost  # the writer's overwrites, reported to the user
    assert counts.get(MISSING_MODULE, 0) <= assembler["images_missing_module"]
    assert counts.get(MISSING_PACKETS, 0) <= assembler["images_missing_packets"]
    if victim == "assembler":
        assert assembler["frames_overwritten"] > 0, figures  # the receivers lapped it: detected and counted
    else:
        assert n_lost > 0  # the assembler lapped it: detected, recorded as status 4 and counted
    assert_no_wrong_pixel(config, data, ids, statuses)
    assert_summary_reports(summary, ids, statuses)


def test_a_broker_restart_during_a_write_loses_neither_the_data_nor_the_final_status(
        pipeline_config, pipelines, client, broker_url, tmp_path):
    """RabbitMQ's application is stopped and started again mid-write: the data path never needed it, so the
    file is complete; the agent reconnects with backoff and publishes the final status it owes."""
    import shutil
    import subprocess

    from tests.e2e.protocol_client import ProtocolClient

    if shutil.which("rabbitmqctl") is None:
        skip_or_fail("rabbitmqctl is not installed (the broker runs elsewhere)")
    path, config = pipeline_config(writer_agent={"reconnect_max_s": 1.0})
    pipe = pipelines(path, config)
    pipe.simulate("--rate", "50", "--n-images", "forever")
    out = tmp_path / "out" / "restart.h5"
    request_id = write(client, config, out, 500)  # 10 s at 50 Hz: it outlasts the restart
    client.wait(request_id, timeout_s=30, until="request_progress")
    try:
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
    client.close()
    deadline = time.monotonic() + 60
    while True:  # a new client, as soon as the broker takes connections again
        try:
            again = ProtocolClient(broker_url)
            break
        except Exception:  # noqa: BLE001 - pika's connection errors while the broker boots
            assert time.monotonic() < deadline, "the broker did not come back"
            time.sleep(0.5)
    try:
        outcome = again.wait(request_id, timeout_s=60)
    finally:
        again.close()
    assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
    data, ids, statuses, attrs = read(out, config.detector_name)
    assert attrs["state"] == "complete" and data.shape[0] == 500
    assert_no_wrong_pixel(config, data, ids, statuses)
