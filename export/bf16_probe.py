"""Where a graph compiled in bf16 first goes non-finite: every node's output, in graph order, against fp32.

OpenVINO keeps a node's output in bf16 when that output is also a model output (only the graph's tail before
an output is kept in fp32, and a probed node is not the tail of anything), so the probed graph computes what
the served one does, node by node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NOT_PROBED = frozenset({"Parameter", "Constant", "Result", "ShapeOf"})


@dataclass(frozen=True)
class NonFiniteNode:
    """The first node whose bf16 output holds inf or NaN while its fp32 output does not."""

    name: str  # the ONNX node's name, which OpenVINO keeps as the friendly name
    op_type: str  # OpenVINO's operation type
    inputs: tuple[str, ...]  # what each probed input held in bf16, e.g. "/RC/Sub_5: [-3.1, 0]"

    def describe(self) -> str:
        held = "; ".join(self.inputs) or "no probed inputs"
        return f"first non-finite node {self.name} ({self.op_type}); its inputs in bf16: {held}"


def first_non_finite_node(onnx_path: Path, images: np.ndarray) -> NonFiniteNode | None:
    """The first node, in topological order, whose bf16 output on `images` (N, C, S, S) holds inf or NaN where
    its fp32 output is finite; None when there is none."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(onnx_path))
    probed = [
        op
        for op in model.get_ordered_ops()
        if op.get_type_name() not in NOT_PROBED and op.get_output_size() and op.get_output_element_type(0).is_real()
    ]
    model.add_outputs([op.output(0) for op in probed])
    # The model's i-th output is the compiled model's i-th; each is a Result fed by the node it probes.
    index = {out.get_node().input_value(0).get_node().get_friendly_name(): i for i, out in enumerate(model.outputs)}
    fp32, bf16 = (_outputs(core, model, precision, images) for precision in ("f32", "bf16"))
    for op in probed:
        i = index.get(op.get_friendly_name())
        if i is not None and np.isfinite(fp32[i]).all() and not np.isfinite(bf16[i]).all():
            feeding = [value.get_node().get_friendly_name() for value in op.input_values()]
            inputs = tuple(f"{name}: {_value_range(bf16[index[name]])}" for name in feeding if name in index)
            return NonFiniteNode(op.get_friendly_name(), op.get_type_name(), inputs)
    return None


def _outputs(core: Any, model: Any, precision: str, images: np.ndarray) -> list[np.ndarray]:
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    result = compiled.create_infer_request().infer({"images": np.ascontiguousarray(images, np.float32)})
    return [np.asarray(result[output], dtype=np.float32) for output in compiled.outputs]


def _value_range(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    span = f"[{finite.min():.3g}, {finite.max():.3g}]" if finite.size else "no finite value"
    bad = values.size - finite.size
    return span + (f", {bad} non-finite" if bad else "")
