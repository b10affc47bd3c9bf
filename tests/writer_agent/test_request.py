"""Write-request validation as pure logic: whatever the body, a WriteRequest or a BadRequest, nothing else."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from writer_agent.request import BadRequest, WriteRequest, parse_request

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=10)


def parse(body: bytes, tmp: str) -> WriteRequest:
    return parse_request("r-1", body, output_dirs=(tmp,), overwrite=False, max_images=1000)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_random_bytes_are_refused_with_a_reason(tmp_path_factory, body):
    tmp = str(tmp_path_factory.getbasetemp())
    try:
        parse(body, tmp)
    except BadRequest as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(output_file=JSON_VALUES, n_images=JSON_VALUES, extra=st.dictionaries(st.text(), JSON_VALUES, max_size=3))
def test_mistyped_fields_are_refused_and_good_ones_pass(tmp_path_factory, output_file, n_images, extra):
    tmp = str(tmp_path_factory.getbasetemp())
    body = {**extra, "output_file": output_file, "n_images": n_images}
    try:
        request = parse(json.dumps(body).encode(), tmp)
    except BadRequest as exc:
        assert str(exc)
        return
    assert isinstance(n_images, int) and not isinstance(n_images, bool) and 1 <= n_images <= 1000
    assert request.output_file.startswith(tmp) and request.body == body


def test_a_good_request_keeps_its_extra_keys_and_defaults_run_and_user(tmp_path):
    request = parse(json.dumps({"output_file": f"{tmp_path}/a.h5", "n_images": 3, "sample": "lysozyme"}).encode(),
                    str(tmp_path))
    assert (request.n_images, request.user_id, request.body["sample"]) == (3, 0, "lysozyme")
    assert request.run_id > 0


def test_a_count_above_the_maximum_is_refused_naming_the_config_key(tmp_path):
    body = json.dumps({"output_file": f"{tmp_path}/a.h5", "n_images": 1001}).encode()
    with pytest.raises(BadRequest) as refused:
        parse(body, str(tmp_path))
    assert str(refused.value) == ("'n_images' must be between 1 and 1000, got 1001 "
                                  "(1000 is the detector config's writer_agent.max_images)")
