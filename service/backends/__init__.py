"""Inference backends behind one small interface: normalised images in, logits and last-cell tokens out.

`base.py` holds the `Backend` protocol (its lifecycle, numbered) and what every backend shares; one module per
backend (`torch_backend`, `onnxruntime_backend`, `tensorrt_backend`); this module builds one by name
(`create_backend`) or picks the fastest that runs here (`select_backend`). Every backend is called from one
dedicated worker thread only (see batcher.py), so none of them needs its own locking.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..artifacts import ServedModel
from .base import Backend, BackendUnavailable, cuda_device_count, gpu_index, wants_gpu
from .onnxruntime_backend import OnnxRuntimeBackend, session_device
from .tensorrt_backend import TensorRTBackend
from .torch_backend import TorchBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailable",
    "OnnxRuntimeBackend",
    "Selection",
    "TensorRTBackend",
    "TorchBackend",
    "create_backend",
    "cuda_device_count",
    "gpu_index",
    "select_backend",
    "session_device",
    "wants_gpu",
]

BACKENDS = ("tensorrt", "onnxruntime", "torch")


@dataclass(frozen=True)
class Selection:
    backend: Backend
    reason: str


def create_backend(name: str, served: ServedModel, device: str, threads: int = 0, int8: bool = True) -> Backend:
    """Build one named backend on `device` ('auto', 'cpu', 'cuda[:N]'); BackendUnavailable when it cannot run."""
    gpu = wants_gpu(device)
    if gpu is None:
        gpu = cuda_device_count() > 0 or name == "tensorrt"
        device = "cuda" if gpu else "cpu"
    if name == "tensorrt":
        if not gpu:
            raise BackendUnavailable("TensorRT needs VITAE_DEVICE=cuda (or auto with a GPU)")
        return TensorRTBackend(served, device)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(served, gpu=gpu, device=device, threads=threads, int8=int8)
    if name == "torch":
        return TorchBackend(served, device=device if gpu else "cpu", threads=threads)
    raise ValueError(f"unknown backend {name!r}; use auto or one of {', '.join(BACKENDS)}")


def select_backend(
    requested: str, served: ServedModel, device: str = "auto", threads: int = 0, int8: bool = True
) -> Selection:
    """Build the requested backend, or for 'auto' the fastest one that can run here, and say why.

    The order for auto is fixed by what is fastest for this model: a TensorRT engine (fused kernels,
    FP16) beats ONNX Runtime's CUDA EP, which beats PyTorch eager on GPU; on CPU ONNX Runtime's
    optimised graph (folded BatchNorm, fused GELU) beats PyTorch eager.
    """
    if requested != "auto":
        backend = create_backend(requested, served, device, threads, int8)
        reason = f"VITAE_BACKEND={requested}"
        if wants_gpu(device) and not backend.device.startswith("cuda"):
            reason += f"; VITAE_DEVICE={device} was asked for, but it runs on {backend.device} (CUDA did not load)"
        return Selection(backend, reason)
    gpu = wants_gpu(device)
    gpus = cuda_device_count()
    if gpu is None:
        gpu = gpus > 0
    if gpu:
        device = device if device != "auto" else "cuda"
        order = [("tensorrt", device), ("onnxruntime", device), ("torch", device)]
    else:
        order = [("onnxruntime", "cpu"), ("torch", "cpu")]
    skipped = []
    for name, dev in order:
        try:
            backend = create_backend(name, served, dev, threads, int8)
        except BackendUnavailable as exc:
            skipped.append(f"{name}: {exc}")
            continue
        if gpu and not backend.device.startswith("cuda"):
            skipped.append(f"{name}: asked for {dev} but runs on {backend.device}")
            backend.close()
            continue
        where = f"{gpus} GPU(s) visible" if gpu else f"CPU only ({os.cpu_count()} cores, no GPU requested or visible)"
        reason = f"auto: {name} on {backend.device} is the fastest available ({where})"
        if skipped:
            reason += "; skipped " + "; ".join(skipped)
        return Selection(backend, reason)
    raise BackendUnavailable("no backend can run here: " + "; ".join(skipped))
