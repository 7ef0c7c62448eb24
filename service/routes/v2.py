"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) beside /classify, on the same batcher.

The model is the artifacts' name at the artifacts' version. It takes exactly one of two inputs: `images`
(already preprocessed, the exported model's own input) or `image_bytes` (encoded images that the service
decodes and preprocesses with model.preprocess, as /classify does). A request of B images is B jobs of the
classify batcher, so v2 and /classify traffic share batches, limits, deadlines and metrics.
Every error of these routes, including the API key's 401 and the loading 503, answers {"error": "..."}.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Coroutine
from importlib import metadata
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import v2_protocol as v2
from ..artifacts import ServedModel
from ..classify_flow import Answer, Options, infer, prepare_all, resolve_cam_layer
from ..dependencies import ApiKeyDep, RuntimeDep, StateDep
from ..inference import PreparedImage
from ..lifecycle import Runtime, ServiceState, Status
from ..middleware import BodyTooLarge
from ..postprocess import normalize_cam


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


def cam_available(runtime: Runtime) -> bool:
    try:
        resolve_cam_layer(runtime, None)
    except ValueError:
        return False
    return True


def get_model(request: Request, runtime: RuntimeDep, name: str) -> ServedModel:
    """The served model when the path names it (and its version, if the path has one); else 404."""
    served = runtime.served
    version = request.path_params.get("version")
    if name != served.name:
        raise HTTPException(404, detail=f"unknown model '{name}'; this server serves '{served.name}'")
    if version is not None and version != served.version:
        raise HTTPException(
            404, detail=f"model '{name}' has no version '{version}'; the served version is '{served.version}'"
        )
    return served


ModelDep = Annotated[ServedModel, Depends(get_model)]


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


@router.get("/health/ready", summary="Server readiness")
async def server_ready(runtime: RuntimeDep) -> dict:
    """200 once the model is loaded and warmed up; 503 while loading, draining or failed."""
    return {"ready": True}


@router.get("/models/stats", summary="Statistics of every model")
async def all_model_stats(state: StateDep, runtime: RuntimeDep, _: ApiKeyDep) -> dict:
    """Triton's statistics extension, from the service's Prometheus counters (one shared classify batcher)."""
    return {"model_stats": [model_stats(state.metrics.registry, runtime.served)]}


@both_paths(router.get, "/stats", summary="Statistics of the model")
async def one_model_stats(state: StateDep, served: ModelDep, _: ApiKeyDep) -> dict:
    """Triton's statistics extension for this model."""
    return {"model_stats": [model_stats(state.metrics.registry, served)]}


@both_paths(router.get, "/ready", summary="Model readiness")
async def model_ready(served: ModelDep) -> dict:
    """200 when the model (and version, if given) is served and ready; 404 for another name or version."""
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
    request: Request, state: StateDep, runtime: RuntimeDep, served: ModelDep, _: ApiKeyDep
) -> Response:
    """Classify a batch given as `images` or `image_bytes`; JSON or binary tensor data, in and out."""
    arrived = time.monotonic()
    body = v2.inflate(await request.body(), request.headers.get("content-encoding"), state.settings.max_upload_bytes)
    parsed = v2.parse_infer_request(body, request.headers.get(v2.HEADER_LENGTH))
    sig = v2.signature(served, cam=cam_available(runtime))
    wanted = parsed.outputs or [v2.RequestedOutput(v2.LOGITS, parsed.binary_default)]
    check_outputs(wanted, sig, served)
    cam = any(out.name == v2.CAM for out in wanted)
    target, layer = cam_target(parsed.parameters, served, runtime) if cam else (None, None)
    images = await model_inputs(parsed.inputs, sig, state, served)
    opts = Options(k=0, cam=cam, target=target, layer=layer)  # k is /classify's top-k, unused here
    answers = await infer(request, state, runtime, images, opts, arrived)
    outputs = [(output_tensor(out, answers, served), out.binary) for out in wanted]
    content, headers = v2.encode_infer_response(served.name, served.version, parsed.id, outputs)
    return Response(content, headers=headers)


def check_outputs(wanted: list[v2.RequestedOutput], sig: v2.Signature, served: ServedModel) -> None:
    names = [out.name for out in wanted]
    if len(set(names)) != len(names):
        raise v2.ProtocolError(f"each output may be asked for once; got {names}")
    for out in wanted:
        sig.output(out.name)
        if out.classification and out.name != v2.LOGITS:
            raise v2.ProtocolError(f"parameters.classification applies to '{v2.LOGITS}' only, not '{out.name}'")
        if out.classification > served.num_classes:
            raise v2.ProtocolError(
                f"parameters.classification on '{v2.LOGITS}' must be 1..{served.num_classes}, got {out.classification}"
            )


