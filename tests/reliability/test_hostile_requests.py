"""A corpus of broken and hostile write requests against a real writer_agent and std_h5_writer: each is
answered with request_start then request_fail and a reason that names the problem (the key that is
missing or wrong, or what is wrong with the body or the path), no file appears, and the agent serves the
next good request. The corpus: hand-picked cases (types, numbers, strings, unicode, path tricks, bodies
that are not JSON objects) plus generated random JSON bodies; its size is in docs/reliability.md."""
from __future__ import annotations

import json
import os
import random
import re

import pytest

from core_buffer import broker
from tests.writer_agent.rig import rig  # noqa: F401 - the fixture

pytestmark = pytest.mark.broker

N_RANDOM = 60
MAX_IMAGES = 5000  # the rig's writer_agent max_images


# What a refusal must say, by what is wrong with the request: regular expressions on the reason.
NOT_JSON = r"^the request body is not JSON \("
NOT_UTF8 = r"^the request body is not UTF-8 \("
NOT_OBJECT = r"^the request body must be a JSON object, got "
TOO_DEEP = r"nests JSON arrays or objects too deeply"
TOO_LONG = r"^the request body is \d+ bytes; at most \d+ are accepted"


def missing(key: str) -> str:
    return rf"^the request lacks the key '{key}'"


def not_an_int(key: str) -> str:
    return rf"^'{key}' must be an integer, got "


def out_of_range(key: str) -> str:
    return rf"^'{key}' must be between \d+ and \d+, got "


def path(problem: str) -> str:
    """A refusal of output_file for `problem` (core_buffer.output's words)."""
    return rf"output_file.*{problem}"


def hand_picked(out: str) -> list[tuple[bytes, str]]:
    """(body, what its refusal must say) for each hand-picked case."""
    ok = f"{out}/fine.h5"
    cases: list[tuple[object, str]] = [
        # not a JSON object
        (b"", NOT_JSON), (b"   ", NOT_JSON), (b"null", NOT_OBJECT), (b"true", NOT_OBJECT), (b"17", NOT_OBJECT),
        (b'"a string"', NOT_OBJECT), (b"[]", NOT_OBJECT), (b"\xef\xbb\xbf{}", NOT_JSON + "Unexpected UTF-8 BOM"),
        (json.dumps({"output_file": ok, "n_images": 1}).encode("utf-16"), NOT_UTF8), (b"{" * 30000, NOT_JSON),
        (b"[" * 60000, TOO_DEEP), (b'{"output_file": "' + ok.encode() + b'", "n_images": 1', NOT_JSON),
        (b"\x00" * 100, NOT_JSON), (os.urandom(512), f"{NOT_UTF8}|{NOT_JSON}"),
        # wrong types and values
        ({"output_file": ok}, missing("n_images")), ({"n_images": 3}, missing("output_file")),
        ({"output_file": ok, "n_images": None}, not_an_int("n_images")),
        ({"output_file": ok, "n_images": [1]}, not_an_int("n_images")),
        ({"output_file": ok, "n_images": {"n": 1}}, not_an_int("n_images")),
        ({"output_file": ok, "n_images": "1e3"}, not_an_int("n_images")),
        ({"output_file": ok, "n_images": 1.0}, not_an_int("n_images")),
        ({"output_file": ok, "n_images": -1}, out_of_range("n_images")),
        ({"output_file": ok, "n_images": 2**32}, out_of_range("n_images")),
        ({"output_file": ok, "n_images": 2**64}, out_of_range("n_images")),
        ({"output_file": ok, "n_images": 1, "run_id": "7"}, not_an_int("run_id")),
        ({"output_file": ok, "n_images": 1, "run_id": 2**64}, out_of_range("run_id")),
        ({"output_file": ok, "n_images": 1, "user_id": -5}, out_of_range("user_id")),
        ({"output_file": ok, "n_images": 1, "user_id": 2**40}, out_of_range("user_id")),
        ({"output_file": None, "n_images": 1}, r"^'output_file' must be a string, got NoneType"),
        ({"output_file": [ok], "n_images": 1}, r"^'output_file' must be a string, got list"),
        ({"output_file": True, "n_images": 1}, r"^'output_file' must be a string, got bool"),
        # huge numbers and strings
        (b'{"output_file": "' + ok.encode() + b'", "n_images": 1' + b"0" * 5000 + b"}",
         NOT_JSON + r"Exceeds the limit \(4300 digits\)"),  # Python's own limit on integer digits
        (b'{"output_file": "' + ok.encode() + b'", "n_images": 1e999}', not_an_int("n_images") + "float inf"),
        (b'{"output_file": "' + ok.encode() + b'", "n_images": NaN}', not_an_int("n_images") + "float nan"),
        ({"output_file": out + "/" + "x" * 60000, "n_images": 1}, r"^'output_file' is 60\d{3} characters long"),
        ({"output_file": out + "/" + "d/" * 2100 + "x.h5", "n_images": 1}, r"^'output_file' is \d+ characters long"),
        ({"output_file": ok, "n_images": 1, "note": "y" * 70000}, TOO_LONG),
        # unicode
        ({"output_file": f"{out}/\u202etxt.h5", "n_images": 0}, out_of_range("n_images")),
        ({"output_file": f"{out}/\ud800.h5", "n_images": 1}, path("has a character no file name can hold")),
        ({"output_file": f"{out}/\U0001f4a5/\u00e9.h5", "n_images": 1}, path("does not exist")),
        ({"output_file": "\uff0fetc\uff0fx.h5", "n_images": 1}, path("must be an absolute path")),
        # path tricks
        ({"output_file": "x.h5", "n_images": 1}, path("must be an absolute path")),
        ({"output_file": "~/x.h5", "n_images": 1}, path("must be an absolute path")),
        ({"output_file": "$HOME/x.h5", "n_images": 1}, path("must be an absolute path")),
        ({"output_file": f"file://{ok}", "n_images": 1}, path("must be an absolute path")),
        ({"output_file": f"{out}/../x.h5", "n_images": 1}, path("is outside the allowed directories")),
        ({"output_file": f"{out}/./../../etc/x.h5", "n_images": 1}, path("is outside the allowed directories")),
        ({"output_file": "/etc/passwd", "n_images": 1}, path("is outside the allowed directories")),
        ({"output_file": "/proc/self/cwd/x.h5", "n_images": 1}, path("is outside the allowed directories")),
        ({"output_file": "/dev/null", "n_images": 1}, path("is outside the allowed directories")),
        ({"output_file": f"{out}/", "n_images": 1}, path("names a directory, not a file")),
        ({"output_file": f"{out}/.", "n_images": 1}, path("names a directory, not a file")),
        ({"output_file": f"{out}/x.h5\x00.txt", "n_images": 1}, path("contains a NUL byte")),
        ({"output_file": f"{out}/escape/x.h5", "n_images": 1}, path("is outside the allowed directories")),
        ({"output_file": f"{out}/exists.h5", "n_images": 1}, path("already exists")),
        ({"output_file": f"{out}/link.h5", "n_images": 1}, path("is a symbolic link")),
        ({"output_file": f"{out}/missing/x.h5", "n_images": 1}, path("does not exist")),
    ]
    return [(b if isinstance(b, bytes) else json.dumps(b).encode(), expected) for b, expected in cases]


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


