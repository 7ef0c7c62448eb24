"""Loading weights: released ViTAE checkpoints, bare state dicts, safetensors, this project's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

WRAPPER_KEYS = ("state_dict_ema", "state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the offending keys."""


def checkpoint_filter_fn(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap a training checkpoint to its state dict and strip DataParallel/DDP `module.` prefixes."""
    state = checkpoint
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"no state dict of tensors found (looked at the top level and under {', '.join(WRAPPER_KEYS)})"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of any supported weights file (no model needed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return checkpoint_filter_fn(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    return checkpoint_filter_fn(raw)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise a CheckpointError naming every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise CheckpointError("checkpoint does not fit the model — " + " | ".join(problems))


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a weights file into `model` strictly: all keys, all shapes, or nothing."""
    state = read_state_dict(path)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors header, without loading the tensors."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size <= 0 or size > 100_000_000:
            raise CheckpointError(f"{path} has no valid safetensors header")
        header = json.loads(f.read(size))
    return header.get("__metadata__", {}) or {}
