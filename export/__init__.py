"""The export stage: a checkpoint becomes serving artifacts (ONNX, weights, head, TensorRT plan, metadata).

`export_artifacts` builds them (only when missing or stale), `artifacts_are_fresh` says whether a build
would change anything; `export.tensorrt.plan_matches_this_machine` says whether a plan may run here.

Owns: the artifacts folder and its `metadata.json` (the contract the service reads), the ONNX graph,
parity checks, the TensorRT plan, int8 quantisation and the Triton repository.
May import: `model`; never `service`.
"""

from .pipeline import FORMAT, artifacts_are_fresh, export_artifacts

__all__ = ["FORMAT", "artifacts_are_fresh", "export_artifacts"]
