"""The KServe v2 wire format without HTTP: tritonclient's own request bodies in, its own response parser out."""

from __future__ import annotations

import gzip
import json
import zlib

import numpy as np
import pytest
from support.optional import DEV_ONLY

from service import v2

triton = pytest.importorskip("tritonclient.http", reason=f"tritonclient is {DEV_ONLY}")
serialize_byte_tensor = pytest.importorskip("tritonclient.utils").serialize_byte_tensor


def request_body(*inputs: triton.InferInput, **kwargs) -> tuple[bytes, str | None]:
    body, json_size = triton.InferenceServerClient.generate_request_body(list(inputs), **kwargs)
    return body, None if json_size is None else str(json_size)


def fp32(name: str, array: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_fp32_requests_parse_to_the_same_array(binary):
    array = np.random.default_rng(0).standard_normal((2, 1, 4, 4)).astype(np.float32)
    body, header_length = request_body(fp32("images", array, binary))
    parsed = v2.parse_infer_request(body, header_length)
    (tensor,) = parsed.inputs
    assert (tensor.name, tensor.datatype, tensor.shape, tensor.binary) == ("images", "FP32", (2, 1, 4, 4), binary)
    np.testing.assert_array_equal(tensor.data, array)
    assert parsed.outputs is None and parsed.binary_default  # tritonclient asks binary outputs when it lists none


def test_tritonclient_bytes_and_a_second_input_share_the_binary_section_in_order():
    items = np.array([b"\x89PNG\0raw", b"", b"jpeg\xff\xd8"], dtype=object)
    tensor = triton.InferInput("image_bytes", [3], "BYTES")
    tensor.set_data_from_numpy(items)
    ints = triton.InferInput("extra", [2], "INT64")
    ints.set_data_from_numpy(np.array([7, -1], np.int64))
    outputs = [triton.InferRequestedOutput("logits", binary_data=False, class_count=2)]
    body, header_length = triton.InferenceServerClient.generate_request_body(
        [tensor, ints], outputs=outputs, request_id="r1"
    )
    parsed = v2.parse_infer_request(body, str(header_length))
    assert parsed.id == "r1"
    assert parsed.inputs[0].data == list(items)
    np.testing.assert_array_equal(parsed.inputs[1].data, [7, -1])
    assert parsed.outputs == [v2.RequestedOutput("logits", binary=False, classification=2)]


def test_pack_bytes_is_tritons_serialization():
    items = [b"a", b"", b"\0\1\2" * 100]
    assert v2.pack_bytes(items) == serialize_byte_tensor(np.array(items, dtype=object)).item()
    assert v2.unpack_bytes(v2.pack_bytes(items)) == items


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_responses_parse_in_tritonclient(binary):
    logits = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    labels = ["a", "b", "c", "d", "e"]
    top = v2.classification_strings(logits, 2, labels)
    outputs = [
        (v2.Tensor("logits", "FP32", logits.shape, logits), binary),
        (v2.Tensor("top", "BYTES", (3, 2), top), binary),
    ]
    body, headers = v2.encode_infer_response("m", "1", "req", outputs)
    assert ("inference-header-content-length" in headers) is binary
    result = triton.InferenceServerClient.parse_response_body(
        body, header_length=headers.get("inference-header-content-length")
    )
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    strings = result.as_numpy("top")
    assert strings.shape == (3, 2)
    for row, scores in zip(strings, logits, strict=True):
        score, index, label = (row[0].decode() if isinstance(row[0], bytes) else row[0]).split(":")
        assert int(index) == int(np.argmax(scores)) and label == labels[int(index)]
        assert float(score) == pytest.approx(float(scores.max()))
    assert result.get_response()["id"] == "req" and result.get_response()["model_version"] == "1"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_bodies_inflate(encoding):
    body, _ = request_body(fp32("images", np.ones((1, 1, 2, 2), np.float32), False))
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    assert v2.inflate(packed, encoding, limit=10_000) == body
    assert v2.inflate(body, None, limit=10) == body  # uncompressed bodies are left to the body limit


def test_a_compression_bomb_stops_at_the_limit():
    with pytest.raises(v2.ProtocolError, match="inflates past the limit of 1000 bytes") as caught:
        v2.inflate(gzip.compress(b"\0" * 10_000_000), "gzip", limit=1000)
    assert caught.value.status == 413
    with pytest.raises(v2.ProtocolError, match="gzip, deflate") as caught:
        v2.inflate(b"x", "br", limit=1000)
    assert caught.value.status == 415


def json_request(**entry) -> bytes:
    return json.dumps({"inputs": [{"name": "images", "shape": [1, 2], "datatype": "FP32"} | entry]}).encode()


@pytest.mark.parametrize(
    ("body", "header_length", "fragment"),
    [
        (json_request(data=[1.0]), None, "shape [1, 2] needs 2 values, 'data' holds 1"),
        (json_request(data=[1.0, "x"]), None, "FP32 data must be numbers"),
        (json_request(data=[1.0, None]), None, "FP32 data must be numbers"),
        (json_request(data=[[1.0], [2.0, 3.0]]), None, "nested lists of one shape"),
        (json_request(datatype="FLOAT", data=[1, 2]), None, "'FLOAT' is not a protocol datatype"),
        (json_request(shape=[1, -2], data=[1, 2]), None, "non-negative integers"),
        (json_request(), None, "neither 'data' nor parameters.binary_data_size"),
        (json_request(data=[1, 2], parameters={"binary_data_size": 8}), "__len__", "either 'data' or"),
        (json_request(parameters={"binary_data_size": 4}), "__len__+4", "needs 8 bytes; binary_data_size is 4"),
        (json_request(data=[1, 2]), "__len__+3", "3 bytes of binary data"),
        (b'{"inputs": [{"name": "images"}]}', None, "datatype None"),
        (b'{"inputs": [1]}', None, "inputs[0] must be an object"),
        (b"[]", None, "JSON object"),
        (json_request(data=[1, 2])[:-1] + b', "outputs": {}}', None, "'outputs' must be a list"),
    ],
)
def test_malformed_requests_name_the_problem(body, header_length, fragment):
    if header_length is not None:  # a JSON header followed by that many bytes of binary data
        extra = int(header_length.partition("+")[2] or 0)
        header_length, body = str(len(body)), body + b"\0" * extra
    with pytest.raises(v2.ProtocolError, match=None) as caught:
        v2.parse_infer_request(body, header_length)
    assert fragment in str(caught.value) and caught.value.status == 400


def test_nested_json_data_reads_like_flat_data():
    nested = v2.parse_infer_request(json_request(data=[[1.5, -2]])).inputs[0]
    flat = v2.parse_infer_request(json_request(data=[1.5, -2])).inputs[0]
    assert nested.data.dtype == flat.data.dtype == np.float32
    np.testing.assert_array_equal(nested.data, [[1.5, -2.0]])
    np.testing.assert_array_equal(flat.data, nested.data)


def test_check_input_names_the_accepted_datatype_and_shape():
    tensor = v2.Tensor("images", "FP32", (2, 3, 8, 8), np.zeros((2, 3, 8, 8), np.float32))
    v2.check_input(tensor, "FP32", (-1, 3, 8, 8))
    with pytest.raises(v2.ProtocolError, match=r"shape \[2, 3, 8, 8\]; this model takes \[-1, 1, 8, 8\]"):
        v2.check_input(tensor, "FP32", (-1, 1, 8, 8))
    with pytest.raises(v2.ProtocolError, match="datatype FP32; this model takes FP16"):
        v2.check_input(tensor, "FP16", (-1, 3, 8, 8))
