"""POST /classify: one image or several, top-k predictions and optional Grad-CAM maps."""

from __future__ import annotations

from dataclasses import astuple
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..cache import CACHE_HEADER, cache_key
from ..classify_flow import RAW_CONTENT_TYPES, answer_uploads, read_uploads, resolve_options
from ..dependencies import ApiKeyDep, CacheDep, PolicyDep, RuntimeDep, StateDep
from ..dispatch import within_deadline
from ..schemas import EXAMPLE_RESULT, BatchResult, ClassifyResult, ErrorBody

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
    "responses": {
        "200": {
            "content": {"application/json": {"example": EXAMPLE_RESULT}},
            "headers": {
                CACHE_HEADER: {
                    "description": "hit (from the response cache), miss (computed), bypass (Cache-Control: "
                    "no-cache), off (VITAE_CACHE_MB=0)",
                    "schema": {"type": "string"},
                }
            },
        }
    },
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
    400: "no image, an image that cannot be decoded, or a bad X-Priority or X-Request-Timeout (the detail names what "
    "is accepted)",
    401: "VITAE_API_KEY is set and the request lacks it",
    408: "the body did not arrive within VITAE_BODY_TIMEOUT_S",
    413: "the body is over VITAE_MAX_UPLOAD_BYTES or an image over VITAE_MAX_IMAGE_PIXELS",
    415: "a content type that is neither multipart/form-data nor an image",
    404: "`model` names no served model (the detail lists them)",
    422: "a query parameter out of range or naming no class or cell",
    503: "loading, or the queue is full or shed this request for a more urgent one (Retry-After says when to retry)",
    504: "the request's work passed its deadline (X-Request-Timeout, capped by VITAE_REQUEST_TIMEOUT_S)",
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
    policy: PolicyDep,
    cache: CacheDep,
    _: ApiKeyDep,
    top_k_: TopK = None,
    cam: Cam = False,
    cam_class: CamClass = None,
    cam_layer: CamLayer = None,
    model: ModelName = None,  # read by RuntimeDep, which leases that model's live version
) -> Response:
    """Classify one image (multipart 'file' part or raw image body) or several ('file' parts, in order)."""
    opts = resolve_options(runtime, top_k_, cam, cam_class, cam_layer)
    async with within_deadline(policy.deadline):
        uploads = await read_uploads(request, state.settings.max_files)
        key = cache_key("classify", runtime.served, astuple(opts), uploads) if cache.enabled else b""
        compute = partial(answer_uploads, request, state, runtime, uploads, opts, policy)
        body, source = await cache.answer(key, compute, lookup=policy.use_cache)
    return Response(body, media_type="application/json", headers={CACHE_HEADER: source})
