"""The FastAPI app: a lifespan that owns the model and its batchers, and thin routes that wire pure functions."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile

from model.preprocess import ACCEPTED_FORMATS, ImageDecodeError, ImageTooLargeError

from .artifacts import ServedModel, ensure_artifacts
from .backends import Backend, select_backend
from .batcher import (
    Batcher,
    BatchFailedError,
    DeadlineExceeded,
    Job,
    Outcome,
    QueueFullError,
    ShuttingDownError,
)
from .gradcam import AutogradGradCAM, resolve_cell
from .inference import (
    ClassifyInput,
    ClassifyOutput,
    GradCAMInput,
    PreparedImage,
    classify_batch,
    gradcam_batch,
    prepare_image,
)
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, BodyTooLarge, MetricsMiddleware, too_large_response
from .postprocess import normalize_cam, render_cam, top_k
from .schemas import EXAMPLE_RESULT, BatchResult, CamOut, ClassifyResult, ErrorOut, ItemError, ModelInfo, TimingOut
from .settings import Settings, get_settings

log = logging.getLogger("service")

IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff")
RAW_CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, "application/octet-stream")
ACCEPTED = f"multipart/form-data with 'file' parts, or a raw body of type {', '.join(RAW_CONTENT_TYPES)}"


@dataclass
class Runtime:
    """What the lifespan loads: the served model, its backend and the batchers in front of them."""

    served: ServedModel
    backend: Backend
    reason: str
    classifier: Batcher[ClassifyInput, ClassifyOutput]
    explainer: Batcher[GradCAMInput, np.ndarray] | None
    cam_cells: list[str]


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    status: str = "loading"  # loading -> ready -> draining; or failed
    error: str | None = None
    runtime: Runtime | None = None
    pool: ThreadPoolExecutor | None = None
    loader: asyncio.Task | None = field(default=None, repr=False)

    def begin_drain(self) -> None:
        """Called on SIGTERM: /readyz turns 503 while in-flight requests finish."""
        if self.status != "failed":
            self.status = "draining"
        self.metrics.ready.set(0)


# ---------------------------------------------------------------- loading


def _warm_up(backend: Backend, served: ServedModel, max_batch: int) -> None:
    prep = served.preprocessing
    for batch in sorted({1, max_batch}):
        backend.infer(np.zeros((batch, prep.in_chans, prep.img_size, prep.img_size), np.float32))


def _load_explainer(served: ServedModel) -> AutogradGradCAM | None:
    weights = served.file("weights")
    if weights is None:
        return None
    from model import ViTAE, ViTAEConfig, load_weights

    # Its own copy of the model: hooks on a module shared with the torch backend would fire in its thread.
    return AutogradGradCAM(load_weights(ViTAE(ViTAEConfig.from_dict(served.metadata["config"])), weights))


async def load_model(state: ServiceState, backend: Backend | None = None) -> None:
    """Export if needed, pick and warm the backend, start the batchers; then the service is ready."""
    settings, metrics = state.settings, state.metrics
    try:
        started = time.perf_counter()
        served = await asyncio.to_thread(ensure_artifacts, settings)
        if backend is None:
            selection = await asyncio.to_thread(
                select_backend, settings.backend, served, settings.device, settings.threads, settings.int8_cpu
            )
            backend, reason = selection.backend, selection.reason
        else:
            reason = "given by the caller"
        log.info("backend %s on %s: %s", backend.name, backend.device, reason)
        max_batch = settings.max_batch_size
        if backend.name == "tensorrt":  # the engine's optimization profile ends at the export's max batch
            max_batch = min(max_batch, int(served.metadata.get("settings", {}).get("max_batch", max_batch)))
        classifier = Batcher(
            partial(classify_batch, backend, served),
            max_batch_size=max_batch,
            max_delay_s=settings.max_delay_ms / 1000,
            capacity=settings.queue_capacity,
            name="classify",
            metrics=metrics,
        )
        await classifier.run_on_worker(_warm_up, backend, served, max_batch)
        explainer_model = await asyncio.to_thread(_load_explainer, served)
        explainer = None
        if explainer_model is not None:
            explainer = Batcher(
                partial(gradcam_batch, explainer_model),
                max_batch_size=settings.max_batch_size,
                max_delay_s=settings.max_delay_ms / 1000,
                capacity=settings.queue_capacity,
                name="gradcam",
                metrics=metrics,
            )
            explainer.start()
        classifier.start()
        cam_cells = [cell.name for cell in explainer_model.cells] if explainer_model else []
        state.runtime = Runtime(served, backend, reason, classifier, explainer, cam_cells)
        metrics.backend.labels(backend.name, backend.device).set(1)
        if state.status == "loading":
            state.status = "ready"
            metrics.ready.set(1)
        log.info(
            "serving %s %s (%d classes) from %s; ready in %.1f s",
            served.name,
            served.version,
            served.num_classes,
            served.folder,
            time.perf_counter() - started,
        )
    except Exception as exc:
        state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        log.exception("loading the model failed")


DECODE_NICENESS = 10


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


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    settings = state.settings
    state.pool = ThreadPoolExecutor(
        max_workers=settings.preprocess_threads or min(4, os.cpu_count() or 1),
        thread_name_prefix="vitae-decode",
        initializer=_yield_cpu_to_inference,
    )
    # Loading runs in the background so /healthz and /readyz answer (503) while it exports or warms up.
    state.loader = asyncio.create_task(load_model(state, app.state.given_backend), name="load-model")
    try:
        yield
    finally:
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
        state.pool.shutdown(wait=True, cancel_futures=False)
        log.info("stopped")


# ---------------------------------------------------------------- dependencies


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_runtime(state: Annotated[ServiceState, Depends(get_state)]) -> Runtime:
    if state.status != "ready" or state.runtime is None:
        detail = {
            "loading": "the model is still loading; retry shortly",
            "draining": "the service is shutting down",
            "failed": f"the model failed to load: {state.error}",
        }.get(state.status, state.status)
        raise HTTPException(503, detail=detail, headers={"Retry-After": "5"})
    return state.runtime


bearer_scheme = HTTPBearer(auto_error=False, description="VITAE_API_KEY as a Bearer token")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="VITAE_API_KEY")


def check_api_key(
    state: Annotated[ServiceState, Depends(get_state)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    api_key: Annotated[str | None, Security(api_key_scheme)],
) -> None:
    expected = state.settings.api_key
    if expected is None:
        return
    given = api_key or (bearer.credentials if bearer else None)
    if given is None or not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise HTTPException(
            401,
            detail="missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


StateDep = Annotated[ServiceState, Depends(get_state)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
ApiKeyDep = Annotated[None, Depends(check_api_key)]


# ---------------------------------------------------------------- request helpers


async def read_uploads(request: Request, max_files: int) -> list[bytes]:
    """The images of a request: every multipart 'file' part, or the raw body of an image content type."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=max_files, max_fields=max_files)
        parts = [part for part in form.getlist("file") if isinstance(part, UploadFile)]
        if not parts:
            raise HTTPException(400, detail=f"no 'file' parts in the form; send {ACCEPTED}")
        return [await part.read() for part in parts]
    if content_type not in RAW_CONTENT_TYPES:
        raise HTTPException(415, detail=f"content type {content_type or '(none)'} is not accepted; send {ACCEPTED}")
    body = b"".join([chunk async for chunk in request.stream()])
    if not body:
        raise HTTPException(400, detail=f"the request body is empty; send {ACCEPTED}")
    return [body]


