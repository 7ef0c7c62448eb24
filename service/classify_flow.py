"""The steps of one /classify request, as small functions the route calls in order.

1. resolve_options   query parameters -> top-k, CAM class and cell (422 when wrong)
2. read_uploads      multipart 'file' parts or a raw image body -> bytes (400 / 415)
3. prepare_all       bytes -> model input (`service.decoding`: the decode pool, or the GPU for JPEGs when PyTorch
                     serves on CUDA); a bad image becomes its own error (400 / 413); steps 2-5 run
                     `service.dispatch.within_deadline` (504 past VITAE_REQUEST_TIMEOUT_S)
4. infer             `service.dispatch.infer`: through the classify batcher (and the Grad-CAM batcher for an
                     earlier cell); 504 at the deadline, 499 on disconnect, 503 when the queue is full
5. shape_result      logits -> top-k, CAM -> pictures, timings -> the response model
Steps 3-5 are `answer_uploads`, what the response cache (service.cache) runs on a miss: a hit skips them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from .artifacts import ServedArtifacts
from .decoding import prepare_all
from .dispatch import Answer, Options, infer
from .gradcam import resolve_cell
from .inference import PreparedImage
from .lifecycle import Runtime, ServiceState
from .postprocess import normalize_cam, render_cam, top_k
from .request_policy import RequestPolicy
from .schemas import BatchResult, CamOut, ClassifyResult, ErrorOut, ItemError, ModelInfo, TimingOut
from .tracing import step

log = logging.getLogger("service")

IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff")
RAW_CONTENT_TYPES = (*IMAGE_CONTENT_TYPES, "application/octet-stream")
ACCEPTED = f"multipart/form-data with 'file' parts, or a raw body of type {', '.join(RAW_CONTENT_TYPES)}"


# ---------------------------------------------------------------- 1. options


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
    with step("read upload") as span:
        uploads = await _read_uploads(request, max_files)
        span.set_attributes({"vitae.images": len(uploads), "vitae.request.bytes": sum(map(len, uploads))})
        return uploads


async def _read_uploads(request: Request, max_files: int) -> list[bytes]:
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


# ---------------------------------------------------------------- 5. the response


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def shape_result(
    state: ServiceState, served: ServedArtifacts, image: PreparedImage, answer: Answer, k: int, arrived: float
) -> ClassifyResult:
    """One image's response: its top-k, its CAM rendered to pictures (on the CAM pool's threads), its timings."""
    cam = None
    if answer.cam_raw is not None:
        loop = asyncio.get_running_loop()
        with step("cam", **{"vitae.cam.class": answer.cam_class}):  # drawing the heatmap PNG and overlay JPEG
            pictures = await loop.run_in_executor(
                state.cam_pool,
                render_cam,
                normalize_cam(answer.cam_raw),
                image.original,
                state.settings.cam_max_side,
                image.extent,
            )
        cam = CamOut(class_index=answer.cam_class, label=served.class_names[answer.cam_class], **vars(pictures))
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


# ---------------------------------------------------------------- 3-5. one request's answer


async def answer_uploads(
    request: Request, state: ServiceState, runtime: Runtime, uploads: list[bytes], opts: Options, policy: RequestPolicy
) -> tuple[bytes, int | None]:
    """The response body for `uploads`, and its size when every image was answered (the cache keeps only those)."""
    served = runtime.served
    prepared = await prepare_all(
        state, served, uploads, keep_original=opts.cam, decoder=runtime.decoder, priority=policy.priority
    )
    if len(prepared) == 1 and isinstance(prepared[0], HTTPException):
        raise prepared[0]
    good = [p for p in prepared if isinstance(p, PreparedImage)]
    answers = iter(await infer(request, runtime, good, opts, policy))
    results = [
        ItemError(error=ErrorOut(status=item.status_code, detail=str(item.detail)))
        if isinstance(item, HTTPException)
        else await shape_result(state, served, item, next(answers), opts.k, policy.arrived)
        for item in prepared
    ]
    result = BatchResult(results=results) if len(uploads) > 1 else results[0]
    body = result.model_dump_json(exclude_none=True).encode()
    return body, len(body) if len(good) == len(prepared) else None
