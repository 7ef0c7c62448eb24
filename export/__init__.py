"""The export stage: a checkpoint becomes serving artifacts (ONNX, weights, head, TensorRT plan, metadata).

`export_artifacts` builds them (only when missing or stale), `artifacts_are_fresh` says whether a build
would change anything. `export.artifacts` is the contract the service reads: the file and tensor names and
`ArtifactsMetadata` (metadata.json typed, versioned and validated).

Owns: the artifacts folder and its `metadata.json`, the ONNX graph, parity checks, the TensorRT plan, the CPU
bf16 check and the Triton repository.
May import: `model`; never `service`.

The pipeline (torch, onnx) is imported on first use, so that the service can read the contract
(`export.artifacts`) on its ONNX Runtime path without loading them.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .artifacts import FORMAT

_LAZY = {"artifacts_are_fresh": ".pipeline", "export_artifacts": ".pipeline"}

if TYPE_CHECKING:
    from .pipeline import artifacts_are_fresh, export_artifacts


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FORMAT", "artifacts_are_fresh", "export_artifacts"]
