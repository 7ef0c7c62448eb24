"""The PyTorch ViTAE, its variants and preprocessing, and weight loading.

Owns: the architecture as released, the variant registry and preprocessing (`config.py`, the one source
of truth for sizes, mean/std and interpolation), checkpoints, data and the trainer.
May import: torch, numpy, PIL, safetensors; never `export` or `service`.

The torch-dependent names are imported on first use, so that `model.config` and `model.preprocess`
(what the service needs on its ONNX Runtime and TensorRT paths) load without importing torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .config import VARIANTS, Preprocessing, ViTAEConfig, config_from_official, get_variant

_LAZY = {
    "ViTAE": ".vitae",
    "create_model": ".vitae",
    "CheckpointError": ".weights",
    "checkpoint_filter_fn": ".weights",
    "load_weights": ".weights",
    "read_state_dict": ".weights",
}

if TYPE_CHECKING:
    from .vitae import ViTAE, create_model
    from .weights import CheckpointError, checkpoint_filter_fn, load_weights, read_state_dict


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "VARIANTS",
    "CheckpointError",
    "Preprocessing",
    "ViTAE",
    "ViTAEConfig",
    "checkpoint_filter_fn",
    "config_from_official",
    "create_model",
    "get_variant",
    "load_weights",
    "read_state_dict",
]
