"""This project's checkpoint format: weights as safetensors plus a JSON file that describes them.

`<name>.safetensors` holds the state dict (its header metadata also carries the JSON, so the weights
file alone is enough); `<name>.json` beside it is the human-readable copy.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import ViTAEConfig
from .vitae import ViTAE
from .weights import CheckpointError, load_weights, read_safetensors_metadata

FORMAT = "vitae-checkpoint/1"
METADATA_KEY = "vitae"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def checkpoint_metadata(
    model: ViTAE,
    *,
    variant: str,
    class_names: list[str],
    train_args: dict[str, Any] | None = None,
    epoch: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to rebuild and serve the model, without the command that trained it."""
    cfg = model.config
    if len(class_names) != cfg.num_classes:
        raise ValueError(f"{len(class_names)} class names for {cfg.num_classes} classes")
    return {
        "format": FORMAT,
        "variant": variant,
        "config": cfg.to_dict(),
        "num_classes": cfg.num_classes,
        "class_names": list(class_names),
        "in_chans": cfg.in_chans,
        "img_size": cfg.img_size,
        "preprocessing": cfg.preprocessing.to_dict(),
        "train_args": train_args or {},
        "epoch": epoch,
        "metrics": metrics or {},
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save_checkpoint(model: ViTAE, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write `<path>.safetensors` and `<path>.json` (path given with or without suffix)."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(metadata)})
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(metadata, indent=2) + "\n")
    return path


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any] | None:
    """The project metadata of a checkpoint, or None when the file is not one of ours."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if sidecar.is_file() and path.suffix != ".json":
        meta = json.loads(sidecar.read_text())
    elif path.suffix == ".safetensors" and path.is_file():
        raw = read_safetensors_metadata(path).get(METADATA_KEY)
        meta = json.loads(raw) if raw else None
    else:
        return None
    if meta is not None and meta.get("format") != FORMAT:
        return None
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[ViTAE, dict[str, Any]]:
    """Rebuild the model a project checkpoint describes and load its weights (strictly)."""
    path = Path(path)
    meta = read_checkpoint_metadata(path)
    if meta is None:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (no '{FORMAT}' metadata); "
            "for released ViTAE weights build the model with create_model and use load_weights"
        )
    config = ViTAEConfig.from_dict(meta["config"])
    model = ViTAE(config)
    load_weights(model, path)
    return model.to(device).eval(), meta
