"""Shared fixtures: small real models saved in this project's checkpoint format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import create_model
from model.checkpoint import checkpoint_metadata, save_checkpoint
from model.data import FASHION_MNIST_CLASSES

ROOT = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = ROOT.parent / "shared" / "reference"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEMO_CHECKPOINT = ROOT / "demo" / "model" / "vitae_fmnist.safetensors"
SAMPLES = ROOT / "demo" / "samples"
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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A grayscale 10-class project checkpoint with random weights."""
    model = tiny_model()
    meta = checkpoint_metadata(model, variant="vitae_fmnist", class_names=FASHION_CLASSES)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny", meta)


@pytest.fixture(scope="session")
def tiny_rgb_checkpoint(tmp_path_factory) -> Path:
    """An RGB 5-class project checkpoint with random weights."""
    model = tiny_model(in_chans=3, num_classes=5, seed=1)
    meta = checkpoint_metadata(model, variant="vitae_fmnist", class_names=[f"class_{i}" for i in range(5)])
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt_rgb") / "tiny_rgb", meta)
