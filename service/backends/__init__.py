"""Inference backends behind one small interface: normalised images in, logits and last-cell tokens out.

`base.py` holds the `Backend` protocol (its lifecycle, numbered) and what every backend shares; one module per
backend (`torch_backend`, `onnxruntime_backend`, `tensorrt_backend`); this module builds one by name
(`create_backend`) or picks the fastest that runs here (`select_backend`). Every backend is called from its
batcher's worker threads only, at most `backend.streams` at once (see batcher.py): a backend with one stream
needs no locking, one with several gives each call its own infer request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import ServedArtifacts
from .base import Backend, BackendUnavailable, cuda_device_count, gpu_index, infer_rows, wants_gpu
from .onnxruntime_backend import OnnxRuntimeBackend, session_device
from .openvino_backend import OpenVINOBackend, PrecisionRefused
from .tensorrt_backend import TensorRTBackend
from .torch_backend import TorchBackend

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailable",
    "OnnxRuntimeBackend",
    "OpenVINOBackend",
    "PrecisionRefused",
    "Selection",
    "TensorRTBackend",
    "TorchBackend",
    "create_backend",
    "cuda_device_count",
    "gpu_index",
    "infer_rows",
    "precision_of",
    "select_backend",
    "session_device",
    "streams_of",
    "wants_gpu",
]

BACKENDS = ("tensorrt", "openvino", "onnxruntime", "torch")


def precision_of(backend: Backend) -> str:
    """What the backend computes in; "unreported" for a caller's backend (create_app(backend=...)) that does not say."""
    return getattr(backend, "precision", "unreported")


def streams_of(backend: Backend) -> int:
    """How many batches the backend computes at once; 1 for a caller's backend that does not say."""
    return max(1, int(getattr(backend, "streams", 1)))


@dataclass(frozen=True)
class Selection:
    backend: Backend
    reason: str


def create_backend(
    name: str,
    served: ServedArtifacts,
    device: str,
    threads: int = 0,
    cpu_precision: str = "auto",
    cache_dir: Path | None = None,
    streams: int = 0,
    gpu_precision: str = "auto",
) -> Backend:
    """Build one named backend on `device` ('auto', 'cpu', 'cuda[:N]'); BackendUnavailable when it cannot run.

    `cpu_precision` (auto, bf16, int8, fp32) applies on CPU; bf16 and int8 there are OpenVINO's, so asking another
    CPU backend for them raises PrecisionRefused rather than quietly serving fp32. `streams` (0: the backend's
    choice) is how many batches OpenVINO and ONNX Runtime compute at once on CPU; the others run one.
    `gpu_precision` (auto, fp16, bf16, fp32) is the torch backend's on CUDA (VITAE_GPU_PRECISION).
    """
    gpu = wants_gpu(device)
    if gpu is None:
        gpu = cuda_device_count() > 0 or name == "tensorrt"
        device = "cuda" if gpu else "cpu"
    if not gpu and cpu_precision in ("bf16", "int8") and name != "openvino":
        raise PrecisionRefused(f"VITAE_CPU_PRECISION={cpu_precision} is served by the openvino backend, not {name}")
    if name == "openvino":
        if gpu:
            raise BackendUnavailable("this service runs OpenVINO on the CPU only; set VITAE_DEVICE=cpu")
        return OpenVINOBackend(served, precision=cpu_precision, threads=threads, streams=streams, cache_dir=cache_dir)
    if name == "tensorrt":
        if not gpu:
            raise BackendUnavailable("TensorRT needs VITAE_DEVICE=cuda (or auto with a GPU)")
        return TensorRTBackend(served, device)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(served, gpu=gpu, device=device, threads=threads, streams=streams)
    if name == "torch":
        return TorchBackend(served, device=device if gpu else "cpu", threads=threads, precision=gpu_precision)
    raise ValueError(f"unknown backend {name!r}; use auto or one of {', '.join(BACKENDS)}")


def select_backend(
    requested: str,
    served: ServedArtifacts,
    device: str = "auto",
    threads: int = 0,
    cpu_precision: str = "auto",
    cache_dir: Path | None = None,
    streams: int = 0,
    gpu_precision: str = "auto",
) -> Selection:
    """Build the requested backend, or for 'auto' the fastest one that can run here, and say why.

    The order for auto is fixed by what is fastest for this model: a TensorRT engine (fused kernels,
    FP16) beats ONNX Runtime's CUDA EP, which beats PyTorch eager on GPU. On CPU OpenVINO comes first
    (ViTAE-T at batch 8 on an AVX-512 EPYC with bf16: about 1.1x ONNX Runtime in fp32, 1.6-1.8x in bf16;
    within noise of it in fp32 on an AVX2-only EPYC), then ONNX Runtime's optimised graph (folded
    BatchNorm, fused GELU), then PyTorch eager. A refused bf16 (PrecisionRefused) is not skipped: the
    operator asked for it and must hear why not.
    """
    if requested != "auto":
        backend = create_backend(requested, served, device, threads, cpu_precision, cache_dir, streams, gpu_precision)
        reason = f"VITAE_BACKEND={requested}"
        if wants_gpu(device) and not backend.device.startswith("cuda"):
            reason += f"; VITAE_DEVICE={device} was asked for, but it runs on {backend.device} (CUDA did not load)"
        return Selection(backend, _with_precision(reason, backend))
    gpu = wants_gpu(device)
    gpus = cuda_device_count()
    if gpu is None:
        gpu = gpus > 0
    if gpu:
        device = device if device != "auto" else "cuda"
        order = [("tensorrt", device), ("onnxruntime", device), ("torch", device)]
    else:
        order = [("openvino", "cpu"), ("onnxruntime", "cpu"), ("torch", "cpu")]
    skipped = []
    for name, dev in order:
        try:
            backend = create_backend(name, served, dev, threads, cpu_precision, cache_dir, streams, gpu_precision)
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
        return Selection(backend, _with_precision(reason, backend))
    raise BackendUnavailable("no backend can run here: " + "; ".join(skipped))


def _with_precision(reason: str, backend: Backend) -> str:
    """The selection's reason plus, for OpenVINO, why it computes in bf16 or fp32."""
    why = getattr(backend, "precision_reason", None)  # only OpenVINOBackend chooses its precision
    return f"{reason}; {backend.precision}: {why}" if why else reason
