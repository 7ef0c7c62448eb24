"""Paths of the project's reference files, a tiny real ViTAE, and the export stage's artifacts of a checkpoint."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

import export
from model import create_model
from model.data import FASHION_MNIST_CLASSES

ROOT = Path(__file__).resolve().parents[2]
SHARED_REFERENCE = ROOT.parent / "shared" / "reference"
FIXTURES = ROOT / "tests" / "fixtures"
DEMO_CHECKPOINT = ROOT / "demo" / "model" / "vitae_fmnist.safetensors"
FASHION_CLASSES = FASHION_MNIST_CLASSES


def tiny_model(in_chans: int = 1, num_classes: int = 10, seed: int = 0):
    """A few-thousand-parameter ViTAE with the released cell design (32x32 input, 4x4 last grid)."""
    torch.manual_seed(seed)
    model = create_model(
        "vitae_fmnist",
        num_classes=num_classes,
        img_size=32,
        in_chans=in_chans,
        embed_dims=(8, 8, 16),
        token_dims=(8, 16, 32),
        nc_depth=(0, 0, 1),
        nc_heads=(1, 1, 2),
        nc_groups=(1, 1, 8),
    )
    # Non-trivial BatchNorm statistics, so that folding or skipping one shows up in the outputs.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@cache
def exported(checkpoint: Path) -> Path:
    """The export stage's artifacts of a checkpoint, beside it (built once per session)."""
    out = checkpoint.parent / "artifacts"
    export.export_artifacts(checkpoint, out, max_batch=8)
    return out
