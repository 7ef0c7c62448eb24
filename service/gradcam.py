"""Grad-CAM at any cell by PyTorch autograd: one backward for the whole batch, no parameter gradients.

The last cell does not need this (postprocess.last_cell_cam is exact from the backend's outputs);
earlier cells, and class-token models, do.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model import ViTAE


@dataclass(frozen=True)
class Cell:
    """One cell whose output tokens can be explained: its module name and its token grid."""

    name: str
    module: nn.Module
    grid: tuple[int, int]
    class_token: bool


def cells(model: ViTAE) -> list[Cell]:
    """Reduction and normal cells in forward order (stages without a reduction cell contribute only NCs)."""
    cfg = model.config
    side, out = cfg.img_size, []
    for i, stage in enumerate(model.layers):
        side //= cfg.downsample_ratios[i]
        last_stage = i == cfg.num_stages - 1
        if cfg.downsample_ratios[i] > 1:
            out.append(Cell(f"layers.{i}.RC", stage.RC, (side, side), False))
        for j, cell in enumerate(stage.NC):
            out.append(Cell(f"layers.{i}.NC.{j}", cell, (side, side), cfg.pooling == "cls" and last_stage))
    return out


def resolve_cell(names: list[str], layer: str | int) -> int:
    """A cell given by index (negative counts from the last) or by name -> its index; ValueError otherwise."""
    if isinstance(layer, str) and layer.strip().lstrip("-").isdigit():
        layer = int(layer)
    if isinstance(layer, int):
        if -len(names) <= layer < len(names):
            return layer % len(names)
        raise ValueError(f"cam_layer {layer} is out of range; this model has {len(names)} cells: {', '.join(names)}")
    if layer in names:
        return names.index(layer)
    raise ValueError(f"unknown cam_layer {layer!r}; use an index or one of: {', '.join(names)}")


class AutogradGradCAM:
    """Grad-CAM on a frozen eval-mode ViTAE. Calls are serialised by a lock, so it is safe to share."""

    def __init__(self, model: ViTAE) -> None:
        self.model = model.eval()
        # Gradients flow to the chosen activation only: parameters never accumulate .grad.
        self.model.requires_grad_(False)
        self.cells = cells(model)
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, images: np.ndarray | torch.Tensor, targets, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """images (B, C, S, S), one target class per image, a cell index -> logits (B, K), raw maps (B, h, w).

        The raw map is Grad-CAM's weighted sum before the ReLU: sum_c alpha_c A_{n,c}, with alpha_c the
        gradient of the image's own target logit averaged over the cell's tokens.
        """
        cell = self.cells[layer]
        x = torch.as_tensor(images, dtype=torch.float32).to(self.device)
        target = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=self.device)  # (B,)
        captured: list[torch.Tensor] = []

        def keep_output(module, inputs, output):
            # The frozen model builds no graph up to here; the activation becomes the leaf we differentiate.
            output = output.detach().requires_grad_(True)
            captured.append(output)
            return output

        with self._lock, torch.enable_grad():
            handle = cell.module.register_forward_hook(keep_output)
            try:
                logits = self.model(x)  # (B, K)
            finally:
                handle.remove()
            activation = captured[0]  # (B, N, C)
            # Images in an eval-mode batch are independent, so one backward of the sum of each image's
            # own target logit gives every image its own gradient.
            score = logits.gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(score, activation)  # (B, N, C)
        if cell.class_token:
            activation, grad = activation[:, 1:], grad[:, 1:]  # patch tokens only: (B, h*w, C)
        B, N, C = activation.shape
        h, w = cell.grid
        if N != h * w:  # images at another size than the config's
            h = w = math.isqrt(N)
        alpha = grad.mean(dim=1, keepdim=True)  # (B, 1, C)
        raw = (alpha * activation.detach()).sum(dim=-1)  # (B, N)
        return logits.detach().cpu().numpy(), raw.reshape(B, h, w).double().cpu().numpy()
