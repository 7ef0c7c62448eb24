"""One model version made ready to answer: its backend selected and warmed up, its batchers started (a Runtime).

1. choose_backend   the configured backend for these artifacts (or the one the caller gives)
2. start_runtime    warm the backend up on the classify batcher's worker, then start the classify batcher (and the
                    autograd Grad-CAM batcher when the artifacts have weights)
3. close_runtime    drain both batchers (every queued image is answered), then close the backend
The service keeps one Runtime per served model (service.registry); a new version is a new Runtime.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from .artifacts import ServedArtifacts
from .backends import Backend, select_backend, streams_of
from .batcher import Batcher
from .gradcam import AutogradGradCAM
from .inference import ClassifyInput, ClassifyOutput, GradCAMInput, classify_batch, gradcam_batch
from .metrics import Metrics
from .numerics import NonFiniteGuard
from .settings import Settings

log = logging.getLogger(__name__)

# Largest batch per stream when a CPU backend runs several streams and VITAE_MAX_BATCH_SIZE is unset: on CPU
# a batch gains nothing over single images (ViTAE-T at 224, two single-thread OpenVINO streams: 21 images/s
# at batch 1, 17 at batch 8), so a few images keep the per-batch overhead small without adding latency.
CPU_STREAM_MAX_BATCH = 4


@dataclass
class Runtime:
    """One loaded model version: the served artifacts (name, version), its backend and the batchers in front."""

    served: ServedArtifacts
    backend: Backend
    reason: str
    classifier: Batcher[ClassifyInput, ClassifyOutput]
    explainer: Batcher[GradCAMInput, np.ndarray] | None
    cam_cells: list[str]
    guard: NonFiniteGuard
    decoder: Any = None  # service.gpu_decode.GpuDecoder when PyTorch serves on CUDA: JPEGs decoded there


def _warm_up(backend: Backend, served: ServedArtifacts, max_batch: int) -> None:
    prep = served.preprocessing
    for batch in sorted({1, max_batch}):
        backend.infer(np.zeros((batch, prep.in_chans, prep.img_size, prep.img_size), np.float32))


def _load_explainer(served: ServedArtifacts) -> AutogradGradCAM | None:
    weights = served.file("weights")
    if weights is None:
        return None
    from export.serving import rebuild_model

    # Its own copy of the model: hooks on a module shared with the torch backend would fire in its thread.
    return AutogradGradCAM(rebuild_model(served.metadata, weights))


def artifacts_mismatch(served: ServedArtifacts, backend: Backend) -> str | None:
    """One line when the backend is not the one the artifacts were made for, else None: a TensorRT plan served by
    another backend, an OpenVINO int8 export served by another, or artifacts without a plan served on a GPU."""
    meta, where = served.metadata, f"{getattr(backend, 'name', '?')} on {getattr(backend, 'device', '?')}"
    on_gpu = str(getattr(backend, "device", "cpu")).startswith("cuda")
    if "plan" in meta.files and getattr(backend, "name", None) != "tensorrt":
        gpu = (meta.tensorrt or {}).get("gpu_name", "a GPU")
        return (
            f"{served.folder} holds a TensorRT plan built for {gpu}, but {where} serves it (the plan is unused; "
            "VITAE_BACKEND=tensorrt on that GPU uses it)"
        )
    if meta.settings.get("cpu_int8") and (getattr(backend, "name", None) != "openvino" or on_gpu):
        return f"{served.folder} was exported with an OpenVINO int8 model for CPU, but {where} serves it in fp32"
    if "plan" not in meta.files and on_gpu:
        return (
            f"{served.folder} was exported without a TensorRT plan (a CPU export), but {where} serves it; "
            "export on this GPU (python -m export) for the TensorRT plan"
        )
    return None


async def choose_backend(settings: Settings, served: ServedArtifacts, given: Backend | None) -> tuple[Backend, str]:
    """The backend to serve `served` with, and why; `given` (benchmarks, fault-injection tests) wins."""
    if given is not None:
        return given, "given by the caller"
    selection = await asyncio.to_thread(
        select_backend,
        settings.backend,
        served,
        settings.device,
        settings.threads,
        settings.cpu_precision,
        settings.openvino_cache_dir,
        settings.infer_streams,
        settings.gpu_precision,
    )
    mismatch = artifacts_mismatch(served, selection.backend)
    if mismatch:
        log.warning("%s", mismatch)
        return selection.backend, f"{selection.reason}; NOTE: {mismatch}"
    return selection.backend, selection.reason


def _batcher(
    run_batch, settings: Settings, metrics: Metrics, name: str, max_batch: int, workers: int = 1, backend: Any = None
) -> Batcher:
    """A batcher from the settings. With a `backend` that computes a lone batch on every core, urgent traffic makes
    it run one batch at a time for VITAE_URGENT_WINDOW_S (elsewhere that would only idle cores)."""
    alone_on_every_core = workers > 1 and getattr(backend, "runs_alone_on_every_core", False)
    return Batcher(
        run_batch,
        max_batch_size=max_batch,
        max_delay_s=settings.max_delay_ms / 1000,
        capacity=settings.queue_capacity,
        name=name,
        metrics=metrics,
        workers=workers,
        wait_when_idle=settings.batch_wait_when_idle,
        urgent_window_s=settings.urgent_window_s if alone_on_every_core else 0.0,
    )


def classify_max_batch(settings: Settings, backend: Backend, served: ServedArtifacts) -> int:
    """The classify batcher's largest batch: VITAE_MAX_BATCH_SIZE, within what the backend can take.

    TensorRT's optimization profile ends at the export's max batch. A CPU backend running several streams
    takes at most CPU_STREAM_MAX_BATCH images per batch unless VITAE_MAX_BATCH_SIZE is set explicitly.
    """
    max_batch = settings.max_batch_size
    if backend.name == "tensorrt":
        max_batch = min(max_batch, served.metadata.max_batch)
    if streams_of(backend) > 1 and "max_batch_size" not in settings.model_fields_set:
        max_batch = min(max_batch, CPU_STREAM_MAX_BATCH)
    return max_batch


async def start_runtime(
    settings: Settings, metrics: Metrics, served: ServedArtifacts, backend: Backend, reason: str, prefix: str = ""
) -> Runtime:
    """Warm the backend up on the classify batcher's worker, then start both batchers.

    `prefix` goes before the batchers' metric labels (`classify`, `gradcam`) when several models are served.
    On failure the backend and the batchers' threads are closed before the error propagates.
    """
    max_batch = classify_max_batch(settings, backend, served)
    label = f"{prefix}classify"
    guard = NonFiniteGuard.with_onnxruntime_fp32(backend, served, settings.threads, metrics, label)
    run = partial(classify_batch, backend, served, guard=guard)
    classifier = _batcher(run, settings, metrics, label, max_batch, streams_of(backend), backend)
    try:
        await classifier.run_on_worker(_warm_up, backend, served, max_batch)
        explainer_model = await asyncio.to_thread(_load_explainer, served)
    except BaseException:
        await classifier.close()
        backend.close()
        guard.close()
        raise
    explainer = None
    if explainer_model is not None:
        run_cam = partial(gradcam_batch, explainer_model)
        explainer = _batcher(run_cam, settings, metrics, f"{prefix}gradcam", settings.max_batch_size)
        explainer.start()
    classifier.start()
    cam_cells = [cell.name for cell in explainer_model.cells] if explainer_model else []
    decoder = image_decoder(settings, backend, served)
    return Runtime(served, backend, reason, classifier, explainer, cam_cells, guard, decoder)


def image_decoder(settings: Settings, backend: Backend, served: ServedArtifacts) -> Any:
    """A GpuDecoder when PyTorch serves on CUDA and VITAE_GPU_DECODE is on (JPEG uploads decoded on the device, the
    batch stacked there); None elsewhere: the PIL path in the decode pool."""
    device = str(getattr(backend, "device", "cpu"))
    if not settings.gpu_decode or getattr(backend, "name", None) != "torch" or not device.startswith("cuda"):
        return None
    from .gpu_decode import GpuDecoder, decoder_available, supports

    if not decoder_available(device) or not supports(served.preprocessing):
        log.info(
            "uploads are decoded by PIL: torchvision's nvJPEG decoder is not available or cannot follow %s's "
            "preprocessing (%s)",
            served.name,
            served.preprocessing.interpolation,
        )
        return None
    log.info("JPEG uploads are decoded on %s (nvJPEG); other formats by PIL", device)
    return GpuDecoder(served.preprocessing, device, settings.max_image_pixels)


async def close_runtime(runtime: Runtime) -> None:
    """Answer everything still queued, then close the backend (the runtime is not used afterwards)."""
    await runtime.classifier.close()
    if runtime.explainer is not None:
        await runtime.explainer.close()
    runtime.backend.close()
    runtime.guard.close()
