"""The inference service: FastAPI over a dynamically batched ViTAE backend, with Grad-CAM maps."""

from .app import create_app
from .settings import Settings, get_settings

__all__ = ["Settings", "create_app", "get_settings"]
