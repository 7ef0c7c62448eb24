"""The export stage end to end: checkpoint -> checked ONNX (+ weights, head, bf16 check, TensorRT) + metadata.json.

Everything is built in a staging folder inside `out` and swapped in only when every step passed, so a
failing export leaves `out` as it was; `out` itself is never renamed (it may be a mount point, see staging.py).
The steps of `_build`, in order: ONNX (fold BatchNorm, export in the FP16-range form, check the graph), parity
against PyTorch, weights and head, the CPU bf16 check (OpenVINO), TensorRT and its parity with fp32 (when it can run
here), metadata.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from safetensors.torch import save_file

from model import ViTAE

from .artifacts import (
    FORMAT,
    HEAD,
    LAYERS,
    METADATA,
    ONNX,
    OUTPUT_NAMES,
    PLAN,
    TIMING_CACHE,
    WEIGHTS,
    ArtifactsMetadata,
)
from .engine.build import build_engine
from .engine.machine import plan_outdated, tensorrt_version, unavailable_reason
from .engine.parity import engine_parity
from .fold import fold_batchnorms
from .graph import check_graph
from .inputs import model_inputs
from .int8 import INT8_BIN, INT8_XML, measure_int8
from .labels import labels_digest
from .onnx_export import INPUT_NAME, OPSET, export_onnx, token_count
from .parity import TOLERANCE_FP32, check_parity
from .precision import cpu_flags, cpu_kind, measure_bf16, openvino_version, this_cpu_has_native_bf16
from .source import Source, load_source, sha256_file
from .staging import foreign_entries, make_staging, swap_in
from .triton import MODEL_NAME, plan_model_name, write_repository

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "PRECISIONS", "ExportOptions", "artifacts_are_fresh", "check_graph", "export_artifacts"]

# Bump when a change to this package changes what it writes, so artifacts written by another revision count as stale.
EXPORT_REVISION = 4
PRECISIONS = ("fp16", "fp32")


@dataclass(frozen=True)
class ExportOptions:
    """What an export is asked for, checked once; `export_artifacts(..., **fields)` builds one.

    `labels` name the classes in index order, replacing the checkpoint's names (see export.labels).
    `triton_plan` also puts the TensorRT plan in the Triton repository (only with `triton_repo`).
    `tensorrt=False` builds no plan even where one could be built (the service sets it after a plan was refused,
    so that every later start serves ONNX instead of building the same refused engine again).
    """

    variant: str | None = None
    num_classes: int | None = None
    max_batch: int = 32
    precision: str = "fp16"
    triton_repo: Path | None = None
    triton_plan: bool = False
    force: bool = False
    labels: Sequence[str] | None = None
    tensorrt: bool = True
    cpu_int8: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.triton_repo is not None:
            object.__setattr__(self, "triton_repo", Path(self.triton_repo))

    def settings(self) -> dict[str, Any]:
        """The options that shape the artifacts, as metadata.json records them."""
        settings = {"max_batch": self.max_batch, "precision": self.precision, "opset": OPSET}
        settings |= {} if self.tensorrt else {"tensorrt": False}  # recorded only when turned off
        return settings | ({"cpu_int8": True} if self.cpu_int8 else {})  # ...and this one only when on

    def fingerprint(self, checkpoint: Path, checkpoint_sha: str) -> str:
        """What the artifacts are a function of: the checkpoint (weights and its JSON), the request, the exporter."""
        facts = {
            "checkpoint": checkpoint_sha,
            "sidecar": _sidecar_sha(checkpoint),
            "variant": self.variant,
            "num_classes": self.num_classes,
            "labels": labels_digest(self.labels),
            "settings": self.settings(),
            "revision": EXPORT_REVISION,
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


@contextmanager
def step(name: str) -> Iterator[None]:
    start = time.perf_counter()
    log.info("%s ...", name)
    yield
    log.info("%s: done in %.2f s", name, time.perf_counter() - start)


def _sidecar_sha(checkpoint: Path) -> str | None:
    sidecar = checkpoint.with_suffix(".json")
    return sha256_file(sidecar) if sidecar.is_file() and sidecar != checkpoint else None


def _artifacts_staleness(out: Path, fingerprint: str) -> str | None:
    """Why the artifacts in `out` must be rebuilt, or None when they are current."""
    meta = ArtifactsMetadata.read_if_valid(out)
    if meta is None:
        return f"no readable {METADATA} of format {FORMAT} in {out}"
    if meta.fingerprint != fingerprint:
        return "the checkpoint, the settings or the exporter changed"
    for name in meta.files.values():
        path = out / name
        if not path.is_file() or sha256_file(path) != meta.checksums.get(name):
            return f"{name} is missing or was modified"
    measured = meta.cpu_bf16 or {}
    if openvino_version() and this_cpu_has_native_bf16():
        if measured.get("safe") is None:
            return "bf16 was not measured where the export ran, and this CPU has native bf16"
        if measured.get("cpu_kind") != cpu_kind(cpu_flags()):
            return f"bf16 was measured on a CPU of another kind ({measured.get('cpu_kind')}), not on this one"
    int8 = meta.cpu_int8 or {}
    if meta.settings.get("cpu_int8") and int8.get("cpu_kind") not in (None, cpu_kind(cpu_flags())):
        return f"int8 was measured on a CPU of another kind ({int8.get('cpu_kind')}), not on this one"
    return plan_outdated(meta.tensorrt) if meta.settings.get("tensorrt", True) else None


def _triton_staleness(out: Path, triton_repo: Path, plan: bool = False) -> str | None:
    meta = ArtifactsMetadata.read_if_valid(out)
    model_onnx = triton_repo / MODEL_NAME / "1" / "model.onnx"
    if meta is None or not (triton_repo / MODEL_NAME / "config.pbtxt").is_file() or not model_onnx.is_file():
        return f"no Triton model in {triton_repo}"
    if sha256_file(model_onnx) != meta.checksums[meta.files["onnx"]]:
        return f"the Triton model in {triton_repo} is not this export"
    if plan and meta.tensorrt:
        model_plan = triton_repo / plan_model_name(meta.tensorrt["version"]) / "1" / "model.plan"
        if not model_plan.is_file() or sha256_file(model_plan) != meta.checksums[meta.files["plan"]]:
            return f"no Triton plan model of this export in {triton_repo}"
    return None


def artifacts_are_fresh(
    checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None, **fields: Any
) -> bool:
    """Whether `export_artifacts` with the same arguments would rebuild nothing."""
    checkpoint, out = Path(checkpoint), Path(out)
    options = options or ExportOptions(**fields)
    if options.force or not checkpoint.is_file():
        return False
    if _artifacts_staleness(out, options.fingerprint(checkpoint, sha256_file(checkpoint))) is not None:
        return False
    return options.triton_repo is None or _triton_staleness(out, options.triton_repo, options.triton_plan) is None


def export_artifacts(
    checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None, **fields: Any
) -> dict[str, Any]:
    """Build the serving artifacts of `checkpoint` in `out` (unless they are current) and return their metadata.

    Options as an `ExportOptions` or as its fields by keyword: variant, num_classes, max_batch=32,
    precision="fp16", triton_repo, triton_plan=False, force=False, labels.

    Raises FileNotFoundError, model.CheckpointError (naming the offending keys), ValueError for bad options,
    export.parity.ParityError or export.graph.GraphCheckError; in every case `out` is left untouched.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    options = options or ExportOptions(**fields)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if out.exists() and (not out.is_dir() or (foreign_entries(out) and not (out / METADATA).is_file())):
        raise ValueError(f"{out} exists and is not an artifacts folder; pick another --out or remove it")

    with step(f"checksum {checkpoint}"):
        checkpoint_sha = sha256_file(checkpoint)
    fingerprint = options.fingerprint(checkpoint, checkpoint_sha)
    stale = "--force" if options.force else _artifacts_staleness(out, fingerprint)
    if stale is None:
        meta = ArtifactsMetadata.read(out)
        log.info("artifacts in %s are up to date (%s %s); nothing rebuilt", out, meta.name, meta.version)
        repo = options.triton_repo
        if repo is not None and (why := _triton_staleness(out, repo, options.triton_plan)) is not None:
            log.info("writing the Triton repository: %s", why)
            _install_triton(out, meta, repo, options.triton_plan)
        return meta.to_dict()
    log.info("building artifacts in %s: %s", out, stale)

    started = time.perf_counter()
    with step("load checkpoint"):
        source = load_source(
            checkpoint, variant=options.variant, num_classes=options.num_classes, labels=options.labels
        )
    origin = {"path": str(checkpoint), "sha256": checkpoint_sha}
    _build_in_place(source, options, out, checkpoint=origin, fingerprint=fingerprint)
    meta = ArtifactsMetadata.read(out)  # what a later up-to-date call reads back: lists, not tuples
    if options.triton_repo is not None:
        _install_triton(out, meta, options.triton_repo, options.triton_plan)
    log.info("exported %s %s to %s in %.1f s", meta.name, meta.version, out, time.perf_counter() - started)
    return meta.to_dict()


