"""What every backend shares: the `Backend` protocol (its lifecycle, numbered), the error that says a backend
cannot run here, and reading VITAE_DEVICE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (missing package, no GPU, no artifact); the message says which."""


class Backend(Protocol):
    """An inference engine for one served model. The lifecycle of a request around it:

    1. setup        `create_backend` / `select_backend` build it from the artifacts (session, engine,
                    module); the lifespan warms it up at batch 1 and at the max batch
    2. preprocess   bytes -> normalised (C, S, S) float32 by `model.preprocess`, in the decode pool
                    (`service.inference.prepare_image`); backends never see bytes. With PyTorch on CUDA, JPEGs
                    are decoded and preprocessed on the GPU instead (`service.gpu_decode`): device tensors
    3. batch        the classify batcher stacks queued images into (B, C, S, S) on a worker thread: a numpy
                    array, or a tensor on the backend's device when any image was decoded there
    4. infer        `infer(images, token_rows)` -> (logits, tokens); the one method each backend implements,
                    called from up to `streams` worker threads at once. `token_rows` names the rows whose
                    tokens a request wants (a CAM, v2's `tokens`): a backend with `selects_tokens` (PyTorch)
                    returns those rows' tokens only, in that order; the others ignore it and return every
                    row's, and `infer_rows` picks the same rows from them
    5. postprocess  logits -> top-k and tokens -> CAM (`service.postprocess`), outside the backend
    `close()` frees the engine when the lifespan ends.
    """

    name: str
    device: str
    precision: str  # what the engine computes in: fp32, bf16 (OpenVINO on CPU), fp16 (TensorRT)
    streams: int  # how many `infer` calls may run at once (the batcher's worker threads)
    selects_tokens: bool  # whether `infer` returns only `token_rows`' tokens (else every row's)

    def infer(self, images: np.ndarray, token_rows: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """images float32 (B, C, S, S), normalised -> logits float32 (B, K), tokens float32 (B, N, D)
        (with `selects_tokens`: (len(token_rows), N, D) when `token_rows` is given)."""
        ...

    def close(self) -> None: ...


def infer_rows(backend: Backend, images: Any, token_rows: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """logits (B, K) and the tokens of `token_rows` only, (R, N, D) in that order (every row's when None).

    A caller's backend (create_app(backend=...)) that does not say `selects_tokens` is called as `infer(images)`.
    """
    if token_rows is None:
        return backend.infer(images)
    if getattr(backend, "selects_tokens", False):
        return backend.infer(images, token_rows=token_rows)
    logits, tokens = backend.infer(images)
    return logits, tokens[list(token_rows)]


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
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return True
    raise ValueError(f"VITAE_DEVICE must be auto, cpu, cuda or cuda:N, got {device!r}")


def gpu_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0
