"""The export stage: a checkpoint becomes serving artifacts (ONNX, weights, head, TensorRT plan, metadata).

`export_artifacts` builds them (only when missing or stale), `artifacts_are_fresh` says whether a build
would change anything; `export.tensorrt.plan_matches_this_machine` says whether a plan may run here.
"""

from .pipeline import FORMAT, artifacts_are_fresh, export_artifacts

__all__ = ["FORMAT", "artifacts_are_fresh", "export_artifacts"]
