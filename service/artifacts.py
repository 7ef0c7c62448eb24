"""The export stage's output folder, read once: metadata, head weights, and what to serve from it."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from export.artifacts import METADATA, ArtifactsMetadata, MetadataError
from model import Preprocessing

from .settings import Settings

log = logging.getLogger(__name__)


class ArtifactsError(RuntimeError):
    """The artifacts folder is missing, incomplete or unreadable; the message says how to fix it."""


@dataclass(frozen=True)
class ServedArtifacts:
    """The artifacts folder as the service reads it: its metadata, labels, preprocessing and Grad-CAM head.

    No model is loaded here; a backend (service.backends) loads one from these artifacts.
    """

    folder: Path
    metadata: ArtifactsMetadata
    name: str
    version: str
    class_names: list[str]
    preprocessing: Preprocessing
    grid: tuple[int, int]
    pooling: str
    head_weight: np.ndarray  # (K, D)
    head_bias: np.ndarray  # (K,)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def file(self, key: str) -> Path | None:
        """Path of one of the metadata's `files` entries, or None when the export did not write it."""
        return self.metadata.path(self.folder, key)

    def class_index(self, value: str | int) -> int:
        """A class given by index or by label -> its index; ValueError says what is accepted."""
        if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            index = int(value)
            if not 0 <= index < self.num_classes:
                raise ValueError(f"class index {index} is out of range 0..{self.num_classes - 1}")
            return index
        return match_class_name(self.class_names, value)


# Up to this many classes an unknown name is answered with all of them; beyond, with the closest few.
LIST_ALL_CLASSES = 50


def _synonyms(name: str) -> set[str]:
    """ImageNet names list WordNet synonyms ("tabby, tabby cat"); each one names the class."""
    return {part.strip().casefold() for part in name.split(",")}


def match_class_name(class_names: list[str], value: str) -> int:
    """The index of the class `value` names: its whole label or one of its synonyms, ignoring case.

    ValueError when no class or several fit (ImageNet has two "crane"s), naming what is accepted.
    """
    wanted = value.strip().casefold()
    matches = [i for i, name in enumerate(class_names) if name.casefold() == wanted]
    if not matches:
        matches = [i for i, name in enumerate(class_names) if wanted in _synonyms(name)]
    if len(matches) == 1:
        return matches[0]
    last = len(class_names) - 1
    if matches:
        which = ", ".join(f"{i} ({class_names[i]!r})" for i in matches)
        raise ValueError(f"class {value!r} is ambiguous: it names classes {which}; give the index (0..{last})")
    if len(class_names) <= LIST_ALL_CLASSES:
        raise ValueError(f"unknown class {value!r}; use an index 0..{last} or one of: " + ", ".join(class_names))
    every = {name.casefold(): name for name in class_names}  # what may be asked for -> the label it names
    every |= {synonym: name for name in class_names for synonym in _synonyms(name)}
    closest = dict.fromkeys(every[m] for m in difflib.get_close_matches(wanted, every, n=5, cutoff=0.6))
    hint = f"the closest: {', '.join(map(repr, closest))}" if closest else "see GET /model for the names"
    raise ValueError(
        f"unknown class {value!r}; use an index 0..{last} or one of the {len(class_names)} class names "
        f"(a whole label or one of its comma-separated synonyms, any case); {hint}"
    )


def read_artifacts(folder: str | Path) -> ServedArtifacts:
    """Read metadata.json and head.safetensors of an export folder (no model is loaded here)."""
    folder = Path(folder)
    if not (folder / METADATA).is_file():
        raise ArtifactsError(
            f"no {METADATA} in {folder.resolve()}; run `python -m export --checkpoint PATH --out {folder}` "
            "or point VITAE_CHECKPOINT at a checkpoint to export at start"
        )
    try:
        meta = ArtifactsMetadata.read(folder)
        problem = meta.integrity_problem(folder)
        if problem:
            raise ArtifactsError(
                f"refusing the artifacts in {folder}: {problem}; re-export them (python -m export ... --force) "
                "or set VITAE_AUTO_EXPORT=true to rebuild them from VITAE_CHECKPOINT at start"
            )
        head = load_file(str(folder / meta.files["head"]))
        grid_h, grid_w = (int(v) for v in meta.grid)
        class_names = [str(c) for c in meta.class_names]
    except (OSError, MetadataError, SafetensorError) as exc:
        raise ArtifactsError(f"the artifacts in {folder} are incomplete or unreadable ({exc}); re-export them") from exc
    weight, bias = head["weight"].astype(np.float32), head["bias"].astype(np.float32)
    if weight.shape[0] != len(class_names) or bias.shape != (len(class_names),):
        raise ArtifactsError(
            f"head.safetensors has {weight.shape[0]} classes but metadata.json names {len(class_names)}; re-export"
        )
    return ServedArtifacts(
        folder=folder,
        metadata=meta,
        name=meta.name or folder.name,
        version=meta.version,
        class_names=class_names,
        preprocessing=meta.preprocessing_config(),
        grid=(grid_h, grid_w),
        pooling=meta.model_config().pooling,
        head_weight=weight,
        head_bias=bias,
    )


