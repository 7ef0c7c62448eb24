"""The served models: the repository's layout on disk, and per model the runtime that answers its requests.

VITAE_MODEL_REPOSITORY=DIR serves DIR/<name>/<version>/, each an artifacts folder as `python -m export --out`
writes it. A version folder counts once its metadata.json is there: the export moves metadata.json in last, so
a folder still being written is not seen (a folder copied by hand: copy it under a hidden name, `.incoming-3`,
and rename it). Folders whose names start with "." are never models or versions. Versions order as numbers when
both are all digits ("10" after "9"), else as text. Without a repository, VITAE_ARTIFACTS is a repository of one.

A request leases its model's live runtime (`Loaded.lease`) for as long as it runs; a runtime replaced by a new
version is closed only once no lease holds it (service.models).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from export.artifacts import METADATA

from .runtime import Runtime


class ModelState(StrEnum):
    """A model's state in GET /models: LOADING -> READY; FAILED when no version of it could be loaded."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


class UnknownModel(LookupError):
    """No such model (or it is not loaded); the message lists what is served."""


class ModelUnavailable(RuntimeError):
    """The model exists but has no live version yet (loading) or could not be loaded (failed)."""


def version_key(version: str) -> tuple[int, int | str]:
    """Numeric versions in numeric order, after them the others in text order."""
    return (0, int(version)) if version.isdigit() else (1, version)


@dataclass(eq=False)
class Loaded:
    """A live (or retiring) runtime and the requests leasing it; `idle` is set while no lease holds it."""

    runtime: Runtime
    leases: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @contextmanager
    def lease(self) -> Iterator[Runtime]:
        self.leases += 1
        self.idle.clear()
        try:
            yield self.runtime
        finally:
            self.leases -= 1
            if self.leases == 0:
                self.idle.set()


@dataclass(eq=False)
class ModelEntry:
    """One model by name: its live runtime, the version being loaded, the last version refused."""

    name: str
    state: ModelState = ModelState.LOADING
    live: Loaded | None = None
    loading: str | None = None
    failure: dict[str, str] | None = None  # {"version", "reason"} of the last version that was refused
    seen: set[str] = field(default_factory=set)  # versions on disk already acted on; the poller loads the others
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)  # one load or unload at a time

    @property
    def version(self) -> str | None:
        return self.live.runtime.served.version if self.live else None


class ModelRegistry:
    """Every model the service knows, by name, and where their versions are on disk."""

    def __init__(self, repository: Path | None, default: str | None = None) -> None:
        self.repository = repository
        self.entries: dict[str, ModelEntry] = {}
        self.configured_default = default
        self.default: str | None = default

    # ---------------------------------------------------------------- on disk

    def names_on_disk(self) -> list[str]:
        if self.repository is None or not self.repository.is_dir():
            return []
        return sorted(p.name for p in self.repository.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions_on_disk(self, name: str) -> list[str]:
        """The complete versions of `name` (metadata.json present), oldest first."""
        folder = self.repository / name if self.repository else None
        if folder is None or not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / METADATA).is_file()]
        return sorted(found, key=version_key)

    def folder(self, name: str, version: str) -> Path:
        return self.repository / name / version

    # ---------------------------------------------------------------- served

    def entry(self, name: str) -> ModelEntry:
        """The entry of `name`, created (loading) when new."""
        if name not in self.entries:
            self.entries[name] = ModelEntry(name)
        if self.default is None:
            self.default = name
        return self.entries[name]

    def served_names(self) -> list[str]:
        return [name for name, entry in self.entries.items() if entry.live is not None]

    def live(self) -> list[Loaded]:
        return [entry.live for entry in self.entries.values() if entry.live is not None]

    def find(self, name: str | None) -> Loaded:
        """The live runtime of `name` (None: the default model); UnknownModel or ModelUnavailable when none."""
        served = ", ".join(f"'{n}'" for n in self.served_names()) or "none"
        entry = self.entries.get(name if name is not None else self.default or "")
        if entry is None or entry.state is ModelState.UNLOADED:
            what = f"model '{name}' is not served" if name is not None else "no default model is served"
            raise UnknownModel(f"{what}; the served models are: {served}")
        if entry.live is None:
            detail = f"failed to load: {entry.failure['reason']}" if entry.failure else "is still loading"
            raise ModelUnavailable(f"model '{entry.name}' {detail}; the served models are: {served}")
        return entry.live