def wrong_keys(value: object, out: str, max_images: int) -> list[str]:
    """The keys of a request body that are missing or wrong (every generated body has at least one)."""
    if not isinstance(value, dict):
        return []

    def bad_int(key: str, lo: int, hi: int, required: bool) -> bool:
        if key not in value:
            return required
        v = value[key]
        return isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi

    wrong = [key for key, lo, hi, required in (("n_images", 1, max_images, True), ("run_id", 0, 2**64 - 1, False),
                                               ("user_id", 0, 2**32 - 1, False)) if bad_int(key, lo, hi, required)]
    if not isinstance(value.get("output_file"), str) or not value["output_file"].startswith(out + "/"):
        wrong.append("output_file")
    return wrong


def generated(out: str, n: int, max_images: int) -> list[tuple[bytes, str]]:
    """Random JSON bodies, and what their refusal must say: that the body is not an object, or the name
    of a key that is missing or wrong in it. The few that would be a valid request are left out (this
    corpus is of bad ones)."""
    rng = random.Random(2026)
    cases = []
    while len(cases) < n:
        value = random_json(rng)
        if isinstance(value, dict) and isinstance(value.get("n_images"), int) and isinstance(
                value.get("output_file"), str) and value["output_file"].startswith(out):
            continue
        wrong = wrong_keys(value, out, max_images)
        assert wrong or not isinstance(value, dict), value  # an empty pattern would match any reason
        expected = NOT_OBJECT if not isinstance(value, dict) else "|".join(f"'?{key}'?" for key in wrong)
        cases.append((json.dumps(value).encode(), expected))
    return cases


def test_every_hostile_request_fails_with_a_reason_naming_its_problem_and_nothing_else_changes(
        rig, tmp_path):  # noqa: F811
    r = rig()
    assert r.config.sections["writer_agent"]["max_images"] == MAX_IMAGES
    out = str(r.out)
    (r.out / "exists.h5").write_bytes(b"")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, r.out / "escape")
    os.symlink(outside / "target.h5", r.out / "link.h5")
    before = sorted(p.name for p in r.out.iterdir())
    corpus = hand_picked(out) + generated(out, N_RANDOM, MAX_IMAGES)
    ids = [r.client.submit_raw(body, tag=r.tag) for body, _ in corpus]
    for request_id, (body, expected) in zip(ids, corpus):
        result = r.client.wait(request_id, timeout_s=30)
        assert not result.ok, body[:200]
        assert [s.action for s in result.statuses] == [broker.REQUEST_START, broker.REQUEST_FAIL], body[:200]
        assert 0 < len(result.message) < 5000, body[:200]
        assert re.search(expected, result.message), (expected, result.message[:300], body[:200])
    assert r.agent.proc.poll() is None and r.writer.proc.poll() is None
    assert sorted(p.name for p in r.out.iterdir()) == before
    assert list(outside.iterdir()) == []
    good = r.client.write(str(r.out / "after.h5"), 5, tag=r.tag, timeout_s=30)
    assert good.ok, good.message
    print(f"\nhostile requests: {len(corpus)} refused ({len(corpus) - N_RANDOM} hand-picked, {N_RANDOM} generated), "
          "each reason naming its problem")
