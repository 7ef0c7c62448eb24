"""The PyTorch ViTAE, its variants and preprocessing, and weight loading."""

from .config import VARIANTS, Preprocessing, ViTAEConfig, config_from_official, get_variant
from .vitae import ViTAE, create_model
from .weights import CheckpointError, checkpoint_filter_fn, load_weights, read_state_dict

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
