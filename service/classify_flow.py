"""The steps of one /classify request, as small functions the route calls in order.

1. resolve_options   query parameters -> top-k, CAM class and cell (422 when wrong)
2. read_uploads      multipart 'file' parts or a raw image body -> bytes (400 / 415)
3. prepare_all       bytes -> model input in the decode pool; a bad image becomes its own error (400 / 413);
                     steps 3-5 run within_deadline (504 past VITAE_REQUEST_TIMEOUT_S from the request's start)
4. infer             through the classify batcher (and the Grad-CAM batcher for an earlier cell);
                     504 at the deadline, 499 on disconnect, 503 when the queue is full
5. shape_result      logits -> top-k, CAM -> PNGs, timings -> the response model
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from model.preprocess import ACCEPTED_FORMATS, ImageDecodeError, ImageTooLargeError

from .artifacts import ServedModel
from .batcher import Batcher, BatchFailedError, DeadlineExceeded, Job, Outcome, QueueFullError, ShuttingDownError
from .gradcam import resolve_cell
from .inference import ClassifyInput, ClassifyOutput, GradCAMInput, PreparedImage, prepare_image
from .lifecycle import Runtime, ServiceState
from .postprocess import normalize_cam, render_cam, top_k
from .schemas import CamOut, ClassifyResult, ModelInfo, TimingOut

log = logging.getLogger("service")

IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff")
RAW_CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, "application/octet-stream")
ACCEPTED = f"multipart/form-data with 'file' parts, or a raw body of type {', '.join(RAW_CONTENT_TYPES)}"


# ---------------------------------------------------------------- 1. options


@dataclass(frozen=True)
class Options:
    k: int
    cam: bool
    target: int | None  # class index for the CAM; None: the top-1
    layer: int | None  # cell index for an autograd CAM; None: from the backend's outputs


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


def resolve_options(
    runtime: Runtime, k: int | None, cam: bool, cam_class: str | None, cam_layer: str | None
) -> Options:
    """The query parameters checked against the served model; 422 naming what is accepted."""
    served = runtime.served
    k = min(5, served.num_classes) if k is None else k
    if k > served.num_classes:
        raise HTTPException(422, detail=f"top_k must be between 1 and {served.num_classes}, got {k}")
    try:
        target = served.class_index(cam_class) if cam_class is not None else None
        # Checked whenever given, like cam_class, so that a typo is not silently ignored with cam=false.
        layer = resolve_cam_layer(runtime, cam_layer) if cam or cam_layer is not None else None
    except ValueError as exc:
        raise HTTPException(422, detail=str(exc)) from exc
    return Options(k, cam, target, layer if cam else None)


# ---------------------------------------------------------------- 2-3. uploads and decoding


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
    """The HTTP error for an image that failed to decode (400), is too large (413) or broke the decoder (500).

    Each is that image's own error: in a request with several images the others are still answered.
    """
    if isinstance(exc, ImageTooLargeError):
        return HTTPException(413, detail=f"{exc} (VITAE_MAX_IMAGE_PIXELS)")
    if isinstance(exc, ImageDecodeError):
        message = str(exc)
        if "accepted" not in message.lower():
            message += f"; accepted formats: {', '.join(ACCEPTED_FORMATS)}"
        return HTTPException(400, detail=message)
    log.error("preparing an image failed unexpectedly", exc_info=exc)
    return HTTPException(500, detail=f"preparing this image failed unexpectedly ({type(exc).__name__})")


async def prepare_all(
    state: ServiceState, served: ServedModel, uploads: list[bytes], keep_original: bool
) -> list[PreparedImage | HTTPException]:
    """Decode and preprocess every upload in the thread pool; a bad image becomes its own HTTPException."""
    loop = asyncio.get_running_loop()
    prepare = partial(
        prepare_image,
        prep=served.preprocessing,
        max_pixels=state.settings.max_image_pixels,
        cam_max_side=state.settings.cam_max_side if keep_original else None,
    )
    prepared = await asyncio.gather(
        *(loop.run_in_executor(state.pool, prepare, data) for data in uploads), return_exceptions=True
    )
    return [image_error(p) if isinstance(p, Exception) else p for p in prepared]


# ---------------------------------------------------------------- 3-5. one deadline for all the work


@asynccontextmanager
async def within_deadline(deadline: float) -> AsyncIterator[None]:
    """504 when decoding, inference and CAM drawing together pass the request's deadline (time.monotonic()).

    What has not started is cancelled (queued decodes and batcher jobs); a decode already running in the
    pool finishes there, bounded by VITAE_MAX_IMAGE_PIXELS and VITAE_CAM_MAX_SIDE.
    """
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            yield
    except TimeoutError:
        raise HTTPException(
            504, detail="the request's deadline passed before its images were answered (VITAE_REQUEST_TIMEOUT_S)"
        ) from None


# ---------------------------------------------------------------- 4. inference through the batchers


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
    """Queue every payload or none: 503 with Retry-After when the queue is full or shutting down."""
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


@dataclass(frozen=True)
class Answer:
    outcome: Outcome[ClassifyOutput]
    cam_raw: np.ndarray | None  # (h, w) before ReLU, when a CAM was asked for
    cam_class: int | None
    cam_s: float  # autograd Grad-CAM time, 0 for the backend-output CAM


async def infer(
    request: Request, state: ServiceState, runtime: Runtime, images: list[PreparedImage], opts: Options, arrived: float
) -> list[Answer]:
    """Classify through the batcher; CAMs from the backend's outputs, or by autograd at an earlier cell."""
    deadline = arrived + state.settings.request_timeout_s
    cam, layer, target = opts.cam, opts.layer, opts.target
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


# ---------------------------------------------------------------- 5. the response


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def shape_result(
    state: ServiceState, served: ServedModel, image: PreparedImage, answer: Answer, k: int, arrived: float
) -> ClassifyResult:
    """One image's response: its top-k, its CAM rendered to PNGs (in the decode pool), its timings."""
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
