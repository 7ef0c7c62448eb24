"""The serving forward pass, written once: images -> (logits, last-cell tokens) of a ViTAE.

The ONNX export traces it, the parity check compares against it, and the service's PyTorch backend runs it;
`rebuild_model` is the PyTorch model of an artifacts folder, for that backend and for autograd Grad-CAM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from model import ViTAE, load_weights

from .artifacts import LOGITS, TOKENS, ArtifactsMetadata


class ServingModel(nn.Module):
    """Images -> (logits, last-cell tokens): one pass gives the classes and what Grad-CAM needs."""

    def __init__(self, model: ViTAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.model.forward_features(images)  # (B, N, C)
        return self.model.forward_head(tokens), tokens  # (B, K), (B, N, C)


def serving_outputs(model: nn.Module, images: np.ndarray, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """The serving forward of `model` (a ViTAE or a ServingModel) on a float32 batch, in inference mode.

    images (B, C, S, S) -> {"logits": (B, K), "tokens": (B, N, C)}, float32 numpy on the CPU.
    """
    serving = model if isinstance(model, ServingModel) else ServingModel(model)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
        logits, tokens = serving(x)
    return {LOGITS: logits.float().cpu().numpy(), TOKENS: tokens.float().cpu().numpy()}


def rebuild_model(metadata: ArtifactsMetadata, weights: Path) -> ViTAE:
    """The PyTorch ViTAE an artifacts folder was exported from: its config, its weights file (strict load)."""
    return load_weights(ViTAE(metadata.model_config()), weights)
