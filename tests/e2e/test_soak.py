"""A pipeline at a steady rate, writing file after file, watched for growth: memory (RSS) and open file
descriptors of every service, shared-memory segments and ipc sockets of the detector. No packet may be
lost and no service restarted meanwhile.

RSS may grow from the sample a third of the way in to the last by a fixed step (an allocator arena or heap
grown once) plus a rate times the time between them: the allowance scales with the duration, so a long
soak does not hide a leak a short one would show, nor a short one flag what a steady rate of growth
explains. The fitted growth rate (least squares over the samples from a third of the way in) is printed.

The duration is STD_DAQ_SOAK_S seconds: 45 by default (what .ci/run runs), 600 for the 10-minute soak
whose figures are in docs/reliability.md:

    STD_DAQ_SOAK_S=600 .venv/bin/python -m pytest -s -m soak tests/e2e/test_soak.py
"""
from __future__ import annotations

import os
import time

import numpy as np
import psutil
import pytest

from core_buffer.ringbuffer import SHM_DIR

SOAK_S = float(os.environ.get("STD_DAQ_SOAK_S", "45"))

pytestmark = [pytest.mark.broker, pytest.mark.soak, pytest.mark.timeout(SOAK_S + 180)]
RATE_HZ = 100
IMAGES_PER_FILE = 100
RSS_STEP_BYTES = 4 * 2**20  # growth once (allocator arenas, caches warming up) allowed after the warm-up
# Steady growth allowed on top: 4 KiB/s is 41 B an image at 100 Hz (14 MiB an hour). The 10-minute soak
# measured at most 0.5 MiB over 400 s (1.3 KiB/s).
RSS_GROWTH_BYTES_PER_S = 4 * 2**10


def sample(pipe, config) -> dict[str, tuple[int, int]]:
    """(RSS bytes, open fds) per service, plus the detector's segments and ipc sockets."""
    out = {}
    for child in pipe.launcher.children:
        proc = psutil.Process(child.process.pid)
        out[child.spec.label] = (proc.memory_info().rss, proc.num_fds())
    out["segments"] = (len([n for n in os.listdir(SHM_DIR) if config.detector_name in n]), 0)
    out["ipc sockets"] = (len([n for n in os.listdir(config.ipc_dir) if config.detector_name in n]), 0)
    return out


def test_a_steady_pipeline_does_not_grow(pipeline_config, pipelines, client, tmp_path):
    path, config = pipeline_config(n_modules=2, image_pixel_height=1024, image_buffer_slots=128)
    pipe = pipelines(path, config)
    pids = {c.spec.label: c.process.pid for c in pipe.launcher.children}
    pipe.simulate("--rate", str(RATE_HZ), "--n-images", "forever")
    start = time.monotonic()
    samples: list[tuple[float, dict]] = []
    n_files = 0
    while time.monotonic() - start < SOAK_S:
        out = tmp_path / "out" / f"soak-{n_files}.h5"
        request_id = client.send_write(config.detector_name, {"output_file": str(out), "n_images": IMAGES_PER_FILE})
        outcome = client.wait(request_id, timeout_s=60)
        assert outcome.succeeded, f"{outcome}\n{pipe.log_tail()}"
        out.unlink()  # the disk is not what is soaked
        n_files += 1
        samples.append((time.monotonic() - start, sample(pipe, config)))
    assert len(samples) >= 4, "the soak was too short to compare"
    metrics = pipe.metrics()
    lost = {k: v.get("lost_packets", 0) for k, v in metrics.items() if "udp_recv" in k}
    first = len(samples) // 3  # after start-up allocations settled
    (warm_t, warm), (end_t, end) = samples[first], samples[-1]
    print(f"\nsoak: {SOAK_S:.0f} s at {RATE_HZ} Hz, {n_files} files of {IMAGES_PER_FILE} images")
    for label in end:
        if label in ("segments", "ipc sockets"):
            print(f"soak {label}: {warm[label][0]} -> {end[label][0]}")
        else:
            t = np.array([when for when, _ in samples[first:]])
            rss = np.array([sampled[label][0] for _, sampled in samples[first:]], dtype=float)
            slope = np.polyfit(t, rss, 1)[0] if len(t) > 1 else 0.0
            print(f"soak {label}: rss {warm[label][0] / 2**20:.1f} -> {end[label][0] / 2**20:.1f} MiB "
                  f"(fitted {slope / 2**10:+.2f} KiB/s), fds {warm[label][1]} -> {end[label][1]}")
    print(f"soak lost packets: {sum(lost.values()):.0f}; restarts: "
          f"{sum(c.restarts for c in pipe.launcher.children)}")
    for child in pipe.launcher.children:  # no service died and came back meanwhile
        assert child.restarts == 0 and child.process.pid == pids[child.spec.label], child.spec.label
        assert child.process.poll() is None, child.spec.label
    assert not any(lost.values()), lost
    allowed = RSS_STEP_BYTES + RSS_GROWTH_BYTES_PER_S * (end_t - warm_t)
    for label, (rss, fds) in end.items():
        if label in ("segments", "ipc sockets"):
            assert rss == warm[label][0], (label, warm[label], end[label])
            continue
        assert fds <= warm[label][1], (label, "file descriptors", warm[label][1], fds)
        assert rss - warm[label][0] <= allowed, (label, "RSS", warm[label][0], rss, allowed)
