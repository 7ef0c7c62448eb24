"""Tensors on the wire: the protocol's datatypes, one tensor as it arrives or leaves, BYTES framing."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ProtocolError

HEADER_LENGTH = "Inference-Header-Content-Length"

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


@dataclass(frozen=True)
class Tensor:
    """One input or output tensor: numeric data as an array of `shape`, BYTES data as a flat list of bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    binary: bool = False  # arrived as binary tensor data (BYTES then hold raw bytes, not JSON text)


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
