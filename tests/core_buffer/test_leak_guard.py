"""The guard of tests/conftest.py, run on tests that leak: each runs in a pytest of its own (pytester, a real
subprocess) with the project's conftest, real shared memory and real child processes."""
from __future__ import annotations

import os
import re
import textwrap
import uuid
from pathlib import Path

import psutil
import pytest

from core_buffer.ringbuffer import SHM_DIR, unlink

ROOT = Path(__file__).resolve().parents[2]

LEAKY_TESTS = '''
import json
import subprocess
import sys

from core_buffer import FrameBuffer, load_config
from core_buffer.formats import ModuleFrame
from core_buffer.ringbuffer import BufferLayout

PROBE = "{probe}"
LAYOUT = BufferLayout(2, 1, ModuleFrame.SIZE, 4096)
CREATE = "from core_buffer import FrameBuffer; from core_buffer.formats import ModuleFrame; " \\
         "from core_buffer.ringbuffer import BufferLayout; " \\
         "FrameBuffer(sys.argv[1], BufferLayout(2, 1, ModuleFrame.SIZE, 4096)).close()"


def create_in_child(name):
    subprocess.run([sys.executable, "-c", "import sys; " + CREATE, name], check=True, timeout=60)


def test_clean(make_config):
    _, config = make_config()
    buf = FrameBuffer.for_config(config)
    buf.close()
    buf.unlink()
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_leaves_a_segment_under_its_own_name():
    FrameBuffer(f"std-daq-auditprobe{{PROBE}}-frames", LAYOUT).close()


def test_leaves_a_segment_of_a_make_config_config(make_config):
    _, config = make_config()
    FrameBuffer.for_config(config).close()


def test_leaves_a_segment_its_child_made_from_a_config_it_loaded(tmp_path):
    raw = {{"detector_name": f"child{{PROBE}}", "detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
           "image_pixel_height": 512, "image_pixel_width": 1024, "start_udp_port": 50000}}
    (tmp_path / "det.json").write_text(json.dumps(raw))
    config = load_config(tmp_path / "det.json")
    create_in_child(f"std-daq-{{config.detector_name}}-frames")


def test_is_not_blamed_for_a_segment_of_somebody_else():
    create_in_child(f"std-daq-other{{PROBE}}-frames")  # a name this test never made nor loaded


def test_leaves_a_child_process_running():
    subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(600)", f"sleeper{{PROBE}}"])
'''


@pytest.fixture
def leaky(pytester, monkeypatch):
    """Run the leaky tests above in a pytest of their own with the project's conftest; returns
    (run(*args) -> RunResult, probe)."""
    probe = uuid.uuid4().hex[:10]
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeconftest('pytest_plugins = ["tests.conftest"]\n')
    pytester.makepyfile(test_leaky=LEAKY_TESTS.format(probe=probe))

    def run(*args: str):
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *args, timeout=180)

    yield run, probe
    for name in (f"std-daq-auditprobe{probe}-frames", f"std-daq-child{probe}-frames", f"std-daq-other{probe}-frames"):
        unlink(name)
    for proc in psutil.process_iter(["cmdline"]):
        if f"sleeper{probe}" in " ".join(proc.info["cmdline"] or []):
            proc.kill()


def outcomes(result) -> dict[str, str]:
    """test name -> its outcomes from the -rA summary ("PASSED", "PASSED ERROR", ...), each ERROR followed
    by the message of its teardown error."""
    errors, current = {}, None
    for line in result.outlines:
        heading = re.match(r"^_+ ERROR at teardown of (\w+) _+$", line)
        if heading:
            current = heading[1]
            errors[current] = ""
        elif re.match(r"^(=+|_+) ", line):
            current = None
        elif current:
            errors[current] += line + "\n"
    found: dict[str, list[str]] = {}
    for line in result.outlines:
        m = re.match(r"^(PASSED|ERROR|FAILED|SKIPPED) test_leaky\.py::(\w+)", line)
        if m:
            found.setdefault(m[2], []).append(m[1] + (": " + errors.get(m[2], "") if m[1] == "ERROR" else ""))
    return {name: " ".join(parts).strip() for name, parts in found.items()}


def test_the_guard_fails_a_test_for_each_segment_and_child_it_leaves(leaky):
    run, probe = leaky
    result = run("-v")
    seen = outcomes(result)
    assert seen["test_clean"].strip() == "PASSED"
    assert "ERROR" in seen["test_leaves_a_segment_under_its_own_name"]
    assert f"segments left behind: std-daq-auditprobe{probe}-frames" in seen["test_leaves_a_segment_under_its_own_name"]
    assert "ERROR" in seen["test_leaves_a_segment_its_child_made_from_a_config_it_loaded"]
    assert f"segments left behind: std-daq-child{probe}-frames" in \
        seen["test_leaves_a_segment_its_child_made_from_a_config_it_loaded"]
    assert "ERROR" in seen["test_leaves_a_child_process_running"]
    assert "child processes left running" in seen["test_leaves_a_child_process_running"]
    assert seen["test_is_not_blamed_for_a_segment_of_somebody_else"].strip() == "PASSED"
    # By default make_config removes its configs' segments and lists them in the summary.
    assert seen["test_leaves_a_segment_of_a_make_config_config"].strip() == "PASSED"
    result.stdout.fnmatch_lines(["*segments make_config removed*",
                                 "*test_leaky.py::test_leaves_a_segment_of_a_make_config_config: std-daq-t*-frames"])
    # What the guard blamed it removed or killed; the other run's segment it left alone.
    shm = set(os.listdir(SHM_DIR))
    assert f"std-daq-auditprobe{probe}-frames" not in shm and f"std-daq-child{probe}-frames" not in shm
    assert f"std-daq-other{probe}-frames" in shm
    assert not [p for p in psutil.process_iter(["cmdline"]) if f"sleeper{probe}" in " ".join(p.info["cmdline"] or [])]


def test_with_strict_segments_make_config_fails_the_test_whose_segments_it_removed(leaky):
    run, probe = leaky
    result = run("--strict-segments", "-k", "make_config or clean")
    seen = outcomes(result)
    assert seen["test_clean"].strip() == "PASSED"
    blamed = seen["test_leaves_a_segment_of_a_make_config_config"]
    assert "ERROR" in blamed
    assert re.search(r"make_config had to remove shared-memory segments the test left behind: std-daq-t\w+-frames",
                     blamed), blamed


SKIPPING_TEST = '''
from tests.conftest import skip_or_fail


def test_needs_a_frobnicator():
    skip_or_fail("no frobnicator here")
'''


@pytest.mark.parametrize("ci,outcome", [(None, "skipped"), ("", "skipped"), ("false", "skipped"),
                                        ("true", "failed"), ("1", "failed")])
def test_skip_or_fail_skips_outside_ci_and_fails_in_ci(pytester, monkeypatch, ci, outcome):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makeconftest('pytest_plugins = ["tests.conftest"]\n')
    pytester.makepyfile(test_skipping=textwrap.dedent(SKIPPING_TEST))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", timeout=120)
    result.assert_outcomes(**{outcome: 1})
    result.stdout.fnmatch_lines(["*no frobnicator here*"])
