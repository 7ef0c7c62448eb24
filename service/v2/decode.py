"""Infer requests: the body split, the JSON read, every input turned into an array or a list of bytes."""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ProtocolError
from .tensors import DATATYPES, HEADER_LENGTH, NUMPY_TYPES, Tensor, unpack_bytes

# Deepest nesting of arrays and objects accepted in a request's JSON: a request of nested 'data' lists needs
# 3 + its number of dimensions; Python's parser recurses per level and fails past about a thousand.
MAX_JSON_DEPTH = 32


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool  # send as binary tensor data rather than JSON values
    classification: int = 0  # > 0: the top-N classes as "score:index:label" strings instead of the tensor


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: the request named none (the model's default outputs)
    binary_default: bool  # the request's `binary_data_output`: binary for outputs that do not say
    parameters: dict[str, Any] = field(default_factory=dict)


def inflate(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """A body sent with Content-Encoding gzip or deflate (tritonclient's request compression), inflated.

    Inflating stops past `limit` bytes, so a small compressed body cannot expand without bound.
    """
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(
            f"Content-Encoding {encoding} is not accepted; send gzip, deflate or an uncompressed body", 415
        )
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)  # deflate here means the zlib format
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"the body is not valid {encoding} data ({exc})") from None
    if len(data) > limit:
        raise ProtocolError(f"the body inflates past the limit of {limit} bytes (VITAE_MAX_UPLOAD_BYTES)", 413)
    return data


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary data) of a request body, given its Inference-Header-Content-Length (or None)."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer byte count, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes; it must be 1..body size")
    return body[:length], body[length:]


