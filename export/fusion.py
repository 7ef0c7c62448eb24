"""Did TensorRT fuse each PRM branch? Read from the engine inspector's JSON (`layers.json`).

What fusion means for this model: each PRM branch is Conv -> Gelu, and the branch is fused when one engine layer
computes both, either a Conv+activation layer ("A + B" in its name) or a Myelin region (`{ForeignNode[A...B]}`)
that contains both. The PRM's channel Concat says nothing: TensorRT always removes channel concats by writing
the branches into one buffer, so a check on it cannot fail.

Which ONNX nodes a layer holds: DETAILED inspector output lists them in the layer's "Metadata"
(`[ONNX Layer: name]`, one per node); without it, the name's "A + B" parts; and for a ForeignNode named after its
first and last node, every node between them in the ONNX graph's (topological) order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .graph import PRMBlock

ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
FOREIGN_NODE = re.compile(r"\{ForeignNode\[(.+?)\.\.\.(.+?)\]\}")


@dataclass(frozen=True)
class EngineLayer:
    name: str
    kind: str  # the inspector's LayerType ("" when it gives names only)
    nodes: frozenset[str]  # the ONNX nodes this layer computes


@dataclass(frozen=True)
class BranchFusion:
    prm: str  # the PRM's Concat node, naming the PRM
    conv: str
    gelu: str
    layer: str | None  # the engine layer computing both, None when they run in different layers


def engine_layers(layers: dict[str, Any], graph_order: Sequence[str] = ()) -> list[EngineLayer]:
    """Every layer of an inspector JSON with the ONNX nodes it computes (see the module docstring)."""
    position = {name: i for i, name in enumerate(graph_order)}
    found = []
    for layer in layers.get("Layers", []):
        if isinstance(layer, dict):
            name, kind, metadata = str(layer.get("Name", "")), str(layer.get("LayerType", "")), layer.get("Metadata")
        else:
            name, kind, metadata = str(layer), "", None
        nodes = set(ONNX_LAYER.findall(str(metadata or "")))
        nodes.update(part.strip() for part in name.split(" + "))
        for first, last in FOREIGN_NODE.findall(name):
            if first in position and last in position:
                nodes.update(graph_order[position[first] : position[last] + 1])
        found.append(EngineLayer(name, kind, frozenset(nodes)))
    return found


def prm_fusion(
    layers: dict[str, Any], blocks: Sequence[PRMBlock], graph_order: Sequence[str] = ()
) -> list[BranchFusion]:
    """For each PRM branch, the engine layer that computes its Conv and its Gelu together (or None)."""
    engine = engine_layers(layers, graph_order)
    report = []
    for block in blocks:
        for conv, gelu in zip(block.convs, block.gelus, strict=True):
            holder = next((layer.name for layer in engine if {conv, gelu} <= layer.nodes), None)
            report.append(BranchFusion(block.concat, conv, gelu, holder))
    return report


def fusion_problems(report: Sequence[BranchFusion]) -> list[str]:
    """One line per branch whose Conv and Gelu run in different layers."""
    return [f"{b.prm}: {b.conv} and {b.gelu} are not in one layer" for b in report if b.layer is None]


def format_fusion(report: Sequence[BranchFusion]) -> str:
    """Per PRM, the engine layer of each branch: the evidence a GPU run prints."""
    lines, current = [], None
    for branch in report:
        if branch.prm != current:
            current = branch.prm
            lines.append(f"PRM {branch.prm}:")
        lines.append(f"  {branch.conv} + {branch.gelu} -> {branch.layer or 'NOT FUSED'}")
    return "\n".join(lines)
