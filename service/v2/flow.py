"""One v2 infer request against the served model, in the order the route calls these around `dispatch.infer`.

check_outputs (the outputs asked for) -> cam_target (the CAM's class and cell) -> request_policy (priority and
deadline from the parameters) -> compute_outputs: model_inputs (the one input -> prepared images) ->
service.dispatch.infer -> output_tensor (answers -> each output asked for). For `image_bytes` inputs the response
cache (service.cache, keyed by `outputs_key`) runs compute_outputs only on a miss.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from fastapi import HTTPException, Request

from ..artifacts import ServedArtifacts
from ..cache import cache_key
from ..classify_flow import resolve_cam_layer
from ..decoding import prepare_all
from ..dispatch import Answer, Options, infer
from ..inference import PreparedImage
from ..jobs import Priority
from ..lifecycle import Runtime, ServiceState
from ..numerics import range_problem
from ..postprocess import normalize_cam
from ..request_policy import RequestPolicy, with_parameters
from . import (
    IMAGE_BYTES,
    IMAGES,
    INPUT_RULE,
    LOGITS,
    TOKENS,
    ProtocolError,
    RequestedOutput,
    Signature,
    Tensor,
    check_input,
    classification_strings,
)


def cam_available(runtime: Runtime) -> bool:
    """Whether this runtime can give the last cell's CAM (the `cam` output is offered only then)."""
    try:
        resolve_cam_layer(runtime, None)
    except ValueError:
        return False
    return True


def check_outputs(wanted: list[RequestedOutput], sig: Signature, served: ServedArtifacts) -> None:
    """Each output asked for once, known to the model, and classification only on logits within 1..K."""
    names = [out.name for out in wanted]
    if len(set(names)) != len(names):
        raise ProtocolError(f"each output may be asked for once; got {names}")
    for out in wanted:
        sig.output(out.name)
        if out.classification and out.name != LOGITS:
            raise ProtocolError(f"parameters.classification applies to '{LOGITS}' only, not '{out.name}'")
        if out.classification > served.num_classes:
            raise ProtocolError(
                f"parameters.classification on '{LOGITS}' must be 1..{served.num_classes}, got {out.classification}"
            )


def cam_target(parameters: dict[str, Any], served: ServedArtifacts, runtime: Runtime) -> tuple[int | None, int | None]:
    """(class to explain or None for top-1, autograd cell or None for the backend's exact last-cell CAM)."""
    value = parameters.get("cam_class")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise ProtocolError(f"parameters.cam_class must be a class index or label, got {value!r}")
    try:
        target = None if value is None else served.class_index(value)
        return target, resolve_cam_layer(runtime, None)
    except ValueError as exc:
        raise ProtocolError(f"parameters.cam_class: {exc}") from None


async def model_inputs(
    inputs: list[Tensor],
    sig: Signature,
    state: ServiceState,
    served: ServedArtifacts,
    decoder: Any = None,
    priority: Priority = Priority.NORMAL,
) -> list[PreparedImage]:
    """The request's one input -> preprocessed images, one per batch entry."""
    for tensor in inputs:
        sig.input(tensor.name)
    if len(inputs) != 1:
        raise ProtocolError(INPUT_RULE + f"; got {[t.name for t in inputs]}")
    (tensor,) = inputs
    spec = sig.input(tensor.name)
    if tensor.name == IMAGE_BYTES and len(tensor.shape) == 1:
        check_input(tensor, spec.datatype, spec.shape[:1])  # [B] is accepted for [B, 1]
    else:
        check_input(tensor, spec.datatype, spec.shape)
    count, limit = tensor.shape[0], state.settings.max_files
    if not 1 <= count <= limit:
        raise ProtocolError(
            f"input '{tensor.name}' holds {count} images; one request takes 1..{limit} (VITAE_MAX_FILES)"
        )
    if tensor.name == IMAGES:
        pixels = tensor.data  # (B, C, S, S)
        problem = range_problem(pixels, served.preprocessing, IMAGES)
        if problem:
            raise ProtocolError(problem)
        return [PreparedImage(pixels[i], None) for i in range(count)]
    encoded = tensor.data if tensor.binary else [from_base64(item, i) for i, item in enumerate(tensor.data)]
    prepared = await prepare_all(state, served, encoded, keep_original=False, decoder=decoder, priority=priority)
    for i, item in enumerate(prepared):
        if isinstance(item, HTTPException):
            raise HTTPException(item.status_code, detail=f"input '{IMAGE_BYTES}' element {i}: {item.detail}")
    return prepared


def from_base64(text: bytes, index: int) -> bytes:
    """An `image_bytes` element sent as JSON data (its base64 text) -> the image's bytes."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(
            f"input '{IMAGE_BYTES}' element {index}: as JSON data an image must be its base64 text "
            "(or send it raw as binary tensor data)"
        ) from None


def output_tensor(out: RequestedOutput, answers: list[Answer], served: ServedArtifacts) -> Tensor:
    """One requested output over the batch's answers."""
    if out.name == LOGITS:
        logits = np.stack([a.outcome.result.logits for a in answers])  # (B, K)
        if out.classification:
            strings = classification_strings(logits, out.classification, served.class_names)
            return Tensor(out.name, "BYTES", (len(answers), out.classification), strings)
        return Tensor(out.name, "FP32", logits.shape, logits)
    if out.name == TOKENS:
        tokens = np.stack([a.outcome.result.tokens for a in answers])  # (B, N, D)
        return Tensor(out.name, "FP32", tokens.shape, tokens)
    cams = normalize_cam(np.stack([a.cam_raw for a in answers])).astype(np.float32)  # (B, h, w)
    return Tensor(out.name, "FP32", cams.shape, cams)


def request_policy(policy: RequestPolicy, parameters: dict[str, Any], limit_s: float) -> RequestPolicy:
    """The headers' policy with the request's `priority` and `timeout` (seconds) parameters over it."""
    try:
        return with_parameters(policy, parameters, limit_s)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


def outputs_key(
    served: ServedArtifacts, wanted: list[RequestedOutput], cam: tuple, inputs: list[Tensor]
) -> bytes | None:
    """The response cache's key for encoded images (None for `images`, whose pixels are not worth hashing)."""
    if len(inputs) != 1 or inputs[0].name != IMAGE_BYTES:
        return None
    (tensor,) = inputs
    options = (tuple((out.name, out.classification) for out in wanted), cam, tensor.binary)
    return cache_key("v2", served, options, tensor.data)


async def compute_outputs(
    request: Request,
    state: ServiceState,
    runtime: Runtime,
    inputs: list[Tensor],
    sig: Signature,
    wanted: list[RequestedOutput],
    opts: Options,
    policy: RequestPolicy,
) -> tuple[list[Tensor], int]:
    """Every output asked for, and their size in bytes (what the response cache counts)."""
    served = runtime.served
    images = await model_inputs(inputs, sig, state, served, runtime.decoder, policy.priority)
    answers = await infer(request, runtime, images, opts, policy)
    tensors = [output_tensor(out, answers, served) for out in wanted]
    size = sum(t.data.nbytes if isinstance(t.data, np.ndarray) else sum(map(len, t.data)) for t in tensors)
    return tensors, size
