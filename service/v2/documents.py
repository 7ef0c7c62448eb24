"""The served model, described: its v2 tensors, the protocol's model metadata and a Triton-style config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from export.artifacts import INPUT_NAME, LOGITS, TOKENS

from ..artifacts import ServedArtifacts
from .errors import ProtocolError
from .tensors import TRITON_CONFIG_TYPES

EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics")


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
        """The input called `name`; else a ProtocolError listing the inputs with their datatypes and shapes."""
        return _find(self.inputs, name, "input", "takes", lambda s: f"'{s.name}' ({s.datatype} {list(s.shape)})")

    def output(self, name: str) -> TensorSpec:
        """The output called `name`; else a ProtocolError listing the outputs."""
        return _find(self.outputs, name, "output", "gives", lambda s: f"'{s.name}'")


def _find(
    specs: tuple[TensorSpec, ...], name: str, kind: str, verb: str, describe: Callable[[TensorSpec], str]
) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    accepted = ", ".join(describe(s) for s in specs)
    raise ProtocolError(f"unknown {kind} '{name}'; this model {verb} {accepted}")


def signature(served: ServedArtifacts, *, cam: bool) -> Signature:
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


def model_metadata(served: ServedArtifacts, sig: Signature, platform: str) -> dict[str, Any]:
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
    served: ServedArtifacts,
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
