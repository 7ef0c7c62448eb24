"""Loading model versions and putting them live: the start-up load, the swap, unloading, the repository poller.

The swap of one model (`load_version`), under the model's lock so that loads and unloads of it take turns:
1. load      read the version's artifacts (verified against their digests), select and warm up a backend, start its
             batchers: the checks a start-up load passes. Meanwhile the live version serves as before.
2. publish   the model's `live` becomes the new runtime in one assignment: every request that leases the model from
             then on gets the new version; requests holding the old one finish on it.
3. retire    once no request holds the old runtime it is drained and closed; only then is the lock released, so at
             most two versions of a model are loaded at once, and only during a swap.
A version that fails step 1 is refused: the old version keeps serving, and /models, a log line and the
`vitae_model_loads{outcome="refused"}` metric say why.
Two triggers: the poller (a lifespan task) loads each new complete version folder it sees, and the control
endpoints (routes/admin.py) load a named version, or unload a model. Rolling back is loading an older version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Protocol

from . import heap
from .artifacts import ArtifactsError, ensure_artifacts, read_artifacts
from .backends import Backend, precision_of
from .registry import Loaded, ModelEntry, ModelRegistry, ModelState, version_key
from .runtime import Runtime, choose_backend, close_runtime, start_runtime

if TYPE_CHECKING:
    from .metrics import Metrics
    from .settings import Settings
    from .tracing import Tracing


class ModelHost(Protocol):
    """What loading models needs of the service's state (lifecycle.ServiceState is the one the app holds)."""

    settings: Settings
    models: ModelRegistry
    metrics: Metrics
    tracing: Tracing


log = logging.getLogger("service")


class LoadRefused(RuntimeError):
    """A version failed to load or failed its checks; the message says why and what keeps serving."""


async def _build(state: ModelHost, name: str | None, version: str | None, backend: Backend | None) -> Runtime:
    """Step 1: a warmed-up runtime of `name` at `version` (a repository folder), or of VITAE_ARTIFACTS."""
    settings, registry = state.settings, state.models
    if registry.repository is None:
        served = await asyncio.to_thread(ensure_artifacts, settings)
        if version is not None and version != served.version:
            raise ArtifactsError(f"{settings.artifacts} holds version '{served.version}', not '{version}'")
    else:
        folder = registry.folder(name, version)
        served = await asyncio.to_thread(read_artifacts, folder)
        served = dataclasses.replace(served, name=name, version=version)  # the repository's names rule
    backend, reason = await choose_backend(settings, served, backend)
    log.info(
        "%s %s: backend %s on %s in %s: %s",
        served.name,
        served.version,
        backend.name,
        backend.device,
        precision_of(backend),
        reason,
    )
    prefix = f"{served.name}/" if registry.repository is not None else ""
    runtime = await start_runtime(settings, state.metrics, served, backend, reason, prefix)
    state.tracing.observe(runtime)  # its batches traced when tracing is on
    return runtime


async def retire(old: Loaded) -> None:
    """Step 3: close a runtime once no request holds it."""
    await old.idle.wait()
    await close_runtime(old.runtime)
    served = old.runtime.served
    log.info("model %s: version %s unloaded", served.name, served.version)


def _refuse(state: ModelHost, entry: ModelEntry, version: str | None, exc: Exception) -> LoadRefused:
    reason = f"{type(exc).__name__}: {exc}"
    entry.failure = {"version": str(version), "reason": reason}
    keeps = f"version {entry.version} keeps serving" if entry.live else "nothing serves this model"
    if entry.live is None and entry.state is not ModelState.UNLOADED:
        entry.state = ModelState.FAILED
    state.metrics.model_loads.labels(entry.name, "refused").inc()
    log.error("model %s: version %s refused (%s); %s", entry.name, version, reason, keeps)
    log.debug("loading %s %s failed", entry.name, version, exc_info=True)
    return LoadRefused(f"model '{entry.name}' version '{version}' was refused: {reason}; {keeps}")


