"""The FP16 copy of the graph for a strongly typed TensorRT build: which nodes stay FP32, and the conversion.

Pure ONNX work that runs on any CPU (and is tested there); only `engine.build` needs TensorRT.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx

# Kept in FP32 under FP16: normalisation and softmax (the usual accuracy spots), and the Performer's kernel
# arithmetic, which the release computes in float32. Its exported form keeps every value inside FP16's range
# (export/performer.py), but its log-domain features (w.x - |x|^2/2, up to a few hundred) lose ~0.1 absolute in
# FP16, i.e. ~10 % in the features after exp. The kernel is every op a reduction cell runs itself, outside its
# submodules (PRM, PCM, norms, projections, MLP): node and layer names "/RC/<Op>", "/RC_1/<Op>_3", ...
FP32_ONNX_OPS = ("LayerNormalization", "Softmax")
PERFORMER_KERNEL = re.compile(r"^/RC(?:_\d+)?/[^/]+$")


def fp32_node_names(model: onnx.ModelProto) -> list[str]:
    """The nodes an FP16 build keeps in FP32: `FP32_ONNX_OPS` and the Performer kernel."""
    return [n.name for n in model.graph.node if n.op_type in FP32_ONNX_OPS or PERFORMER_KERNEL.match(n.name)]


def fp16_onnx(onnx_path: Path, out_path: Path) -> Path:
    """An FP16 copy of the model for strongly typed builds: FP32 I/O, FP32 kept for `FP32_ONNX_OPS`."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_path))
    model = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(FP32_ONNX_OPS), node_block_list=fp32_node_names(model)
    )
    onnx.save(drop_fp16_round_trips(model), str(out_path))
    return out_path


def drop_fp16_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Let FP32 nodes feed FP32 nodes directly: remove every Cast(fp16) -> Cast(fp32) pair on an FP32 value.

    The converter casts each kept node's outputs to FP16 and back for the next kept node, so the Performer
    kernel would still round (and flush to zero: exp(-20) is below FP16's smallest subnormal) between its
    FP32 ops, and 0/0 turns into NaN at its final division. Changed in place and returned.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    elem_type = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    elem_type.update({t.name: t.data_type for t in graph.initializer})
    nodes = list(model.graph.node)
    to = [next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None for n in nodes]
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    outputs = {o.name for o in model.graph.output}
    renamed: dict[str, str] = {}
    dropped: set[int] = set()
    for i, down in enumerate(nodes):
        if to[i] != fp16 or elem_type.get(down.input[0]) != fp32:
            continue
        users = consumers.get(down.output[0], [])
        for j in users:
            if to[j] == fp32 and nodes[j].output[0] not in outputs:
                renamed[nodes[j].output[0]] = down.input[0]
                dropped.add(j)
        if down.output[0] not in outputs and all(j in dropped for j in users):
            dropped.add(i)
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for i, n in enumerate(nodes) if i not in dropped]
    for node in kept:
        for k, name in enumerate(node.input):
            node.input[k] = renamed.get(name, name)
    gone = {out for i in dropped for out in nodes[i].output}
    value_info = [v for v in model.graph.value_info if v.name not in gone]
    del model.graph.node[:], model.graph.value_info[:]
    model.graph.node.extend(kept)
    model.graph.value_info.extend(value_info)
    return model
