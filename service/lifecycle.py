"""The service's lifecycle: what the lifespan loads (Runtime), the state the routes read, and shutdown.

1. create_app builds a ServiceState in LOADING and the lifespan starts `load_model` in the background.
2. load_model: ensure the artifacts (export when missing or stale), select and warm up the backend,
   start the classify batcher (and the autograd Grad-CAM batcher when weights exist) -> READY.
3. SIGTERM (or the lifespan's exit) -> DRAINING: /readyz answers 503, open requests finish.
4. The lifespan's exit drains the batchers, closes the backend and the decode pool.
A failure while loading -> FAILED (/healthz 503: restart the process).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial

import numpy as np
from fastapi import FastAPI

from .artifacts import ServedArtifacts, ensure_artifacts
from .backends import Backend, precision_of, select_backend, streams_of
from .batcher import Batcher
from .gradcam import AutogradGradCAM
from .inference import ClassifyInput, ClassifyOutput, GradCAMInput, classify_batch, gradcam_batch
from .metrics import Metrics
from .numerics import NonFiniteGuard
from .settings import Settings
from .tracing import Tracing

log = logging.getLogger("service")

DECODE_NICENESS = 10
# Largest batch per stream when a CPU backend runs several streams and VITAE_MAX_BATCH_SIZE is unset: on CPU
# a batch gains nothing over single images (ViTAE-T at 224, two single-thread OpenVINO streams: 21 images/s
# at batch 1, 17 at batch 8), so a few images keep the per-batch overhead small without adding latency.
CPU_STREAM_MAX_BATCH = 4


class Status(StrEnum):
    """The service's state, as /readyz reports it: LOADING -> READY -> DRAINING, or FAILED."""

    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class Runtime:
    """What the lifespan loads: the served model, its backend and the batchers in front of them."""

    served: ServedArtifacts
    backend: Backend
    reason: str
    classifier: Batcher[ClassifyInput, ClassifyOutput]
    explainer: Batcher[GradCAMInput, np.ndarray] | None
    cam_cells: list[str]
    guard: NonFiniteGuard


@dataclass
class ServiceState:
    """Everything the routes read, on `app.state.service`; `runtime` is set once loading succeeds."""

    settings: Settings
    metrics: Metrics
    status: Status = Status.LOADING
    error: str | None = None
    runtime: Runtime | None = None
    tracing: Tracing = field(default_factory=Tracing)  # off unless create_app read OTEL_* turning it on
    pool: ThreadPoolExecutor | None = None
    loader: asyncio.Task | None = field(default=None, repr=False)

    @property
    def ready(self) -> bool:
        """The one readiness decision, used by every route that reports readiness (/readyz and the v2 ones)."""
        return self.status is Status.READY and self.runtime is not None

    def begin_drain(self) -> None:
        """Called on SIGTERM: /readyz turns 503 while in-flight requests finish."""
        if self.status is not Status.FAILED:
            self.status = Status.DRAINING
        self.metrics.ready.set(0)


# ---------------------------------------------------------------- loading


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


async def _choose_backend(settings: Settings, served: ServedArtifacts, given: Backend | None) -> tuple[Backend, str]:
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
    )
    return selection.backend, selection.reason


def _batcher(run_batch, settings: Settings, metrics: Metrics, name: str, max_batch: int, workers: int = 1) -> Batcher:
    return Batcher(
        run_batch,
        max_batch_size=max_batch,
        max_delay_s=settings.max_delay_ms / 1000,
        capacity=settings.queue_capacity,
        name=name,
        metrics=metrics,
        workers=workers,
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


async def _start_runtime(state: ServiceState, served: ServedArtifacts, backend: Backend, reason: str) -> Runtime:
    """Warm the backend up on the classify batcher's worker, then start both batchers."""
    settings, metrics = state.settings, state.metrics
    max_batch = classify_max_batch(settings, backend, served)
    guard = NonFiniteGuard.with_onnxruntime_fp32(backend, served, settings.threads, metrics)
    run = partial(classify_batch, backend, served, guard=guard)
    classifier = _batcher(run, settings, metrics, "classify", max_batch, streams_of(backend))
    await classifier.run_on_worker(_warm_up, backend, served, max_batch)
    explainer_model = await asyncio.to_thread(_load_explainer, served)
    explainer = None
    if explainer_model is not None:
        explainer = _batcher(
            partial(gradcam_batch, explainer_model), settings, metrics, "gradcam", settings.max_batch_size
        )
        explainer.start()
    classifier.start()
    cam_cells = [cell.name for cell in explainer_model.cells] if explainer_model else []
    return Runtime(served, backend, reason, classifier, explainer, cam_cells, guard)


async def load_model(state: ServiceState, backend: Backend | None = None) -> None:
    """Export if needed, pick and warm the backend, start the batchers; then the service is ready."""
    try:
        started = time.perf_counter()
        served = await asyncio.to_thread(ensure_artifacts, state.settings)
        backend, reason = await _choose_backend(state.settings, served, backend)
        log.info("backend %s on %s in %s: %s", backend.name, backend.device, precision_of(backend), reason)
        state.runtime = await _start_runtime(state, served, backend, reason)
        state.tracing.observe(state.runtime)  # its batches traced when tracing is on
        state.metrics.backend.labels(backend.name, backend.device).set(1)
        if state.status is Status.LOADING:
            state.status = Status.READY
            state.metrics.ready.set(1)
        log.info(
            "serving %s %s (%d classes) from %s; ready in %.1f s",
            served.name,
            served.version,
            served.num_classes,
            served.folder,
            time.perf_counter() - started,
        )
    except Exception as exc:
        state.status, state.error = Status.FAILED, f"{type(exc).__name__}: {exc}"
        log.error("loading the model failed: %s", state.error)  # one line; the traceback at debug level
        log.debug("loading the model failed", exc_info=True)


# ---------------------------------------------------------------- lifespan


def _yield_cpu_to_inference() -> None:
    """Lower this decode thread's scheduling priority (Linux: nice applies per thread).

    When the cores are saturated, the backend's intra-op threads then win them; decoding fills the gaps. A
    descheduled intra-op thread stalls its whole parallel region, so without this a few milliseconds of
    decoding cost the backend far more than their own CPU time.
    """
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + DECODE_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


async def _shut_down(state: ServiceState) -> None:
    state.begin_drain()
    if not state.loader.done():
        state.loader.cancel()
    await asyncio.gather(state.loader, return_exceptions=True)
    runtime = state.runtime
    if runtime is not None:
        # The server has already finished every open request; this drains anything still queued.
        await runtime.classifier.close()
        if runtime.explainer is not None:
            await runtime.explainer.close()
        runtime.backend.close()
        runtime.guard.close()
    state.pool.shutdown(wait=True, cancel_futures=False)
    await state.tracing.shutdown()  # after the batchers, so that their last spans leave too
    log.info("stopped")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Owns every resource: the decode pool, the loader task, the batchers and the backend."""
    state: ServiceState = app.state.service
    settings = state.settings
    state.pool = ThreadPoolExecutor(
        max_workers=settings.preprocess_threads or min(4, os.cpu_count() or 1),
        thread_name_prefix="vitae-decode",
        initializer=_yield_cpu_to_inference,
    )
    state.tracing.start()
    # Loading runs in the background so /healthz and /readyz answer (503) while it exports or warms up.
    state.loader = asyncio.create_task(load_model(state, app.state.given_backend), name="load-model")
    try:
        yield
    finally:
        await _shut_down(state)