def _build_in_place(
    source: Source, options: ExportOptions, out: Path, *, checkpoint: dict[str, str], fingerprint: str
) -> None:
    """`_build` in a staging folder inside `out`, then swapped in; on any failure `out` is left as it was."""
    created = not out.exists()
    staging = make_staging(out)
    try:
        meta = _build(source, options, staging, previous=out)
        version = checkpoint["sha256"][:12]
        meta = dataclasses.replace(meta, version=version, checkpoint=checkpoint, fingerprint=fingerprint)
        _write_metadata(meta, staging)
        swap_in(staging, out, retire=_previous_entries(out), last=METADATA)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


# ---------------------------------------------------------------- the build, step by step


def _build(source: Source, options: ExportOptions, staging: Path, previous: Path) -> ArtifactsMetadata:
    """Every artifact in `staging`; returns their metadata (checkpoint, version, fingerprint left to the caller)."""
    model = source.model
    files = {"onnx": ONNX, "weights": WEIGHTS, "head": HEAD}
    _onnx_step(model, staging)
    parity, images = _parity_step(model, staging, options.max_batch)
    _weights_step(model, staging)
    cpu_bf16 = _bf16_step(source, staging, images)
    bf16_safe = bool(cpu_bf16.get("safe"))
    cpu_int8 = _int8_step(source, staging, images, files, bf16_safe) if options.cpu_int8 else None
    tensorrt = _tensorrt_step(model, options, staging, previous, files, parity_images=(images, parity["inputs"]))
    return _metadata(
        source, options, staging, files, parity=parity, cpu_bf16=cpu_bf16, cpu_int8=cpu_int8, tensorrt=tensorrt
    )


