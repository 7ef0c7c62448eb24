"""Reading and tidying the exported ONNX graph: small passes, and the checks the export promises."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from model import ViTAEConfig


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def inline_identities(model: onnx.ModelProto) -> int:
    """Drop Identity nodes (the legacy exporter's way of sharing equal initializers) not feeding an output."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    removed = 0
    for node in list(graph.node):
        if node.op_type == "Identity" and node.output[0] not in outputs:
            _rename_input(graph, node.output[0], node.input[0])
            graph.node.remove(node)
            removed += 1
    return removed


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def remove_noop_casts(model: onnx.ModelProto) -> int:
    """Drop Casts to the type their input already has (the Performer's `.float()` on float32 tensors)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = _elem_types(inferred)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    removed = 0
    for node in list(graph.node):
        if node.op_type != "Cast" or node.output[0] in outputs:
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        if types.get(node.input[0]) == to:
            _rename_input(graph, node.output[0], node.input[0])
            graph.node.remove(node)
            removed += 1
    return removed


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return dims


def constant_reshapes(model: onnx.ModelProto) -> int:
    """Give every batch-preserving Reshape a constant target `[0, d1, ...]` instead of a Shape/Slice/Concat chain.

    `x.flatten(2)` and the attention's head split trace to shape arithmetic on the dynamic batch; only the
    batch is dynamic, so the target is a constant with 0 ("keep the input's dim") in front.
    """
    # ONNX's own inference leaves a Reshape's -1 dim unknown; ORT's symbolic inference resolves it.
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=False)
    shapes = {vi.name: _dims(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in initializers:
            continue
        src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not src or not dst or src[0] != dst[0] or not isinstance(dst[0], str):
            continue
        if not all(isinstance(d, int) and d > 0 for d in dst[1:]):
            continue
        target = numpy_helper.from_array(np.array([0, *dst[1:]], dtype=np.int64), f"{node.output[0]}_shape")
        graph.initializer.append(target)
        node.input[1] = target.name
        rewritten += 1
    return rewritten


def eliminate_dead_code(model: onnx.ModelProto) -> int:
    """Remove nodes whose outputs nobody reads, and initializers nobody uses."""
    graph = model.graph
    removed = 0
    while True:
        needed = {o.name for o in graph.output} | {name for node in graph.node for name in node.input}
        dead = [node for node in graph.node if not any(out in needed for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    return removed


def set_output_shape(model: onnx.ModelProto, name: str, shape: list[int | str]) -> None:
    """Declare an output's shape (static dims where the exporter left symbols)."""
    for i, output in enumerate(model.graph.output):
        if output.name == name:
            elem = output.type.tensor_type.elem_type
            model.graph.output[i].CopyFrom(helper.make_tensor_value_info(name, elem, shape))
            return
    raise KeyError(f"the graph has no output {name!r}")


def tidy(model: onnx.ModelProto) -> dict[str, int]:
    """Run the passes in order; returns how many nodes each touched (logged by the caller)."""
    report = {
        "identities_inlined": inline_identities(model),
        "noop_casts_removed": remove_noop_casts(model),
        "reshapes_made_constant": constant_reshapes(model),
    }
    report["dead_nodes_removed"] = eliminate_dead_code(model)
    return report


@dataclass(frozen=True)
class PRMBlock:
    """One PRM as it appears in the graph: its branch convs, their Gelus, the Concat and the flatten."""

    convs: tuple[str, ...]
    gelus: tuple[str, ...]
    concat: str
    flatten: str
    transpose: str


class GraphCheckError(ValueError):
    """The exported graph lacks a structure the export promises."""


def _perm(node: onnx.NodeProto) -> list[int]:
    return [list(a.ints) for a in node.attribute if a.name == "perm"][0]


def find_prm_blocks(model: onnx.ModelProto) -> list[PRMBlock]:
    """Every channel Concat fed only by Conv -> Gelu branches that read one tensor, and what follows it.

    Raises GraphCheckError when such a Concat is not followed directly by Reshape/Flatten -> Transpose,
    or when a branch has anything between its Conv, its Gelu and the Concat.
    """
    graph = model.graph
    producers, users = _producers(graph), _consumers(graph)
    blocks = []
    for node in graph.node:
        if node.op_type != "Concat":
            continue
        axis = next(a.i for a in node.attribute if a.name == "axis")
        gelus = [producers.get(name) for name in node.input]
        if not all(g is not None and g.op_type == "Gelu" for g in gelus):
            continue
        convs = [producers.get(g.input[0]) for g in gelus]
        if not all(c is not None and c.op_type == "Conv" for c in convs) or len({c.input[0] for c in convs}) != 1:
            continue
        where = f"PRM concat {node.name!r}"
        if axis != 1:
            raise GraphCheckError(f"{where} joins on axis {axis}, not the channel axis 1")
        for conv, gelu in zip(convs, gelus, strict=True):
            if [u.name for u in users[conv.output[0]]] != [gelu.name]:
                raise GraphCheckError(f"{where}: conv {conv.name!r} feeds more than its Gelu")
            if [u.name for u in users[gelu.output[0]]] != [node.name]:
                raise GraphCheckError(f"{where}: Gelu {gelu.name!r} feeds more than the Concat")
        after = users[node.output[0]]
        if len(after) != 1 or after[0].op_type not in ("Reshape", "Flatten"):
            raise GraphCheckError(f"{where} is followed by {[u.op_type for u in after]}, not one Reshape/Flatten")
        flatten = after[0]
        # The flatten feeds the transpose to tokens; a following cell that turns tokens back into an image
        # may read the flatten directly (the exporter cancels the transpose pair), nothing else may.
        after = users[flatten.output[0]]
        to_tokens = [u for u in after if u.op_type == "Transpose" and _perm(u) == [0, 2, 1]]
        others = [u.op_type for u in after if u.op_type != "Reshape" and u not in to_tokens]
        if len(to_tokens) != 1 or others:
            raise GraphCheckError(
                f"{where}: the flatten is followed by {[u.op_type for u in after]}, not one Transpose to tokens"
            )
        blocks.append(
            PRMBlock(
                convs=tuple(c.name for c in convs),
                gelus=tuple(g.name for g in gelus),
                concat=node.name,
                flatten=flatten.name,
                transpose=to_tokens[0].name,
            )
        )
    return blocks


def check_graph(graph: onnx.ModelProto, cfg: ViTAEConfig) -> None:
    """The promises of the export about its graph: BatchNorms folded, GELU as `Gelu`, each PRM fused-ready."""
    ops = op_counts(graph)
    if ops.get("BatchNormalization"):
        raise GraphCheckError(f"{ops['BatchNormalization']} BatchNormalization nodes survived folding")
    if not ops.get("Gelu"):
        opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
        raise GraphCheckError(f"no Gelu op in the graph (opset {opset}); GELU was decomposed")
    expected = sum(1 for r in cfg.downsample_ratios if r > 1)
    blocks = find_prm_blocks(graph)
    if len(blocks) != expected:
        raise GraphCheckError(f"found {len(blocks)} PRM Conv->Gelu->Concat blocks, expected {expected}")