def image_error(exc: Exception) -> HTTPException:
    if isinstance(exc, ImageTooLargeError):
        return HTTPException(413, detail=f"{exc} (VITAE_MAX_IMAGE_PIXELS)")
    if isinstance(exc, ImageDecodeError):
        message = str(exc)
        if "accepted" not in message.lower():
            message += f"; accepted formats: {', '.join(ACCEPTED_FORMATS)}"
        return HTTPException(400, detail=message)
    raise exc


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only http.disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def await_jobs(request: Request, jobs: list[Job], deadline: float) -> list[Outcome]:
    """Every job's outcome; 504 at the deadline and 499 on disconnect, cancelling what has not run."""
    everything = asyncio.gather(*(job.future for job in jobs))
    # Mark its outcome retrieved: after a timeout or a disconnect nobody reads the cancelled gather.
    everything.add_done_callback(lambda f: f.cancelled() or f.exception())
    disconnect = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {everything, disconnect}, timeout=max(0.0, deadline - time.monotonic()), return_when="FIRST_COMPLETED"
        )
        if everything in done:
            return everything.result()
        reason = (499, "the client disconnected") if disconnect in done else (504, "the request's deadline passed")
        raise HTTPException(reason[0], detail=f"{reason[1]} before inference finished (VITAE_REQUEST_TIMEOUT_S)")
    except DeadlineExceeded as exc:
        raise HTTPException(504, detail=f"{exc} (VITAE_REQUEST_TIMEOUT_S)") from exc
    except BatchFailedError as exc:
        raise HTTPException(500, detail=str(exc)) from exc
    finally:
        disconnect.cancel()
        for job in jobs:
            job.future.cancel()  # no-op for the finished; the queued ones leave the queue uncomputed


