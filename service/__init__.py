"""The inference service: FastAPI over a dynamically batched ViTAE backend, with Grad-CAM maps.

Owns: the HTTP API (`app.py` factory, `routes/`), the runtime lifecycle (`lifecycle.py`), batching,
backends, pre-/post-processing glue and the service settings (`settings.py`, prefix VITAE_).
May import: `model` (preprocessing) and `export`: its artifacts contract (`export.artifacts`: metadata.json
as `ArtifactsMetadata`, file and tensor names), the serving forward and TensorRT runner it shares with the
export (`export.serving`, `export.engine.runner.PlanRunner`, loaded only by the PyTorch and TensorRT backends and
Grad-CAM), and the pipeline to rebuild missing or stale artifacts. Nothing in `model` or `export` imports
`service`.
"""

from .app import create_app
from .settings import Settings, get_settings

__all__ = ["Settings", "create_app", "get_settings"]
