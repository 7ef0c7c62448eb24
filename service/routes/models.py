"""GET /models: every model the service knows, its versions and state, and what serves it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..backends import precision_of
from ..dependencies import ApiKeyDep, StateDep
from ..registry import ModelEntry, ModelRegistry

router = APIRouter(tags=["models"])


def describe(registry: ModelRegistry, entry: ModelEntry) -> dict[str, Any]:
    """One model as GET /models lists it."""
    body: dict[str, Any] = {
        "name": entry.name,
        "default": entry.name == registry.default,
        "state": entry.state.value,
        "version": entry.version,  # the live version: every request for this model goes to it
        "loading": entry.loading,  # a version being loaded, not yet live
        "versions": registry.versions_on_disk(entry.name) or [v for v in [entry.version] if v],
    }
    if entry.live is not None:
        backend = entry.live.runtime.backend
        body |= {"backend": backend.name, "device": backend.device, "precision": precision_of(backend)}
    if entry.failure is not None:
        body["failure"] = entry.failure  # the last version refused, and why
    return body


@router.get("/models")
async def list_models(state: StateDep, _: ApiKeyDep) -> dict:
    """Names, versions (on disk, live, loading), state (loading, ready, failed with the reason, unloaded),
    backend and precision of every model; `default` marks the one a request that names none gets."""
    registry = state.models
    return {"models": [describe(registry, entry) for entry in registry.entries.values()]}
