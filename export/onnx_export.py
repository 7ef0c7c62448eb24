"""PyTorch -> ONNX: the serving wrapper, the exporter call, and the tidying of its graph."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import onnx
import torch

from model import ViTAE

from .artifacts import INPUT_NAME, LOGITS, OUTPUT_NAMES, TOKENS
from .graph import set_output_shape, tidy
from .performer import stable_performers
from .serving import ServingModel

log = logging.getLogger(__name__)

# Opset 20 is the first with the `Gelu` op, so each PRM branch is Conv -> Gelu instead of an Erf/Mul/Add
# chain; ONNX Runtime runs it natively and the TensorRT 10.x and 11.x ONNX parsers import it.
OPSET = 20
__all__ = ["INPUT_NAME", "OPSET", "OUTPUT_NAMES", "ServingModel", "export_onnx", "token_count"]


def token_count(model: ViTAE) -> int:
    cfg = model.config
    return cfg.grid_size**2 + (1 if cfg.pooling == "cls" else 0)


def export_onnx(
    model: ViTAE, path: Path, *, opset: int = OPSET, tidy_graph: bool = True, fp16_safe: bool = True
) -> onnx.ModelProto:
    """Export `model` (already folded, eval mode) to one self-contained ONNX file with a dynamic batch.

    With `fp16_safe` (the default) the graph computes the Performer in its FP16-range form
    (`export.performer`): same fp32 result, every intermediate inside FP16's range; `model` is not modified.

    Uses the TorchScript-based exporter (`dynamo=False`): at opset 20 it maps `nn.GELU` to `Gelu`, keeps the
    PRM's single channel Concat followed by its flatten, and needs no onnxscript. Its leftovers (shape
    arithmetic for the batch-preserving Reshapes, shared-initializer Identities, no-op Casts) are removed
    by `graph.tidy`.
    """
    cfg = model.config
    if fp16_safe:
        model = copy.deepcopy(model)
        swapped = stable_performers(model)
        log.info("Performer in its FP16-range form in %d reduction cell(s)", swapped)
    example = torch.zeros(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    batch = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, not gone
        # Shape-dependent Python (grid side, position table) is traced as constants: right, since only the
        # batch dimension is dynamic; the parity check proves it at two batch sizes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            ServingModel(model).eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: batch, **{name: batch for name in OUTPUT_NAMES}},
            do_constant_folding=True,
        )
    graph = onnx.load(str(path))
    if tidy_graph:
        report = tidy(graph)
        log.info("tidied the graph: %s", ", ".join(f"{k}={v}" for k, v in report.items()))
    set_output_shape(graph, LOGITS, ["batch", cfg.num_classes])
    set_output_shape(graph, TOKENS, ["batch", token_count(model), cfg.embed_dim])
    graph.producer_name = "vitae-serve export"
    onnx.checker.check_model(graph, full_check=True)
    onnx.save(graph, str(path))
    return graph