def _onnx_step(model: ViTAE, staging: Path) -> None:
    with step("fold BatchNorm into convolutions"):
        folded = fold_batchnorms(model)
    with step(f"export ONNX (opset {OPSET})"):
        graph = export_onnx(folded, staging / ONNX)
    with step("check the graph"):
        check_graph(graph, model.config)


def _parity_step(model: ViTAE, staging: Path, max_batch: int) -> tuple[dict[str, Any], np.ndarray]:
    """ONNX Runtime against the unfolded PyTorch model at batch 1 and max_batch; the inputs are reused later."""
    with step(f"parity ONNX Runtime vs PyTorch at batch 1 and {max_batch}"):
        images, origin = model_inputs(model.config.preprocessing, max_batch)
        diffs = check_parity(model, staging / ONNX, images, tuple(sorted({1, max_batch})))
        log.info("max abs differences on %s: %s", origin, json.dumps(diffs))
    return {"inputs": origin, "tolerance": TOLERANCE_FP32, "max_abs_diff": diffs}, images


def _weights_step(model: ViTAE, staging: Path) -> None:
    with step("save weights and head"):
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS))
        head = {"weight": model.head.weight, "bias": model.head.bias}
        save_file({k: v.detach().contiguous() for k, v in head.items()}, str(staging / HEAD))


def _bf16_step(source: Source, staging: Path, images: np.ndarray) -> dict[str, Any]:
    """OpenVINO bf16 against fp32 on this CPU (export.precision): the service serves bf16 only where it is safe."""
    with step("bf16 against fp32 on this CPU (OpenVINO)"):
        report = measure_bf16(staging / ONNX, source.model.config.preprocessing, source.class_names, images)
        log.info(
            "bf16: %s (%s); top-1 agreement %s %%, max logit diff %s on %s; top-1 bf16 %s vs fp32 %s; "
            "%s vs fp32 %s images/s",
            {True: "safe", False: "unsafe", None: "not measured"}[report.safe],
            report.reason,
            report.top1_agreement,
            report.max_logit_diff,
            report.inputs or "-",
            report.bf16_top1,
            report.fp32_top1,
            report.bf16_images_per_s,
            report.fp32_images_per_s,
        )
    return dataclasses.asdict(report)


