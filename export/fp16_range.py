"""How large every intermediate tensor of an ONNX graph gets on real inputs: the FP16-range check, on CPU.

An FP16 engine overflows where any intermediate passes 65504, whatever ops TensorRT keeps in FP32 (a cast to
FP16 follows them in a strongly typed network). ONNX Runtime on CPU computes the same graph in fp32, so exposing
every node output as a graph output and taking its largest magnitude shows, without a GPU, whether an FP16
build can hold the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

FP16_MAX = 65504.0
# "Well inside" FP16: an order of magnitude of headroom for inputs beyond the ones measured.
FP16_SAFE_LIMIT = 1e4
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class TensorRange:
    name: str  # the tensor's name in the graph
    op: str  # the op type of the node that writes it
    max_abs: float  # largest finite magnitude on the inputs (inf/NaN count as inf)


def with_all_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs are every float tensor any node writes (types from shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type for vi in [*inferred.graph.value_info, *inferred.graph.output]}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for node in exposed.graph.node:
        for name in node.output:
            kind = types.get(name)
            if not name or name in present or kind is None or kind.tensor_type.elem_type not in FLOAT_TYPES:
                continue
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, kind.tensor_type.elem_type, None))
            present.add(name)
    return exposed


def intermediate_ranges(onnx_path: Path | str, images: np.ndarray, batch: int = 8) -> list[TensorRange]:
    """Largest magnitude of every float tensor of the graph over `images` (N, C, S, S), largest first."""
    model = onnx.load(str(onnx_path))
    writer = {name: node.op_type for node in model.graph.node for name in node.output}
    exposed = with_all_outputs(model)
    options = ort.SessionOptions()
    # Graph optimisations would fuse nodes away and hide their outputs; measure the graph as written.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    largest = dict.fromkeys(names, 0.0)
    for start in range(0, len(images), batch):
        chunk = np.ascontiguousarray(images[start : start + batch], dtype=np.float32)
        for name, value in zip(names, session.run(names, {"images": chunk}), strict=True):
            value = np.asarray(value, dtype=np.float64)
            peak = float(np.max(np.abs(value))) if value.size else 0.0
            largest[name] = max(largest[name], peak if np.isfinite(value).all() else float("inf"))
    ranges = [TensorRange(name, writer.get(name, "graph output"), peak) for name, peak in largest.items()]
    return sorted(ranges, key=lambda r: r.max_abs, reverse=True)


def out_of_range(ranges: list[TensorRange], limit: float = FP16_SAFE_LIMIT) -> list[TensorRange]:
    """The tensors whose magnitude reaches `limit` (or are not finite)."""
    return [r for r in ranges if not r.max_abs < limit]
