"""Shared fixtures: small real models saved in this project's checkpoint format (helpers live in support/)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.checkpoints import DEMO_CHECKPOINT, FASHION_CLASSES, exported, tiny_model

from export.source import load_source
from model import ViTAE
from model.checkpoint import checkpoint_metadata, save_checkpoint


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


@pytest.fixture(scope="session")
def artifacts(tiny_checkpoint) -> Path:
    """The export stage's artifacts of the grayscale tiny checkpoint, built once per session (read-only)."""
    return exported(tiny_checkpoint)


@pytest.fixture(scope="module")
def demo_model() -> ViTAE:
    """The shipped demo model (skips where the checkpoint is absent)."""
    if not DEMO_CHECKPOINT.is_file():
        pytest.skip(f"the demo checkpoint {DEMO_CHECKPOINT} is not there")
    return load_source(DEMO_CHECKPOINT).model