def nests_too_deep(text: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the arrays and objects of a JSON text nest deeper than `limit` (brackets in strings do not count).

    Vectorised, so that a large body costs milliseconds rather than a Python loop per character: a quote is a
    string's edge unless an odd run of backslashes precedes it, and a bracket counts when an even number of
    edges precede it.
    """
    if text.count(b"[") + text.count(b"{") <= limit:
        return False  # the common case, no scan
    chars = np.frombuffer(text, np.uint8)
    positions = np.arange(len(chars), dtype=np.int32)
    last_other = np.maximum.accumulate(np.where(chars != ord("\\"), positions, -1))  # last non-backslash so far
    quotes = np.flatnonzero(chars == ord('"'))
    run = np.where(quotes > 0, quotes - 1 - last_other[np.maximum(quotes - 1, 0)], 0)  # backslashes before each
    edges = np.zeros(len(chars), np.int8)
    edges[quotes[run % 2 == 0]] = 1
    outside = np.cumsum(edges, dtype=np.int32) % 2 == 0  # a string's closing quote counts as outside
    steps = np.zeros(len(chars), np.int8)
    steps[(chars == ord("[")) | (chars == ord("{"))] = 1
    steps[(chars == ord("]")) | (chars == ord("}"))] = -1
    return int(np.cumsum(np.where(outside, steps, 0), dtype=np.int32).max(initial=0)) > limit


def parse_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Body bytes (+ the Inference-Header-Content-Length header, if sent) -> inputs as arrays, outputs asked for."""
    head, binary = split_body(body, header_length)
    if nests_too_deep(head):
        raise ProtocolError(
            f"the request's JSON nests arrays or objects more than {MAX_JSON_DEPTH} deep; a v2 request needs "
            "a few levels (nested 'data' lists at most one per dimension)"
        )
    try:
        request = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        hint = "" if header_length else f" (binary tensor data needs the {HEADER_LENGTH} header)"
        raise ProtocolError(f"the request is not valid JSON: {exc}{hint}") from None
    if not isinstance(request, dict):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    parameters = _parameters(request, "the request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError("the request needs a non-empty 'inputs' list of {name, shape, datatype, data} objects")
    offset = 0
    tensors = []
    for index, entry in enumerate(inputs):
        tensor, offset = _read_input(entry, index, binary, offset)
        tensors.append(tensor)
    if offset != len(binary):
        raise ProtocolError(
            f"the body has {len(binary) - offset} bytes of binary data that no input's binary_data_size accounts for"
        )
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ProtocolError(f"each input may be given once; got {names}")
    binary_default = _flag(parameters.get("binary_data_output", False), "parameters.binary_data_output")
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise ProtocolError("'outputs' must be a list of {name, parameters} objects")
        outputs = [_read_output(entry, index, binary_default) for index, entry in enumerate(outputs)]
    request_id = request.get("id")
    return InferRequest(None if request_id is None else str(request_id), tensors, outputs, binary_default, parameters)


def _parameters(entry: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{where}: 'parameters' must be a JSON object")
    return parameters


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{where} must be true or false, got {value!r}")
    return value


def _read_input(entry: Any, index: int, binary: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ProtocolError(f"inputs[{index}] must be an object with a 'name', 'shape', 'datatype' and 'data'")
    name = entry["name"]
    where = f"input '{name}'"
    datatype = entry.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(f"{where}: datatype {datatype!r} is not a protocol datatype; use one of {list(DATATYPES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    count = math.prod(shape)
    size = _parameters(entry, where).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
        if "data" in entry:
            raise ProtocolError(f"{where}: give either 'data' or parameters.binary_data_size, not both")
        if offset + size > len(binary):
            raise ProtocolError(
                f"{where}: binary_data_size {size} runs past the end of the binary data "
                f"({len(binary) - offset} bytes left after the JSON header)"
            )
        chunk = binary[offset : offset + size]
        data = _from_binary(chunk, datatype, shape, count, where)
        return Tensor(name, datatype, tuple(shape), data, binary=True), offset + size
    if "data" not in entry:
        raise ProtocolError(f"{where} has neither 'data' nor parameters.binary_data_size")
    return Tensor(name, datatype, tuple(shape), _from_json(entry["data"], datatype, shape, count, where)), offset


def _from_binary(chunk: bytes, datatype: str, shape: list[int], count: int, where: str) -> np.ndarray | list[bytes]:
    if datatype == "BYTES":
        items = unpack_bytes(chunk, where)
        if len(items) != count:
            raise ProtocolError(f"{where}: shape {shape} needs {count} elements, the binary data holds {len(items)}")
        return items
    dtype = NUMPY_TYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise ProtocolError(
            f"{where}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes; "
            f"binary_data_size is {len(chunk)}"
        )
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def _from_json(data: Any, datatype: str, shape: list[int], count: int, where: str) -> np.ndarray | list[bytes]:
    if datatype == "BYTES":
        flat = list(_flatten(data)) if isinstance(data, list) else [data]
        if len(flat) != count:
            raise ProtocolError(f"{where}: shape {shape} needs {count} values, 'data' holds {len(flat)}")
        if not all(isinstance(v, str) for v in flat):
            raise ProtocolError(f"{where}: BYTES data in JSON must be strings")
        return [v.encode() for v in flat]
    # numpy reads a flat or nested list in C; a Python loop over a million values would take seconds.
    try:
        values = np.asarray(data)
    except ValueError:
        raise ProtocolError(f"{where}: 'data' must be a flat list of numbers, or nested lists of one shape") from None
    if values.dtype.kind not in "biuf":
        raise ProtocolError(f"{where}: {datatype} data must be numbers")
    if datatype != "BOOL" and _holds_booleans(data):  # numpy would read true and false as 1 and 0
        raise ProtocolError(
            f"{where}: {datatype} data must be JSON numbers, got true or false (accepted: numbers, or the tensor as "
            "binary data; booleans only as BOOL data)"
        )
    if values.size != count:
        raise ProtocolError(f"{where}: shape {shape} needs {count} values, 'data' holds {values.size}")
    return values.astype(NUMPY_TYPES[datatype]).reshape(shape)


def _holds_booleans(data: Any) -> bool:
    """Whether JSON data holds true or false at any depth (the types of a flat list are collected in C)."""
    if not isinstance(data, list):
        return isinstance(data, bool)
    if data and isinstance(data[0], list):
        return any(_holds_booleans(row) for row in data)
    return bool in set(map(type, data))


def _flatten(data: list) -> Any:
    for value in data:
        if isinstance(value, list):
            yield from _flatten(value)
        else:
            yield value


def _read_output(entry: Any, index: int, binary_default: bool) -> RequestedOutput:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ProtocolError(f"outputs[{index}] must be an object with a 'name'")
    where = f"output '{entry['name']}'"
    parameters = _parameters(entry, where)
    binary = _flag(parameters.get("binary_data", binary_default), f"{where}: parameters.binary_data")
    classes = parameters.get("classification", 0)
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
        raise ProtocolError(f"{where}: parameters.classification must be a non-negative integer, got {classes!r}")
    return RequestedOutput(entry["name"], binary, classes)
