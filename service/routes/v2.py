"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) beside /classify, on the same batcher.

The model is the artifacts' name at the artifacts' version. It takes exactly one of two inputs: `images`
(already preprocessed, the exported model's own input) or `image_bytes` (encoded images that the service
decodes and preprocesses with model.preprocess, as /classify does). A request of B images is B jobs of the
classify batcher, so v2 and /classify traffic share batches, limits, deadlines and metrics.
Every error of these routes, including the API key's 401 and the loading 503, answers {"error": "..."}.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from functools import partial
from importlib import metadata
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import v2
from ..artifacts import ServedArtifacts
from ..cache import CACHE_HEADER
from ..dependencies import ApiKeyDep, CacheDep, PolicyDep, RuntimeDep, StateDep
from ..dispatch import Options, within_deadline
from ..lifecycle import ServiceState, Status
from ..middleware import BodyTooLarge
from ..settings import Settings
from ..tracing import step
from ..v2.flow import cam_available, cam_target, check_outputs, compute_outputs, outputs_key, request_policy
from ..v2.stats import model_stats


class ProtocolRoute(APIRoute):
    """Turns every error of a v2 route, raised by the route or by its dependencies, into the protocol's body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_with_protocol_errors(request: Request) -> Response:
            try:
                return await handle(request)
            except v2.ProtocolError as exc:
                return JSONResponse(v2.error_body(str(exc)), status_code=exc.status)
            except StarletteHTTPException as exc:
                return JSONResponse(v2.error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)
            except BodyTooLarge as exc:
                return JSONResponse(v2.error_body(str(exc)), status_code=413, headers={"Connection": "close"})
            except RequestValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                return JSONResponse(v2.error_body(problems), status_code=400)

        return handle_with_protocol_errors


router = APIRouter(prefix="/v2", tags=["v2"], route_class=ProtocolRoute)


# ---------------------------------------------------------------- dependencies


async def get_model(request: Request, runtime: RuntimeDep, name: str) -> ServedArtifacts:
    """The served model the path names (RuntimeDep resolved the name: 404 listing the served ones), at the version
    the path gives, if any: only the live version answers; else 404 naming it."""
    served = runtime.served
    version = request.path_params.get("version")
    if version is not None and version != served.version:
        raise HTTPException(
            404, detail=f"model '{name}' has no version '{version}' live; the served version is '{served.version}'"
        )
    return served


ModelDep = Annotated[ServedArtifacts, Depends(get_model)]


def both_paths(method: Callable, path: str, **kwargs: Any) -> Callable:
    """Register a handler at /models/{name}<path> and /models/{name}/versions/{version}<path>."""

    def register(handler: Callable) -> Callable:
        method(f"/models/{{name}}/versions/{{version}}{path}", **kwargs)(handler)
        return method(f"/models/{{name}}{path}", **kwargs)(handler)

    return register


# ---------------------------------------------------------------- server and model metadata, health


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    """The server's name, version and the protocol extensions it supports."""
    try:
        version = metadata.version("vitae-serve")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": "vitae-serve", "version": version, "extensions": list(v2.EXTENSIONS)}


@router.get("/health/live", summary="Server liveness")
async def server_live(state: StateDep) -> dict:
    """200 while the process serves; 503 when the model failed to load (restart it)."""
    if state.status is Status.FAILED:
        raise HTTPException(503, detail=f"the model failed to load: {state.error}")
    return {"live": True}


def require_ready(state: ServiceState) -> None:
    """503 unless the service is ready, by the same decision as /readyz (draining included)."""
    if not state.ready:
        detail = f"not ready: the service is {state.status.value}" + (f" ({state.error})" if state.error else "")
        raise HTTPException(503, detail=detail, headers={"Retry-After": "5"})


@router.get("/health/ready", summary="Server readiness")
async def server_ready(state: StateDep) -> dict:
    """200 once the model is loaded and warmed up; 503 while loading, draining or failed, as /readyz."""
    require_ready(state)
    return {"ready": True}


@router.get("/models/stats", summary="Statistics of every model")
async def all_model_stats(state: StateDep, _: ApiKeyDep) -> dict:
    """Triton's statistics extension, from the service's Prometheus counters (each model's classify batcher)."""
    require_ready(state)
    runtimes = [loaded.runtime for loaded in state.models.live()]
    return {"model_stats": [model_stats(state.metrics.registry, rt.served, rt.classifier.name) for rt in runtimes]}


@both_paths(router.get, "/stats", summary="Statistics of the model")
async def one_model_stats(state: StateDep, runtime: RuntimeDep, served: ModelDep, _: ApiKeyDep) -> dict:
    """Triton's statistics extension for this model."""
    return {"model_stats": [model_stats(state.metrics.registry, served, runtime.classifier.name)]}


