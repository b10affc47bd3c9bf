"""A corpus of broken and hostile write requests against a real writer_agent and std_h5_writer: each is
answered with request_start then request_fail and a reason, no file appears, and the agent serves the
next good request. The corpus: hand-picked cases (types, numbers, strings, unicode, path tricks, bodies
that are not JSON objects) plus generated random JSON bodies; its size is in docs/reliability.md."""
from __future__ import annotations

import json
import os
import random

import pytest

from core_buffer import broker
from tests.writer_agent.rig import rig  # noqa: F401 - the fixture

pytestmark = pytest.mark.broker

N_RANDOM = 60


def hand_picked(out: str) -> list[bytes]:
    ok = f"{out}/fine.h5"
    bodies: list[object] = [
        # not a JSON object
        b"", b"   ", b"null", b"true", b"17", b'"a string"', b"[]", b"\xef\xbb\xbf{}",
        json.dumps({"output_file": ok, "n_images": 1}).encode("utf-16"), b"{" * 30000, b"[" * 60000,
        b'{"output_file": "' + ok.encode() + b'", "n_images": 1', b"\x00" * 100, os.urandom(512),
        # wrong types and values
        {"output_file": ok}, {"n_images": 3}, {"output_file": ok, "n_images": None},
        {"output_file": ok, "n_images": [1]}, {"output_file": ok, "n_images": {"n": 1}},
        {"output_file": ok, "n_images": "1e3"}, {"output_file": ok, "n_images": 1.0},
        {"output_file": ok, "n_images": -1}, {"output_file": ok, "n_images": 2**32},
        {"output_file": ok, "n_images": 2**64}, {"output_file": ok, "n_images": 1, "run_id": "7"},
        {"output_file": ok, "n_images": 1, "run_id": 2**64}, {"output_file": ok, "n_images": 1, "user_id": -5},
        {"output_file": ok, "n_images": 1, "user_id": 2**40}, {"output_file": None, "n_images": 1},
        {"output_file": [ok], "n_images": 1}, {"output_file": True, "n_images": 1},
        # huge numbers and strings
        b'{"output_file": "' + ok.encode() + b'", "n_images": 1' + b"0" * 5000 + b"}",
        b'{"output_file": "' + ok.encode() + b'", "n_images": 1e999}',
        b'{"output_file": "' + ok.encode() + b'", "n_images": NaN}',
        {"output_file": out + "/" + "x" * 60000, "n_images": 1},
        {"output_file": out + "/" + "d/" * 2100 + "x.h5", "n_images": 1},
        {"output_file": ok, "n_images": 1, "note": "y" * 70000},
        # unicode
        {"output_file": f"{out}/\u202etxt.h5", "n_images": 0}, {"output_file": f"{out}/\ud800.h5", "n_images": 1},
        {"output_file": f"{out}/\U0001f4a5/\u00e9.h5", "n_images": 1}, {"output_file": "\uff0fetc\uff0fx.h5", "n_images": 1},
        # path tricks
        {"output_file": "x.h5", "n_images": 1}, {"output_file": "~/x.h5", "n_images": 1},
        {"output_file": "$HOME/x.h5", "n_images": 1}, {"output_file": f"file://{ok}", "n_images": 1},
        {"output_file": f"{out}/../x.h5", "n_images": 1}, {"output_file": f"{out}/./../../etc/x.h5", "n_images": 1},
        {"output_file": "/etc/passwd", "n_images": 1}, {"output_file": "/proc/self/cwd/x.h5", "n_images": 1},
        {"output_file": "/dev/null", "n_images": 1}, {"output_file": f"{out}/", "n_images": 1},
        {"output_file": f"{out}/.", "n_images": 1}, {"output_file": f"{out}/x.h5\x00.txt", "n_images": 1},
        {"output_file": f"{out}/escape/x.h5", "n_images": 1}, {"output_file": f"{out}/exists.h5", "n_images": 1},
        {"output_file": f"{out}/link.h5", "n_images": 1}, {"output_file": f"{out}/missing/x.h5", "n_images": 1},
    ]
    return [b if isinstance(b, bytes) else json.dumps(b).encode() for b in bodies]


def random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**70), rng.randrange(-10**6, 10**6)])
    if kind == 3:
        return rng.choice([0.5, -1e300, 1e-300, 3.0])
    if kind == 4:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0x2FFF)]))
                       for _ in range(rng.randrange(0, 40)))
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys = ["output_file", "n_images", "run_id", "user_id", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def generated(out: str, n: int) -> list[bytes]:
    """Random JSON bodies; the few that would be a valid request are left out (this corpus is of bad ones)."""
    rng = random.Random(2026)
    bodies = []
    while len(bodies) < n:
        value = random_json(rng)
        if isinstance(value, dict) and isinstance(value.get("n_images"), int) and isinstance(
                value.get("output_file"), str) and value["output_file"].startswith(out):
            continue
        bodies.append(json.dumps(value).encode())
    return bodies


def test_every_hostile_request_fails_with_a_reason_and_nothing_else_changes(rig, tmp_path):  # noqa: F811
    r = rig()
    out = str(r.out)
    (r.out / "exists.h5").write_bytes(b"")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, r.out / "escape")
    os.symlink(outside / "target.h5", r.out / "link.h5")
    before = sorted(p.name for p in r.out.iterdir())
    corpus = hand_picked(out) + generated(out, N_RANDOM)
    ids = [r.client.submit_raw(body, tag=r.tag) for body in corpus]
    for request_id, body in zip(ids, corpus):
        result = r.client.wait(request_id, timeout_s=30)
        assert not result.ok, body[:200]
        assert [s.action for s in result.statuses] == [broker.REQUEST_START, broker.REQUEST_FAIL], body[:200]
        assert 0 < len(result.message) < 5000, body[:200]
    assert r.agent.proc.poll() is None and r.writer.proc.poll() is None
    assert sorted(p.name for p in r.out.iterdir()) == before
    assert list(outside.iterdir()) == []
    good = r.client.write(str(r.out / "after.h5"), 5, tag=r.tag, timeout_s=30)
    assert good.ok, good.message
    print(f"\nhostile requests: {len(corpus)} refused ({len(corpus) - N_RANDOM} hand-picked, {N_RANDOM} generated)")
