"""Infer responses: outputs as JSON values or as binary tensor data after the JSON, in request order."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from .tensors import HEADER_LENGTH, NUMPY_TYPES, Tensor, pack_bytes


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
