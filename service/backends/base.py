"""What every backend shares: the `Backend` protocol (its lifecycle, numbered), the error that says a backend
cannot run here, and reading VITAE_DEVICE."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (missing package, no GPU, no artifact); the message says which."""


class Backend(Protocol):
    """An inference engine for one served model. The lifecycle of a request around it:

    1. setup        `create_backend` / `select_backend` build it from the artifacts (session, engine,
                    module); the lifespan warms it up at batch 1 and at the max batch
    2. preprocess   bytes -> normalised (C, S, S) float32 by `model.preprocess`, in the decode pool
                    (`service.inference.prepare_image`); backends never see bytes
    3. batch        the classify batcher stacks queued images into (B, C, S, S) on a worker thread
    4. infer        `infer(images)` -> (logits, tokens); the one method each backend implements, called
                    from up to `streams` worker threads at once
    5. postprocess  logits -> top-k and tokens -> CAM (`service.postprocess`), outside the backend
    `close()` frees the engine when the lifespan ends.
    """

    name: str
    device: str
    precision: str  # what the engine computes in: fp32, bf16 (OpenVINO on CPU), fp16 (TensorRT)
    streams: int  # how many `infer` calls may run at once (the batcher's worker threads)

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images float32 (B, C, S, S), normalised -> logits float32 (B, K), tokens float32 (B, N, D)."""
        ...

    def close(self) -> None: ...


def cuda_device_count() -> int:
    """GPUs visible to PyTorch, 0 without CUDA (imports torch lazily: the ORT-only path does not need it)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def wants_gpu(device: str) -> bool | None:
    """'cpu' -> False, 'cuda[:N]' -> True, 'auto' -> None (decide by what is present)."""
    device = device.lower()
    if device == "auto":
        return None
    if device == "cpu":
        return False
    if device == "cuda" or device.startswith("cuda:"):
        return True
    raise ValueError(f"VITAE_DEVICE must be auto, cpu, cuda or cuda:N, got {device!r}")


def gpu_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0