def submit_all(batcher: Batcher, payloads: list, timeout_s: float) -> list[Job]:
    jobs: list[Job] = []
    try:
        for payload in payloads:
            jobs.append(batcher.submit(payload, timeout_s=timeout_s))
    except QueueFullError as exc:
        for job in jobs:
            job.future.cancel()
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from exc
    except ShuttingDownError as exc:
        for job in jobs:
            job.future.cancel()
        raise HTTPException(503, detail=str(exc), headers={"Retry-After": "5"}) from exc
    return jobs


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@dataclass(frozen=True)
class Answer:
    outcome: Outcome[ClassifyOutput]
    cam_raw: np.ndarray | None  # (h, w) before ReLU, when a CAM was asked for
    cam_class: int | None
    cam_s: float  # autograd Grad-CAM time, 0 for the backend-output CAM


async def prepare_all(
    state: ServiceState, served: ServedModel, uploads: list[bytes], keep_original: bool
) -> list[PreparedImage | HTTPException]:
    """Decode and preprocess every upload in the thread pool; a bad image becomes its own HTTPException."""
    loop = asyncio.get_running_loop()
    prepare = partial(
        prepare_image,
        prep=served.preprocessing,
        max_pixels=state.settings.max_image_pixels,
        keep_original=keep_original,
    )
    prepared = await asyncio.gather(
        *(loop.run_in_executor(state.pool, prepare, data) for data in uploads), return_exceptions=True
    )
    return [image_error(p) if isinstance(p, Exception) else p for p in prepared]


async def infer(
    request: Request,
    state: ServiceState,
    runtime: Runtime,
    images: list[PreparedImage],
    cam: bool,
    layer: int | None,
    target: int | None,
    arrived: float,
) -> list[Answer]:
    """Classify through the batcher; CAMs from the backend's outputs, or by autograd at an earlier cell."""
    deadline = arrived + state.settings.request_timeout_s
    jobs = submit_all(
        runtime.classifier,
        [ClassifyInput(image.pixels, cam and layer is None, target) for image in images],
        max(0.001, deadline - time.monotonic()),
    )
    outcomes = await await_jobs(request, jobs, deadline)
    if not (cam and layer is not None):
        return [Answer(o, o.result.cam_raw, o.result.cam_class, 0.0) for o in outcomes]
    # The CAM explains the backend's own top-1 unless a class was asked for.
    targets = [target if target is not None else int(np.argmax(o.result.logits)) for o in outcomes]
    cam_jobs = submit_all(
        runtime.explainer,
        [GradCAMInput(image.pixels, t, layer) for image, t in zip(images, targets, strict=True)],
        max(0.001, deadline - time.monotonic()),
    )
    cams = await await_jobs(request, cam_jobs, deadline)
    return [Answer(o, c.result, t, c.inference_s) for o, c, t in zip(outcomes, cams, targets, strict=True)]


async def shape_result(
    state: ServiceState, served: ServedModel, image: PreparedImage, answer: Answer, k: int, arrived: float
) -> ClassifyResult:
    cam = None
    if answer.cam_raw is not None:
        loop = asyncio.get_running_loop()
        pngs = await loop.run_in_executor(state.pool, render_cam, normalize_cam(answer.cam_raw), image.original)
        cam = CamOut(class_index=answer.cam_class, label=served.class_names[answer.cam_class], **vars(pngs))
    outcome = answer.outcome
    return ClassifyResult(
        model=ModelInfo(name=served.name, version=served.version),
        predictions=[vars(p) for p in top_k(outcome.result.logits, served.class_names, k)],
        cam=cam,
        timing_ms=TimingOut(
            queue=ms(outcome.queue_s),
            inference=ms(outcome.inference_s + answer.cam_s),
            total=ms(time.monotonic() - arrived),
        ),
    )


# ---------------------------------------------------------------- app


