"""The Open Inference Protocol (KServe v2) on the wire: pure functions, no HTTP framework, no model.

An infer request is a JSON header, optionally followed by binary tensor data (Triton's binary tensor data
extension): when the `Inference-Header-Content-Length` header is present, the first that many bytes of the
body are the JSON and the rest holds, in input order, the raw bytes of every input whose parameters carry
`binary_data_size`. Responses are encoded the same way for the outputs asked for with `binary_data`.

Path of one request through this module:
1. `parse_infer_request` splits the body, reads the JSON and turns every input into a numpy array
   (numeric types) or a list of bytes (BYTES), checking element counts against the declared shape.
2. The caller checks the tensors against the model (`check_input`) and runs inference.
3. `encode_infer_response` writes the outputs back, as JSON values or as binary data, in request order.
Every problem with the request raises ProtocolError, whose message names the field and what is accepted.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from export.artifacts import INPUT_NAME, LOGITS, TOKENS

from .artifacts import ServedModel

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics")

# KServe v2 datatypes -> little-endian numpy dtypes (BYTES is length-prefixed, handled apart).
NUMPY_TYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMPY_TYPES, "BYTES")
TRITON_CONFIG_TYPES = {name: f"TYPE_{name}" for name in NUMPY_TYPES} | {"BYTES": "TYPE_STRING"}


class ProtocolError(ValueError):
    """The request breaks the protocol or does not fit the model; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Tensor:
    """One input or output tensor: numeric data as an array of `shape`, BYTES data as a flat list of bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    binary: bool = False  # arrived as binary tensor data (BYTES then hold raw bytes, not JSON text)


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


# ---------------------------------------------------------------- requests


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


def parse_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Body bytes (+ the Inference-Header-Content-Length header, if sent) -> inputs as arrays, outputs asked for."""
    head, binary = split_body(body, header_length)
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
    if values.size != count:
        raise ProtocolError(f"{where}: shape {shape} needs {count} values, 'data' holds {values.size}")
    return values.astype(NUMPY_TYPES[datatype]).reshape(shape)


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


def unpack_bytes(chunk: bytes, where: str = "BYTES data") -> list[bytes]:
    """Triton's BYTES serialization: each element is a 4-byte little-endian length then that many bytes."""
    items, offset = [], 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise ProtocolError(f"{where}: the BYTES data ends inside an element's 4-byte length prefix")
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise ProtocolError(f"{where}: a BYTES element of {length} bytes runs past the end of its binary data")
        items.append(chunk[offset : offset + length])
        offset += length
    return items


def pack_bytes(items: Sequence[bytes]) -> bytes:
    """The inverse of unpack_bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def check_input(tensor: Tensor, datatype: str, shape: Sequence[int]) -> None:
    """The tensor has the model's datatype and a shape that matches `shape` (-1: any size)."""
    where = f"input '{tensor.name}'"
    if tensor.datatype != datatype:
        raise ProtocolError(f"{where} has datatype {tensor.datatype}; this model takes {datatype}")
    fits = len(tensor.shape) == len(shape) and all(w in (-1, g) for g, w in zip(tensor.shape, shape, strict=True))
    if not fits:
        raise ProtocolError(f"{where} has shape {list(tensor.shape)}; this model takes {list(shape)} (-1: any size)")


# ---------------------------------------------------------------- responses


def classification_strings(scores: np.ndarray, count: int, labels: Sequence[str]) -> list[bytes]:
    """The classification extension: per row of scores (B, K), the top `count` as b"score:index:label"."""
    rows = []
    for row in scores:  # (K,)
        order = np.argsort(-row, kind="stable")[:count]
        rows.extend(f"{float(row[i])}:{int(i)}:{labels[i]}".encode() for i in order)
    return rows


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[tuple[Tensor, bool]],
) -> tuple[bytes, dict[str, str]]:
    """(tensor, as binary?) pairs -> response body and headers; binary data follow the JSON in output order."""
    described, chunks = [], []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary:
            raw = pack_bytes(tensor.data) if tensor.datatype == "BYTES" else _little_endian(tensor).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = [item.decode("utf-8", errors="replace") for item in tensor.data]
        else:
            entry["data"] = _little_endian(tensor).reshape(-1).tolist()
        described.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request_id is not None:
        response["id"] = request_id
    head = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return head, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH.lower(): str(len(head))}
    return head + b"".join(chunks), headers


def _little_endian(tensor: Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.data, dtype=NUMPY_TYPES[tensor.datatype])


# ---------------------------------------------------------------- the served model, described


