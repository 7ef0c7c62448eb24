"""Probes and introspection: /healthz, /readyz, /metrics and /model."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..backends import precision_of, streams_of
from ..dependencies import ApiKeyDep, RuntimeDep, StateDep
from ..lifecycle import Status
from ..runtime import artifacts_mismatch

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz(state: StateDep) -> JSONResponse:
    """Liveness: 200 while the process serves; 503 when the model failed to load (restart it)."""
    if state.status is Status.FAILED:
        return JSONResponse({"status": Status.FAILED.value, "detail": state.error}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """Readiness: 200 once the model is loaded and warmed up; 503 while loading, draining or failed."""
    body: dict = {"status": state.status.value}
    if state.runtime is not None:
        rt = state.runtime
        body |= {"model": rt.served.name, "version": rt.served.version, "backend": rt.backend.name}
        body |= {"device": rt.backend.device, "precision": precision_of(rt.backend), "streams": streams_of(rt.backend)}
        body["reason"] = rt.reason
        mismatch = artifacts_mismatch(rt.served, rt.backend)
        if mismatch:
            body["artifacts_mismatch"] = mismatch
        if getattr(rt.backend, "precision_gate", None):  # the PyTorch-CUDA backend's measured precision choice
            body["precision_gate"] = rt.backend.precision_gate
    if state.error:
        body["detail"] = state.error
    return JSONResponse(body, status_code=200 if state.ready else 503)


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(state: StateDep) -> Response:
    """Prometheus exposition of this app's registry."""
    return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/model")
async def model_card(runtime: RuntimeDep, _: ApiKeyDep) -> dict:
    """What is served: name, version, classes, input size, CAM cells, backend, device, precision."""
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
        "precision": precision_of(runtime.backend),
        "streams": streams_of(runtime.backend),
        "reason": runtime.reason,  # why this backend, and why its precision
        "precision_gate": getattr(runtime.backend, "precision_gate", None) or None,  # vs fp32, per candidate
    }