CLASSIFY_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["file"],
                },
            },
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in RAW_CONTENT_TYPES},
        },
    },
    "responses": {"200": {"content": {"application/json": {"example": EXAMPLE_RESULT}}}},
}


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> FastAPI:
    """Build the app; `backend` replaces the configured one (benchmarks and fault-injection tests)."""
    settings = settings or get_settings()
    metrics = Metrics()
    app = FastAPI(
        title="ViTAE inference service",
        version="1",
        summary="Image classification with dynamic batching and Grad-CAM maps",
        lifespan=lifespan,
    )
    app.state.service = ServiceState(settings, metrics)
    app.state.given_backend = backend

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return too_large_response(exc.limit)

    @app.get("/healthz", tags=["operations"])
    async def healthz(state: StateDep) -> JSONResponse:
        """Liveness: 200 while the process serves; 503 when the model failed to load (restart it)."""
        if state.status == "failed":
            return JSONResponse({"status": "failed", "detail": state.error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["operations"])
    async def readyz(state: StateDep) -> JSONResponse:
        """Readiness: 200 once the model is loaded and warmed up; 503 while loading, draining or failed."""
        body: dict = {"status": state.status}
        if state.runtime is not None:
            rt = state.runtime
            body |= {"model": rt.served.name, "version": rt.served.version, "backend": rt.backend.name}
            body |= {"device": rt.backend.device, "reason": rt.reason}
        if state.error:
            body["detail"] = state.error
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus_metrics(state: StateDep) -> Response:
        """Prometheus exposition of this app's registry."""
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/model", tags=["operations"])
    async def model_card(runtime: RuntimeDep, _: ApiKeyDep) -> dict:
        """What is served: name, version, classes, input size, CAM cells, backend."""
        served = runtime.served
        return {
            "name": served.name,
            "version": served.version,
            "class_names": served.class_names,
            "preprocessing": served.preprocessing.to_dict(),
            "grid": list(served.grid),
            "cam_layers": runtime.cam_cells,
            "backend": runtime.backend.name,
            "device": runtime.backend.device,
        }

    @app.post(
        "/classify",
        tags=["inference"],
        response_model=ClassifyResult | BatchResult,
        response_model_exclude_none=True,
        openapi_extra=CLASSIFY_OPENAPI,
    )
    async def classify(
        request: Request,
        state: StateDep,
        runtime: RuntimeDep,
        _: ApiKeyDep,
        top_k_: Annotated[
            int | None, Query(alias="top_k", ge=1, description="classes to return (1..K)", examples=[3])
        ] = None,
        cam: Annotated[bool, Query(description="add a Grad-CAM map and PNGs", examples=[True])] = False,
        cam_class: Annotated[
            str | None, Query(description="class index or label for the CAM; default: top-1", examples=["Sneaker"])
        ] = None,
        cam_layer: Annotated[
            str | None, Query(description="cell index or name for the CAM (see /model); default: the last cell")
        ] = None,
    ) -> ClassifyResult | BatchResult:
        """Classify one image (multipart 'file' part or raw image body) or several ('file' parts, in order)."""
        arrived = time.monotonic()
        settings, served = state.settings, runtime.served
        k = min(5, served.num_classes) if top_k_ is None else top_k_
        if k > served.num_classes:
            raise HTTPException(422, detail=f"top_k must be between 1 and {served.num_classes}, got {k}")
        try:
            target = served.class_index(cam_class) if cam_class is not None else None
            layer = resolve_cam_layer(runtime, cam_layer) if cam else None
        except ValueError as exc:
            raise HTTPException(422, detail=str(exc)) from exc
        uploads = await read_uploads(request, settings.max_files)
        prepared = await prepare_all(state, served, uploads, keep_original=cam)
        if len(prepared) == 1 and isinstance(prepared[0], HTTPException):
            raise prepared[0]
        good = [p for p in prepared if isinstance(p, PreparedImage)]
        answers = iter(await infer(request, state, runtime, good, cam, layer, target, arrived))
        results = [
            ItemError(error=ErrorOut(status=item.status_code, detail=str(item.detail)))
            if isinstance(item, HTTPException)
            else await shape_result(state, served, item, next(answers), k, arrived)
            for item in prepared
        ]
        return BatchResult(results=results) if len(uploads) > 1 else results[0]

    return app


def resolve_cam_layer(runtime: Runtime, cam_layer: str | None) -> int | None:
    """None when the backend's outputs give the CAM exactly (last cell, mean pooling); else a cell index."""
    if runtime.explainer is None:
        if cam_layer is None and runtime.served.pooling == "mean":
            return None
        raise ValueError("cam_layer needs the PyTorch weights (files.weights), which these artifacts lack")
    cells = runtime.cam_cells
    index = len(cells) - 1 if cam_layer is None else resolve_cell(cells, cam_layer)
    if index == len(cells) - 1 and runtime.served.pooling == "mean":
        return None
    return index