def _same_file(a: str | Path | None, b: Path) -> bool:
    try:
        return a is not None and Path(a).resolve() == b.resolve()
    except OSError:
        return False


def ensure_artifacts(settings: Settings) -> ServedArtifacts:
    """Serve `settings.artifacts`, running the export stage first when they are missing or stale.

    The configured checkpoint is exported when the folder has no metadata, or when its artifacts came
    from that same checkpoint and are stale. Artifacts exported from another checkpoint are served as
    they are unless VITAE_CHECKPOINT was set explicitly, so a default never overwrites a user's export.
    """
    folder, checkpoint = settings.artifacts, settings.checkpoint
    found = (folder / METADATA).is_file()
    existing = ArtifactsMetadata.read_if_valid(folder)  # None for a folder of unknown origin: never ours
    exported_from = (existing.checkpoint or {}).get("path") if existing else None
    explicit = "checkpoint" in settings.model_fields_set
    ours = not found or explicit or _same_file(exported_from, checkpoint)
    if settings.auto_export and not found and folder.is_dir() and any(folder.iterdir()):
        raise ArtifactsError(
            f"VITAE_ARTIFACTS={folder} holds files but no {METADATA}, so it is no export this service may overwrite; "
            "restore its metadata.json, empty the folder, or point VITAE_ARTIFACTS at a new folder to export into"
        )
    if settings.auto_export and ours and checkpoint.is_file():
        # Keep the options the folder was exported with (precision, ...); a fresh folder gets ours.
        options = dict(existing.settings if existing else {}, max_batch=settings.max_batch_size)
        options = {k: options[k] for k in ("max_batch", "precision", "tensorrt", "cpu_int8") if k in options}
        options["cpu_int8"] = options.get("cpu_int8", False) or settings.export_cpu_int8
        if existing and existing.class_names_source == "labels" and _same_file(exported_from, checkpoint):
            options["labels"] = existing.class_names  # names given with --labels outlive a re-export
        problem = existing.integrity_problem(folder) if existing else None
        if problem:  # an edited metadata.json has the fingerprint of a fresh export: rebuild regardless
            log.warning("artifacts in %s: %s; exporting %s again", folder, problem, checkpoint)
            options.pop("labels", None)  # names read from an edited file are not to be trusted
            options["force"] = True
        _export_if_needed(checkpoint, folder, options, have_existing=found)
    elif not found:
        raise ArtifactsError(
            f"no artifacts in {folder.resolve()} and no checkpoint at {checkpoint.resolve()} to export; "
            "set VITAE_ARTIFACTS to an export folder or VITAE_CHECKPOINT to a checkpoint"
        )
    return read_artifacts(folder)


def _export_if_needed(checkpoint: Path, folder: Path, options: dict[str, Any], have_existing: bool) -> None:
    import export  # the pipeline (torch, onnx) is only loaded when there is something to (re)build

    # Fresh includes the TensorRT plan: one built for another GPU or TensorRT version counts as stale here.
    if export.artifacts_are_fresh(checkpoint, folder, **options):
        return
    log.info("artifacts in %s are missing or stale: exporting %s", folder, checkpoint)
    try:
        _export_or_skip_refused_engine(export, checkpoint, folder, options)
    except Exception:
        if not have_existing:
            raise
        log.exception("re-exporting %s failed; serving the artifacts already in %s", checkpoint, folder)


def _export_or_skip_refused_engine(export: Any, checkpoint: Path, folder: Path, options: dict[str, Any]) -> None:
    """Export; when the TensorRT plan is refused (it disagrees with fp32), export again without one.

    The service then serves the ONNX model on the GPU (ONNX Runtime CUDA) instead of not starting, and the
    artifacts remember `tensorrt=False`, so later starts do not build the same refused engine again.
    """
    from export.engine.parity import EngineParityError

    try:
        export.export_artifacts(checkpoint, folder, **options)
    except EngineParityError as exc:
        log.warning("TensorRT plan refused (%s); exporting without one, ONNX Runtime will serve", exc)
        export.export_artifacts(checkpoint, folder, **(options | {"tensorrt": False}))
