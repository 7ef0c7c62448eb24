"""The model control endpoints: load a version of a model (a new one, or an older one to roll back), or unload it.

Off unless VITAE_ADMIN_KEY is set; each request sends it as `X-Admin-Key`. A load answers once the version is
live (200) or refused (422, the live version keeps serving); see service.models for the swap.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from ..dependencies import AdminKeyDep, StateDep
from ..models import LoadRefused, load_version, unload
from ..registry import ModelRegistry
from .models import describe

router = APIRouter(prefix="/admin/models", tags=["admin"])

Version = Annotated[
    str | None, Query(description="the version folder to load; default: the newest complete one", examples=["2"])
]


def known(registry: ModelRegistry, name: str, version: str | None) -> None:
    """404 unless `name` (and `version`, if given) can be loaded, listing what can."""
    if registry.repository is None:
        if name not in registry.entries:
            raise HTTPException(404, detail=f"unknown model '{name}'; this service serves {list(registry.entries)}")
        return
    names = registry.names_on_disk()
    if name not in names:
        raise HTTPException(404, detail=f"no model '{name}' in {registry.repository}; it holds: {names}")
    versions = registry.versions_on_disk(name)
    if version is not None and version not in versions:
        raise HTTPException(404, detail=f"model '{name}' has no complete version '{version}'; it has: {versions}")


@router.post("/{name}/load")
async def load(name: str, state: StateDep, _: AdminKeyDep, version: Version = None) -> dict:
    """Load `version` of `name` and put it live once it passed its checks; 422 when refused (the old one serves)."""
    known(state.models, name, version)
    try:
        entry = await load_version(state, name, version)
    except LoadRefused as exc:
        raise HTTPException(422, detail=str(exc)) from None
    return describe(state.models, entry)


@router.post("/{name}/unload")
async def unload_model(name: str, state: StateDep, _: AdminKeyDep) -> dict:
    """Stop serving `name`: new requests for it get 404; those already running finish."""
    if name not in state.models.entries:
        raise HTTPException(404, detail=f"unknown model '{name}'; this service knows {list(state.models.entries)}")
    return describe(state.models, await unload(state, name))