@both_paths(router.get, "/ready", summary="Model readiness")
async def model_ready(state: StateDep, served: ModelDep) -> dict:
    """200 when the model (and version, if given) is served and ready, as /readyz; 404 for another name or version."""
    require_ready(state)
    return {"name": served.name, "ready": True}


@both_paths(router.get, "/config", summary="Triton-style model configuration")
async def model_config(state: StateDep, runtime: RuntimeDep, served: ModelDep, _: ApiKeyDep) -> dict:
    """The model as a Triton ModelConfig (JSON): inputs, outputs, largest request batch, dynamic batching."""
    settings = state.settings
    return v2.model_config(
        served,
        v2.signature(served, cam=cam_available(runtime)),
        backend=runtime.backend.name,
        gpu=runtime.backend.device.startswith("cuda"),
        max_request_batch=settings.max_files,
        max_backend_batch=runtime.classifier.max_batch_size,
        max_queue_delay_s=settings.max_delay_ms / 1000,
    )


@both_paths(router.get, "", summary="Model metadata")
async def model_metadata(runtime: RuntimeDep, served: ModelDep, _: ApiKeyDep) -> dict:
    """The model's versions, inputs and outputs, with the rules for giving them in `parameters`."""
    platform = f"vitae-serve/{runtime.backend.name}"
    return v2.model_metadata(served, v2.signature(served, cam=cam_available(runtime)), platform)


# ---------------------------------------------------------------- inference


INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "example": {
                    "inputs": [
                        {"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES", "data": ["iVBORw0KGgo..."]}
                    ],
                    "outputs": [{"name": "logits"}, {"name": "cam", "parameters": {"binary_data": False}}],
                    "parameters": {"cam_class": "Sneaker"},
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"binary tensor data: the JSON header, then the inputs' bytes ({v2.HEADER_LENGTH})",
            },
        },
    },
}


@both_paths(router.post, "/infer", summary="Inference", response_class=Response, openapi_extra=INFER_OPENAPI)
async def model_infer(
    request: Request,
    state: StateDep,
    runtime: RuntimeDep,
    served: ModelDep,
    asked: PolicyDep,
    cache: CacheDep,
    _: ApiKeyDep,
) -> Response:
    """Classify a batch given as `images` or `image_bytes`; JSON or binary tensor data, in and out."""
    with step("read body") as span:
        body = await request.body()
        span.set_attribute("vitae.request.bytes", len(body))
    # One deadline over every step after the body arrived: parsing, decoding, inference and encoding.
    async with within_deadline(asked.deadline):
        with step("parse body"):
            parsed = await off_the_loop_when_large(len(body), parse_body, body, request.headers, state.settings)
        sig = v2.signature(served, cam=cam_available(runtime))
        wanted = parsed.outputs or [v2.RequestedOutput(v2.LOGITS, parsed.binary_default)]
        check_outputs(wanted, sig, served)
        cam = any(out.name == v2.CAM for out in wanted)
        target, layer = cam_target(parsed.parameters, served, runtime) if cam else (None, None)
        policy = request_policy(asked, parsed.parameters, state.settings.request_timeout_s)
        tokens = any(out.name == v2.TOKENS for out in wanted)
        opts = Options(k=0, cam=cam, target=target, layer=layer, tokens=tokens)
        compute = partial(compute_outputs, request, state, runtime, parsed.inputs, sig, wanted, opts, policy)
        key = outputs_key(served, wanted, (target, layer), parsed.inputs)
        async with within_deadline(policy.deadline):
            tensors, source = await cache.answer(key, compute, lookup=policy.use_cache) if key else (await compute())
            outputs = [(tensor, out.binary) for tensor, out in zip(tensors, wanted, strict=True)]
            with step("encode response"):
                content, headers = await off_the_loop_when_large(
                    len(body), v2.encode_infer_response, served.name, served.version, parsed.id, outputs
                )
    return Response(content, headers=headers | ({CACHE_HEADER: source} if key else {}))


# Bodies at least this large are parsed (and their answers encoded) on a worker thread: a 16 MB JSON body takes
# the CPU for a good part of a second, during which the event loop would answer no probe and no other request.
OFF_THE_LOOP_BYTES = 256 * 1024


def parse_body(body: bytes, headers: Headers, settings: Settings) -> v2.InferRequest:
    """The body inflated (Content-Encoding) and parsed into tensors."""
    body = v2.inflate(body, headers.get("content-encoding"), settings.max_upload_bytes)
    return v2.parse_infer_request(body, headers.get(v2.HEADER_LENGTH))


async def off_the_loop_when_large(size: int, fn: Callable, *args: Any) -> Any:
    """fn(*args) on a worker thread when the request is large, else right here."""
    return await asyncio.to_thread(fn, *args) if size >= OFF_THE_LOOP_BYTES else fn(*args)