async def load_version(
    state: ModelHost, name: str, version: str | None = None, backend: Backend | None = None
) -> ModelEntry:
    """Load `version` of `name` (default: the newest complete one) and put it live; LoadRefused when it fails."""
    registry = state.models
    entry = registry.entry(name)
    async with entry.lock:
        if version is None and registry.repository is not None:
            version = max(registry.versions_on_disk(name), key=version_key, default=None)
            if version is None:
                raise _refuse(state, entry, None, ArtifactsError(f"no complete version of '{name}' on disk"))
        entry.loading = version
        if version is not None:
            entry.seen.add(version)
        try:
            loaded = Loaded(await _build(state, name, version, backend))
        except Exception as exc:
            raise _refuse(state, entry, version, exc) from exc
        finally:
            entry.loading = None
        old, entry.live, entry.state, entry.failure = entry.live, loaded, ModelState.READY, None
        state.metrics.model_loads.labels(name, "live").inc()
        log.info(
            "model %s: version %s is live%s", name, entry.version, f" (was {old.runtime.served.version})" if old else ""
        )
        if old is not None:
            await retire(old)
            del old  # its last reference: the retired version is garbage before the collection
            heap.settle()  # the retired version's objects collected, the new one's frozen
    return entry


async def unload(state: ModelHost, name: str) -> ModelEntry:
    """Stop serving `name`: requests for it get 404 at once, those already holding it finish."""
    entry = state.models.entry(name)
    async with entry.lock:
        old, entry.live, entry.state = entry.live, None, ModelState.UNLOADED
        if old is not None:
            await retire(old)
            del old
            heap.settle()
    return entry


async def load_all(state: ModelHost, backend: Backend | None = None) -> None:
    """The start-up load: VITAE_ARTIFACTS, or every model of the repository at its newest version, in turn.

    Raises when nothing could be loaded (the service is then FAILED); a repository model that fails alone is
    reported in /models while the others serve.
    """
    registry = state.models
    if registry.repository is None:
        runtime = await _build(state, None, None, backend)
        entry = registry.entry(runtime.served.name)
        entry.live, entry.state = Loaded(runtime), ModelState.READY
        entry.seen.add(runtime.served.version)
        state.metrics.model_loads.labels(entry.name, "live").inc()
        return
    names = registry.names_on_disk()
    if not names:
        raise ArtifactsError(
            f"VITAE_MODEL_REPOSITORY={registry.repository} holds no model: lay it out as DIR/<name>/<version>/, "
            "each version an artifacts folder (python -m export --out DIR/<name>/<version>)"
        )
    if registry.configured_default not in (None, *names):
        raise ArtifactsError(
            f"VITAE_DEFAULT_MODEL='{registry.configured_default}' is not in the repository; "
            f"it holds: {', '.join(names)}"
        )
    for name in names:
        registry.entry(name).seen.update(registry.versions_on_disk(name))  # listed as loading meanwhile
    for name in names:
        try:
            await load_version(state, name, backend=backend if name == registry.default else None)
        except LoadRefused:
            pass  # reported; the other models still load
    if not registry.served_names():
        reasons = "; ".join(f"{e.name}: {e.failure['reason']}" for e in registry.entries.values() if e.failure)
        raise ArtifactsError(f"no model of {registry.repository} could be loaded ({reasons})")


async def poll_repository(state: ModelHost) -> None:
    """Every VITAE_MODEL_POLL_S: put live each model's newest version when it appeared since the last look.

    A lifespan task; it ends only when cancelled. Versions seen once are not loaded again by the poller, so a
    rollback through the control endpoint stays, and a refused version is not retried (publish a new one).
    """
    while True:
        await asyncio.sleep(state.settings.model_poll_s)
        try:
            await _poll_once(state)
        except (OSError, ValueError) as exc:  # the repository unreadable for a moment: look again later
            log.warning("polling the model repository failed: %s", exc)


async def _poll_once(state: ModelHost) -> None:
    registry = state.models
    for name in registry.names_on_disk():
        versions = registry.versions_on_disk(name)
        entry = registry.entries.get(name)
        if not versions or (entry is not None and (entry.state is ModelState.UNLOADED or entry.lock.locked())):
            continue
        entry = registry.entry(name)
        newest = max(versions, key=version_key)
        unseen = newest not in entry.seen
        entry.seen.update(versions)
        if unseen:
            log.info("model %s: version %s appeared in the repository", name, newest)
            try:
                await load_version(state, name, newest)
            except LoadRefused:
                pass  # reported by load_version; the live version keeps serving