def cam_target(parameters: dict[str, Any], served: ServedModel, runtime: Runtime) -> tuple[int | None, int | None]:
    """(class to explain or None for top-1, autograd cell or None for the backend's exact last-cell CAM)."""
    value = parameters.get("cam_class")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise v2.ProtocolError(f"parameters.cam_class must be a class index or label, got {value!r}")
    try:
        target = None if value is None else served.class_index(value)
        return target, resolve_cam_layer(runtime, None)
    except ValueError as exc:
        raise v2.ProtocolError(f"parameters.cam_class: {exc}") from None


async def model_inputs(
    inputs: list[v2.Tensor], sig: v2.Signature, state: ServiceState, served: ServedModel
) -> list[PreparedImage]:
    """The request's one input -> preprocessed images, one per batch entry."""
    for tensor in inputs:
        sig.input(tensor.name)
    if len(inputs) != 1:
        raise v2.ProtocolError(v2.INPUT_RULE + f"; got {[t.name for t in inputs]}")
    (tensor,) = inputs
    spec = sig.input(tensor.name)
    if tensor.name == v2.IMAGE_BYTES and len(tensor.shape) == 1:
        v2.check_input(tensor, spec.datatype, spec.shape[:1])  # [B] is accepted for [B, 1]
    else:
        v2.check_input(tensor, spec.datatype, spec.shape)
    count, limit = tensor.shape[0], state.settings.max_files
    if not 1 <= count <= limit:
        raise v2.ProtocolError(
            f"input '{tensor.name}' holds {count} images; one request takes 1..{limit} (VITAE_MAX_FILES)"
        )
    if tensor.name == v2.IMAGES:
        pixels = tensor.data  # (B, C, S, S)
        if not np.isfinite(pixels).all():
            raise v2.ProtocolError(f"input '{v2.IMAGES}' holds NaN or infinite values")
        return [PreparedImage(pixels[i], None) for i in range(count)]
    encoded = tensor.data if tensor.binary else [from_base64(item, i) for i, item in enumerate(tensor.data)]
    prepared = await prepare_all(state, served, encoded, keep_original=False)
    for i, item in enumerate(prepared):
        if isinstance(item, HTTPException):
            raise HTTPException(item.status_code, detail=f"input '{v2.IMAGE_BYTES}' element {i}: {item.detail}")
    return prepared


def from_base64(text: bytes, index: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise v2.ProtocolError(
            f"input '{v2.IMAGE_BYTES}' element {index}: as JSON data an image must be its base64 text "
            "(or send it raw as binary tensor data)"
        ) from None


def output_tensor(out: v2.RequestedOutput, answers: list[Answer], served: ServedModel) -> v2.Tensor:
    """One requested output over the batch's answers."""
    if out.name == v2.LOGITS:
        logits = np.stack([a.outcome.result.logits for a in answers])  # (B, K)
        if out.classification:
            strings = v2.classification_strings(logits, out.classification, served.class_names)
            return v2.Tensor(out.name, "BYTES", (len(answers), out.classification), strings)
        return v2.Tensor(out.name, "FP32", logits.shape, logits)
    if out.name == v2.TOKENS:
        tokens = np.stack([a.outcome.result.tokens for a in answers])  # (B, N, D)
        return v2.Tensor(out.name, "FP32", tokens.shape, tokens)
    cams = normalize_cam(np.stack([a.cam_raw for a in answers])).astype(np.float32)  # (B, h, w)
    return v2.Tensor(out.name, "FP32", cams.shape, cams)


def model_stats(registry: CollectorRegistry, served: ServedModel) -> dict:
    """Triton's per-model statistics from the classify batcher's Prometheus samples (all routes together)."""

    def sample(name: str) -> float:
        return registry.get_sample_value(name, {"model": "classify"}) or 0.0

    images, batches = sample("vitae_batch_size_sum"), sample("vitae_batch_size_count")
    return {
        "name": served.name,
        "version": served.version,
        "inference_count": int(images),
        "execution_count": int(batches),
        "inference_stats": {
            "queue": {
                "count": int(sample("vitae_queue_wait_seconds_count")),
                "ns": ns(sample("vitae_queue_wait_seconds_sum")),
            },
            "compute_infer": {"count": int(batches), "ns": ns(sample("vitae_inference_seconds_sum"))},
            "fail": {"count": int(sample("vitae_batch_failures_total")), "ns": 0},
        },
    }


def ns(seconds: float) -> int:
    return round(seconds * 1e9)