# The v2 tensors: the exported graph's own (export.artifacts), plus encoded images in and a CAM out.
IMAGES, IMAGE_BYTES = INPUT_NAME, "image_bytes"
CAM = "cam"
INPUT_RULE = (
    f"give exactly one input: '{IMAGES}' (FP32 [B, C, S, S], already preprocessed: the exported model's own input) "
    f"or '{IMAGE_BYTES}' (BYTES [B, 1] or [B], encoded images that the service decodes and preprocesses itself; "
    "as JSON data each element is the image's base64 text, as binary tensor data its raw bytes)"
)
OUTPUT_RULE = (
    f"'{LOGITS}' unless the request lists its outputs; '{TOKENS}' (last-cell tokens) and '{CAM}' (Grad-CAM of the "
    f"last cell, ReLU'd and min-max scaled to 0..1, for the top-1 class or the request's parameters.cam_class) when "
    f"asked for; parameters.classification = N on '{LOGITS}' answers the top N as 'score:index:label' strings"
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size (the batch)

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def config(self) -> dict[str, Any]:
        """Triton's ModelInput/ModelOutput: the batch dimension is left out of `dims`."""
        return {"name": self.name, "data_type": TRITON_CONFIG_TYPES[self.datatype], "dims": list(self.shape[1:])}


@dataclass(frozen=True)
class Signature:
    """What the v2 model takes and gives, from the artifacts' metadata."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        accepted = ", ".join(f"'{s.name}' ({s.datatype} {list(s.shape)})" for s in self.inputs)
        raise ProtocolError(f"unknown input '{name}'; this model takes {accepted}")

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        accepted = ", ".join(f"'{s.name}'" for s in self.outputs)
        raise ProtocolError(f"unknown output '{name}'; this model gives {accepted}")


def signature(served: ServedModel, *, cam: bool) -> Signature:
    """The served model's v2 tensors; `cam` says whether this runtime can give CAMs."""
    prep = served.preprocessing
    tokens = served.metadata.tensor_shape(TOKENS)
    outputs = [TensorSpec(LOGITS, "FP32", (-1, served.num_classes))]
    if tokens is not None:
        outputs.append(TensorSpec(TOKENS, "FP32", (-1, *tokens[1:])))
    if cam:
        outputs.append(TensorSpec(CAM, "FP32", (-1, *served.grid)))
    return Signature(
        inputs=(
            TensorSpec(IMAGES, "FP32", (-1, prep.in_chans, prep.img_size, prep.img_size)),
            TensorSpec(IMAGE_BYTES, "BYTES", (-1, 1)),
        ),
        outputs=tuple(outputs),
    )


def model_metadata(served: ServedModel, sig: Signature, platform: str) -> dict[str, Any]:
    """The protocol's model metadata object, with the input and output rules in `parameters`."""
    return {
        "name": served.name,
        "versions": [served.version],
        "platform": platform,
        "inputs": [spec.metadata() for spec in sig.inputs],
        "outputs": [spec.metadata() for spec in sig.outputs],
        "parameters": {
            "inputs": INPUT_RULE,
            "outputs": OUTPUT_RULE,
            "preprocessing": served.preprocessing.to_dict(),
            "class_names": served.class_names,
        },
    }


def model_config(
    served: ServedModel,
    sig: Signature,
    *,
    backend: str,
    gpu: bool,
    max_request_batch: int,
    max_backend_batch: int,
    max_queue_delay_s: float,
) -> dict[str, Any]:
    """A Triton-style model configuration (ModelConfig as JSON), so Triton's tools can size their requests."""
    inputs = [dict(spec.config(), optional=True) for spec in sig.inputs]  # exactly one of the two is given
    inputs[0]["format"] = "FORMAT_NCHW"
    return {
        "name": served.name,
        "platform": "vitae-serve",
        "backend": backend,
        "max_batch_size": max_request_batch,
        "input": inputs,
        "output": [spec.config() for spec in sig.outputs],
        "dynamic_batching": {
            "preferred_batch_size": [max_backend_batch],
            "max_queue_delay_microseconds": round(max_queue_delay_s * 1e6),
        },
        "instance_group": [{"name": served.name, "count": 1, "kind": "KIND_GPU" if gpu else "KIND_CPU"}],
        "parameters": {
            "inputs": {"string_value": INPUT_RULE},
            "outputs": {"string_value": OUTPUT_RULE},
            "version": {"string_value": served.version},
        },
    }


def error_body(message: str) -> dict[str, str]:
    """The protocol's error object."""
    return {"error": message}
