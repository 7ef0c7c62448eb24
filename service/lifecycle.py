"""The service's lifecycle: what the lifespan loads, the state the routes read, and shutdown.

1. create_app builds a ServiceState in LOADING and the lifespan starts `load_model` in the background.
2. load_model: every model (service.models.load_all): ensure the artifacts (export when missing or stale),
   select and warm up the backend, start its batchers (service.runtime) -> READY once one model serves.
   With a model repository the lifespan also starts the poller, which puts new versions live (service.models).
3. SIGTERM (or the lifespan's exit) -> DRAINING: /readyz answers 503, open requests finish.
4. The lifespan's exit stops the poller, drains every model's batchers, closes the backends and the thread pools.
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

from fastapi import FastAPI

from . import heap
from .backends import Backend
from .decoding import DecodeShares
from .metrics import Metrics
from .models import load_all, poll_repository
from .registry import ModelRegistry
from .runtime import Runtime, close_runtime
from .settings import Settings
from .threads import name_this_thread
from .tracing import Tracing

log = logging.getLogger("service")

DECODE_NICENESS = 10


class Status(StrEnum):
    """The service's state, as /readyz reports it: LOADING -> READY -> DRAINING, or FAILED."""

    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ServiceState:
    """Everything the routes read, on `app.state.service`; `models` holds each served model's runtime."""

    settings: Settings
    metrics: Metrics
    status: Status = Status.LOADING
    error: str | None = None
    models: ModelRegistry = field(init=False)
    tracing: Tracing = field(default_factory=Tracing)  # off unless create_app read OTEL_* turning it on
    pool: ThreadPoolExecutor | None = None
    urgent_pool: ThreadPoolExecutor | None = None  # decodes `high` requests, at normal scheduling priority
    cam_pool: ThreadPoolExecutor | None = None  # draws CAM pictures, apart from the decodes (service.classify_flow)
    decoding: DecodeShares | None = None  # the pools shared by urgency, then fairly between requests
    loader: asyncio.Task | None = field(default=None, repr=False)
    poller: asyncio.Task | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.models = ModelRegistry(self.settings.model_repository, self.settings.default_model)

    @property
    def runtime(self) -> Runtime | None:
        """The default model's live runtime (what /readyz describes)."""
        entry = self.models.entries.get(self.models.default or "")
        return entry.live.runtime if entry is not None and entry.live is not None else None

    @property
    def ready(self) -> bool:
        """The one readiness decision, used by every route that reports readiness (/readyz and the v2 ones)."""
        return self.status is Status.READY and bool(self.models.served_names())

    def begin_drain(self) -> None:
        """Called on SIGTERM: /readyz turns 503 while in-flight requests finish."""
        if self.status is not Status.FAILED:
            self.status = Status.DRAINING
        self.metrics.ready.set(0)


# ---------------------------------------------------------------- loading


async def load_model(state: ServiceState, backend: Backend | None = None) -> None:
    """Load every model (service.models.load_all); the service is ready once one serves, else FAILED."""
    try:
        started = time.perf_counter()
        await load_all(state, backend)
        frozen = heap.settle()  # before READY: the collection's pause falls before the first request
        if state.status is Status.LOADING:
            state.status = Status.READY
            state.metrics.ready.set(1)
        for loaded in state.models.live():
            served, engine = loaded.runtime.served, loaded.runtime.backend
            state.metrics.backend.labels(engine.name, engine.device).set(1)
            name, version, classes, folder = served.name, served.version, served.num_classes, served.folder
            log.info("serving %s %s (%d classes) from %s", name, version, classes, folder)
        log.info("ready in %.1f s (%d objects kept out of garbage collection)", time.perf_counter() - started, frozen)
    except Exception as exc:
        state.status, state.error = Status.FAILED, f"{type(exc).__name__}: {exc}"
        log.error("loading the model failed: %s", state.error)  # one line; the traceback at debug level
        log.debug("loading the model failed", exc_info=True)


# ---------------------------------------------------------------- lifespan


def _yield_cpu_to_inference() -> None:
    """Name this decode thread (service.threads) and lower its scheduling priority (Linux: nice applies per thread).

    When the cores are saturated, the backend's intra-op threads then win them; decoding fills the gaps. A
    descheduled intra-op thread stalls its whole parallel region, so without this a few milliseconds of
    decoding cost the backend far more than their own CPU time.
    """
    name_this_thread("vitae-decode")
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
    if state.poller is not None:
        state.poller.cancel()
        await asyncio.gather(state.poller, return_exceptions=True)
    # The server has already finished every open request; this drains anything still queued.
    for loaded in state.models.live():
        await close_runtime(loaded.runtime)
    state.pool.shutdown(wait=True, cancel_futures=False)
    state.urgent_pool.shutdown(wait=True, cancel_futures=False)
    state.cam_pool.shutdown(wait=True, cancel_futures=False)
    await state.tracing.shutdown()  # after the batchers, so that their last spans leave too
    heap.release()
    log.info("stopped")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Owns every resource: the decode and CAM pools, the loader task, the batchers and the backend."""
    state: ServiceState = app.state.service
    settings = state.settings
    workers = settings.preprocess_threads or min(4, os.cpu_count() or 1)
    state.pool = ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="vitae-decode", initializer=_yield_cpu_to_inference
    )
    state.urgent_pool = ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="vitae-decode", initializer=name_this_thread, initargs=("vitae-decode",)
    )
    # CAM pictures are drawn on threads of their own, at normal priority: in the decode pool they held its places
    # while uploads waited, so batches went out smaller (the experiments: 2.8 -> 3.6 images per batch under load).
    state.cam_pool = ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="vitae-cam", initializer=name_this_thread, initargs=("vitae-cam",)
    )
    state.decoding = DecodeShares(state.pool, workers, urgent=state.urgent_pool)
    state.tracing.start()
    # Loading runs in the background so /healthz and /readyz answer (503) while it exports or warms up.
    state.loader = asyncio.create_task(load_model(state, app.state.given_backend), name="load-model")
    if state.models.repository is not None and settings.model_poll_s > 0:
        state.poller = asyncio.create_task(poll_repository(state), name="poll-model-repository")
    try:
        yield
    finally:
        await _shut_down(state)