def _int8_step(
    source: Source, staging: Path, images: np.ndarray, files: dict[str, str], bf16_safe: bool
) -> dict[str, Any]:
    """OpenVINO int8 with accuracy control against fp32 on this CPU (export.int8); its IR joins `files` when built.
    Its unquantized layers are tried in bf16 only where the bf16 step measured bf16 safe."""
    with step("int8 (NNCF, accuracy control) against fp32 on this CPU (OpenVINO)"):
        prep, names = source.model.config.preprocessing, source.class_names
        report = measure_int8(staging / ONNX, staging, prep, names, images, bf16_safe=bf16_safe)
        log.info("int8: %s (%s)", {True: "safe", False: "unsafe", None: "not measured"}[report.safe], report.reason)
    if (staging / INT8_XML).is_file():
        files["int8"], files["int8_weights"] = INT8_XML, INT8_BIN
    return dataclasses.asdict(report)


def _tensorrt_step(
    model: ViTAE,
    options: ExportOptions,
    staging: Path,
    previous: Path,
    files: dict[str, str],
    parity_images: tuple[np.ndarray, str],
) -> dict[str, Any] | None:
    """The TensorRT plan (adding it to `files`) when TensorRT and a GPU are here; None, with one log line, if not.

    The plan is kept only when it agrees with fp32 on the parity images (`parity_images`: the batch and where
    it came from); otherwise EngineParityError fails the export and nothing is written.
    """
    reason = unavailable_reason() if options.tensorrt else "TensorRT step skipped: turned off (tensorrt=False)"
    if reason is not None:
        log.info(reason)
        return None
    cfg = model.config
    with step(f"TensorRT engine ({options.precision})"):
        built = build_engine(
            staging / ONNX,
            staging,
            input_shape=(cfg.in_chans, cfg.img_size, cfg.img_size),
            max_batch=options.max_batch,
            precision=options.precision,
            previous_cache=previous / TIMING_CACHE,
        )
    images, origin = parity_images
    with step("TensorRT engine vs fp32 on the parity images"):
        built["parity"] = engine_parity(
            staging / PLAN, staging / ONNX, images, precision=options.precision, origin=origin
        )
    files["plan"], files["layers"] = PLAN, LAYERS
    return built


def _metadata(
    source: Source, options: ExportOptions, staging: Path, files: dict[str, str], **reports: dict[str, Any] | None
) -> ArtifactsMetadata:
    cfg = source.model.config
    logits_shape, tokens_shape = [-1, cfg.num_classes], [-1, token_count(source.model), cfg.embed_dim]
    return ArtifactsMetadata(
        name=source.name,
        version="",  # version, checkpoint and fingerprint: set by export_artifacts, which knows the file
        variant=source.variant,
        config=cfg.to_dict(),
        class_names=source.class_names,
        class_names_source=source.class_names_source,
        wordnet_ids=source.wordnet_ids,
        preprocessing=cfg.preprocessing.to_dict(),
        grid=[cfg.grid_size, cfg.grid_size],
        inputs=[{"name": INPUT_NAME, "dtype": "float32", "shape": [-1, cfg.in_chans, cfg.img_size, cfg.img_size]}],
        outputs=[
            {"name": name, "dtype": "float32", "shape": shape}
            for name, shape in zip(OUTPUT_NAMES, (logits_shape, tokens_shape), strict=True)
        ],
        files=files,
        checksums={name: sha256_file(staging / name) for name in files.values()},
        settings=options.settings(),
        versions={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "openvino": openvino_version(),
            "tensorrt": tensorrt_version(),
        },
        exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **reports,
    )


def _write_metadata(meta: ArtifactsMetadata, staging: Path) -> None:
    meta.write(staging)
    _readable_by_all(staging)


# ---------------------------------------------------------------- files and folders


def _readable_by_all(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; artifacts are read by the service, often another user."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _previous_entries(out: Path) -> list[str]:
    """What the export in `out` consists of, to be replaced: its files, its timing cache, its metadata."""
    meta = ArtifactsMetadata.read_if_valid(out)
    return [*(meta.files.values() if meta is not None else ()), TIMING_CACHE, METADATA]


def _replace_dir(staging: Path, out: Path) -> None:
    """Move `staging` to `out`, replacing a previous export; the swap is two renames on one filesystem."""
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}-old-{os.getpid()}")
        out.rename(old)
    try:
        shutil.move(str(staging), str(out))
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _install_triton(out: Path, meta: ArtifactsMetadata, repo: Path, plan: bool) -> None:
    with step(f"Triton repository in {repo}"):
        repo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".vitae-staging-", dir=repo))
        try:
            for model_dir in write_repository(out, meta, staging, plan=plan):
                _replace_dir(model_dir, repo / model_dir.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
