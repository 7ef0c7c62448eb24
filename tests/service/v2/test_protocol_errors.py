"""Requests the v2 routes refuse, answered in the protocol's {"error": ...} body with the right status: paths and
methods no route takes, and JSON booleans sent as numeric data."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from support.server import serving

from service.v2.decode import parse_infer_request
from service.v2.errors import ProtocolError

MODEL = "vitae_fmnist"


@pytest.fixture(scope="module")
def url(artifacts):
    with serving(artifacts) as base:
        yield base


@pytest.mark.parametrize(
    ("method", "path", "status", "fragment"),
    [
        ("GET", "/v2/nothing", 404, "no v2 route at /v2/nothing"),
        ("GET", f"/v2/models/{MODEL}/explain", 404, "POST /infer"),
        ("GET", f"/v2/models/{MODEL}/versions/1/infer/more", 404, "the protocol's routes"),
        ("GET", f"/v2/models/{MODEL}/infer", 405, "GET is not allowed"),
        ("DELETE", "/v2/health/ready", 405, "allowed: GET"),
    ],
)
def test_unknown_v2_paths_and_methods_answer_the_protocols_error_body(url, method, path, status, fragment):
    answer = httpx.request(method, f"{url}{path}", timeout=30)
    assert answer.status_code == status
    assert set(answer.json()) == {"error"} and fragment in answer.json()["error"], answer.json()


def test_paths_outside_v2_keep_fastapis_detail_body(url):
    answer = httpx.get(f"{url}/nothing-here", timeout=30)
    assert answer.status_code == 404 and set(answer.json()) == {"detail"}


@pytest.mark.parametrize("data", [[True, False, True, False], [0.5, True, 0.25, 0.0], [[0.5, 0.1], [False, 0.2]]])
def test_json_booleans_are_refused_as_fp32_data_naming_the_input_and_the_accepted_types(url, data):
    body = {"inputs": [{"name": "images", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": data}]}
    answer = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert "input 'images'" in error and "true or false" in error and "accepted: numbers" in error, error


def test_numbers_equal_to_one_and_zero_are_still_fp32_data():
    body = b'{"inputs": [{"name": "images", "shape": [1, 4], "datatype": "FP32", "data": [1, 0, 1.0, 0.0]}]}'
    (tensor,) = parse_infer_request(body).inputs
    assert tensor.data.dtype == np.float32 and tensor.data.tolist() == [[1, 0, 1, 0]]
    with pytest.raises(ProtocolError, match="true or false"):
        parse_infer_request(body.replace(b"1.0", b"true"))
