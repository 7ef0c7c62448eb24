"""POST /classify: one image or several, top-k predictions and optional Grad-CAM maps."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request

from ..classify_flow import RAW_CONTENT_TYPES, prepare_all, read_uploads, resolve_options, shape_result
from ..dependencies import ApiKeyDep, RuntimeDep, StateDep
from ..dispatch import infer, within_deadline
from ..inference import PreparedImage
from ..schemas import EXAMPLE_RESULT, BatchResult, ClassifyResult, ErrorBody, ErrorOut, ItemError

router = APIRouter(tags=["inference"])

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

TopK = Annotated[int | None, Query(alias="top_k", ge=1, description="classes to return (1..K)", examples=[3])]
Cam = Annotated[
    bool,
    Query(
        description="add a Grad-CAM map, a heatmap PNG and an overlay JPEG; both are the image scaled down to fit "
        "VITAE_CAM_MAX_SIDE pixels (256 by default) on the longer side, aspect kept: scale them to the original",
        examples=[True],
    ),
]
CamClass = Annotated[
    str | None, Query(description="class index or label for the CAM; default: top-1", examples=["Sneaker"])
]
ModelName = Annotated[
    str | None, Query(description="model to ask (see GET /models); default: the default model", examples=["vitae"])
]
CamLayer = Annotated[
    str | None,
    Query(
        description="cell index or name for the CAM (see /model); default: the last cell; checked even when cam=false"
    ),
]


ERRORS = {
    400: "no image, or an image that cannot be decoded (the detail names what is accepted)",
    401: "VITAE_API_KEY is set and the request lacks it",
    408: "the body did not arrive within VITAE_BODY_TIMEOUT_S",
    413: "the body is over VITAE_MAX_UPLOAD_BYTES or an image over VITAE_MAX_IMAGE_PIXELS",
    415: "a content type that is neither multipart/form-data nor an image",
    404: "`model` names no served model (the detail lists them)",
    422: "a query parameter out of range or naming no class or cell",
    503: "loading, or the queue is full (Retry-After says when to retry)",
    504: "the request's work passed VITAE_REQUEST_TIMEOUT_S",
}


@router.post(
    "/classify",
    response_model=ClassifyResult | BatchResult,
    response_model_exclude_none=True,
    openapi_extra=CLASSIFY_OPENAPI,
    responses={status: {"model": ErrorBody, "description": text} for status, text in ERRORS.items()},
)
async def classify(
    request: Request,
    state: StateDep,
    runtime: RuntimeDep,
    _: ApiKeyDep,
    top_k_: TopK = None,
    cam: Cam = False,
    cam_class: CamClass = None,
    cam_layer: CamLayer = None,
    model: ModelName = None,  # read by RuntimeDep, which leases that model's live version
) -> ClassifyResult | BatchResult:
    """Classify one image (multipart 'file' part or raw image body) or several ('file' parts, in order)."""
    arrived = time.monotonic()
    served = runtime.served
    opts = resolve_options(runtime, top_k_, cam, cam_class, cam_layer)
    async with within_deadline(arrived + state.settings.request_timeout_s):
        uploads = await read_uploads(request, state.settings.max_files)
        prepared = await prepare_all(state, served, uploads, keep_original=cam)
        if len(prepared) == 1 and isinstance(prepared[0], HTTPException):
            raise prepared[0]
        good = [p for p in prepared if isinstance(p, PreparedImage)]
        answers = iter(await infer(request, state, runtime, good, opts, arrived))
        results = [
            ItemError(error=ErrorOut(status=item.status_code, detail=str(item.detail)))
            if isinstance(item, HTTPException)
            else await shape_result(state, served, item, next(answers), opts.k, arrived)
            for item in prepared
        ]
    return BatchResult(results=results) if len(uploads) > 1 else results[0]
