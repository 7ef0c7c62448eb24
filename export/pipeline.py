"""The export stage end to end: checkpoint -> checked ONNX (+ weights, head, int8, TensorRT) + metadata.json.

Everything is built in a staging folder inside `out` and swapped in only when every step passed, so a
failing export leaves `out` as it was; `out` itself is never renamed (it may be a mount point, see staging.py).
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
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
from safetensors.torch import save_file

from model import ViTAEConfig

from . import tensorrt as trt_step
from .fold import fold_batchnorms
from .graph import GraphCheckError, find_prm_blocks, op_counts
from .inputs import model_inputs
from .int8 import evaluate_int8, quantize
from .labels import labels_digest
from .onnx_export import INPUT_NAME, OPSET, export_onnx, token_count
from .parity import TOLERANCE_FP32, check_parity
from .source import Source, load_source, sha256_file
from .staging import foreign_entries, make_staging, swap_in
from .triton import MODEL_NAME, plan_model_name, write_repository

log = logging.getLogger(__name__)

FORMAT = "vitae-artifacts/1"
# Bump when a change to this package changes what it writes, so older artifacts count as stale.
EXPORT_REVISION = 3  # 2: class names for released weights (ImageNet-1k), class_names_source, wordnet_ids
# 3: the Performer in its FP16-range form, engine parity
PRECISIONS = ("fp16", "fp32")
ONNX, ONNX_INT8, WEIGHTS, HEAD = "model.onnx", "model_int8.onnx", "model.safetensors", "head.safetensors"
METADATA = "metadata.json"


@contextmanager
def step(name: str) -> Iterator[None]:
    start = time.perf_counter()
    log.info("%s ...", name)
    yield
    log.info("%s: done in %.2f s", name, time.perf_counter() - start)


def _settings(max_batch: int, precision: str, int8_cpu: bool) -> dict[str, Any]:
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return {"max_batch": max_batch, "precision": precision, "opset": OPSET, "int8_cpu": bool(int8_cpu)}


def _sidecar_sha(checkpoint: Path) -> str | None:
    sidecar = checkpoint.with_suffix(".json")
    return sha256_file(sidecar) if sidecar.is_file() and sidecar != checkpoint else None


def _fingerprint(
    checkpoint_sha: str,
    checkpoint: Path,
    variant: str | None,
    num_classes: int | None,
    settings: dict[str, Any],
    labels: Sequence[str] | None = None,
) -> str:
    """What the artifacts are a function of: the checkpoint (weights and its JSON), the request, the exporter."""
    facts = {
        "checkpoint": checkpoint_sha,
        "sidecar": _sidecar_sha(checkpoint),
        "variant": variant,
        "num_classes": num_classes,
        "labels": labels_digest(labels),
        "settings": settings,
        "revision": EXPORT_REVISION,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _read_metadata(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / METADATA).read_text())
    except (OSError, ValueError):
        return None


def _artifacts_staleness(out: Path, fingerprint: str) -> str | None:
    """Why the artifacts in `out` must be rebuilt, or None when they are current."""
    meta = _read_metadata(out)
    if meta is None:
        return f"no readable {METADATA} in {out}"
    if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint:
        return "the checkpoint, the settings or the exporter changed"
    checksums = meta.get("checksums") or {}
    for name in (meta.get("files") or {"onnx": ONNX}).values():
        path = out / name
        if not path.is_file() or sha256_file(path) != checksums.get(name):
            return f"{name} is missing or was modified"
    if trt_step.unavailable_reason() is None:
        fits, why = trt_step.plan_matches_this_machine(meta)
        if not fits:
            return f"TensorRT is available here but {why}"
    return None


def _triton_staleness(out: Path, triton_repo: Path, plan: bool = False) -> str | None:
    meta = _read_metadata(out)
    model_onnx = triton_repo / MODEL_NAME / "1" / "model.onnx"
    if meta is None or not (triton_repo / MODEL_NAME / "config.pbtxt").is_file() or not model_onnx.is_file():
        return f"no Triton model in {triton_repo}"
    if sha256_file(model_onnx) != meta["checksums"][meta["files"]["onnx"]]:
        return f"the Triton model in {triton_repo} is not this export"
    if plan and meta.get("tensorrt"):
        model_plan = triton_repo / plan_model_name(meta["tensorrt"]["version"]) / "1" / "model.plan"
        if not model_plan.is_file() or sha256_file(model_plan) != meta["checksums"][meta["files"]["plan"]]:
            return f"no Triton plan model of this export in {triton_repo}"
    return None


def artifacts_are_fresh(
    checkpoint: str | Path,
    out: str | Path,
    *,
    variant: str | None = None,
    num_classes: int | None = None,
    max_batch: int = 32,
    precision: str = "fp16",
    int8_cpu: bool = False,
    triton_repo: str | Path | None = None,
    triton_plan: bool = False,
    force: bool = False,
    labels: Sequence[str] | None = None,
) -> bool:
    """Whether `export_artifacts` with the same arguments would rebuild nothing."""
    checkpoint, out = Path(checkpoint), Path(out)
    if force or not checkpoint.is_file():
        return False
    settings = _settings(max_batch, precision, int8_cpu)
    fingerprint = _fingerprint(sha256_file(checkpoint), checkpoint, variant, num_classes, settings, labels)
    if _artifacts_staleness(out, fingerprint) is not None:
        return False
    return triton_repo is None or _triton_staleness(out, Path(triton_repo), triton_plan) is None


def export_artifacts(
    checkpoint: str | Path,
    out: str | Path,
    *,
    variant: str | None = None,
    num_classes: int | None = None,
    max_batch: int = 32,
    precision: str = "fp16",
    int8_cpu: bool = False,
    triton_repo: str | Path | None = None,
    triton_plan: bool = False,
    force: bool = False,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Build the serving artifacts of `checkpoint` in `out` (unless they are current) and return their metadata.

    `labels` name the classes in index order, replacing the checkpoint's names (see export.labels).

    Raises FileNotFoundError, model.CheckpointError (naming the offending keys), ValueError for bad options,
    export.parity.ParityError or export.graph.GraphCheckError; in every case `out` is left untouched.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    triton_repo = Path(triton_repo) if triton_repo is not None else None
    settings = _settings(max_batch, precision, int8_cpu)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if out.exists() and (not out.is_dir() or (foreign_entries(out) and not (out / METADATA).is_file())):
        raise ValueError(f"{out} exists and is not an artifacts folder; pick another --out or remove it")

    with step(f"checksum {checkpoint}"):
        checkpoint_sha = sha256_file(checkpoint)
    fingerprint = _fingerprint(checkpoint_sha, checkpoint, variant, num_classes, settings, labels)
    stale = "--force" if force else _artifacts_staleness(out, fingerprint)
    if stale is None:
        meta = _read_metadata(out)
        log.info("artifacts in %s are up to date (%s %s); nothing rebuilt", out, meta["name"], meta["version"])
        if triton_repo is not None and (why := _triton_staleness(out, triton_repo, triton_plan)) is not None:
            log.info("writing the Triton repository: %s", why)
            _install_triton(out, meta, triton_repo, triton_plan)
        return meta
    log.info("building artifacts in %s: %s", out, stale)

    started = time.perf_counter()
    with step("load checkpoint"):
        source = load_source(checkpoint, variant=variant, num_classes=num_classes, labels=labels)
    created = not out.exists()
    staging = make_staging(out)
    try:
        meta = _build(source, checkpoint, checkpoint_sha, fingerprint, settings, staging, previous=out)
        swap_in(staging, out, retire=_previous_entries(out), last=METADATA)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if triton_repo is not None:
        _install_triton(out, meta, triton_repo, triton_plan)
    log.info("exported %s %s to %s in %.1f s", meta["name"], meta["version"], out, time.perf_counter() - started)
    return meta


def _build(
    source: Source,
    checkpoint: Path,
    checkpoint_sha: str,
    fingerprint: str,
    settings: dict[str, Any],
    staging: Path,
    previous: Path,
) -> dict[str, Any]:
    model, cfg = source.model, source.model.config
    max_batch = settings["max_batch"]
    files = {"onnx": ONNX, "weights": WEIGHTS, "head": HEAD}

    with step("fold BatchNorm into convolutions"):
        folded = fold_batchnorms(model)
    with step(f"export ONNX (opset {OPSET})"):
        graph = export_onnx(folded, staging / ONNX)
    with step("check the graph"):
        check_graph(graph, cfg)
    with step(f"parity ONNX Runtime vs PyTorch at batch 1 and {max_batch}"):
        images, origin = model_inputs(cfg.preprocessing, max_batch)
        diffs = check_parity(model, staging / ONNX, images, tuple(sorted({1, max_batch})))
        parity = {"inputs": origin, "tolerance": TOLERANCE_FP32, "max_abs_diff": diffs}
        log.info("max abs differences on %s: %s", origin, json.dumps(diffs))
    with step("save weights and head"):
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS))
        save_file(
            {"weight": model.head.weight.detach().contiguous(), "bias": model.head.bias.detach().contiguous()},
            str(staging / HEAD),
        )

    int8 = None
    if settings["int8_cpu"]:
        with step("int8 CPU model"):
            quantize(staging / ONNX, staging / ONNX_INT8)
            report = evaluate_int8(
                staging / ONNX,
                staging / ONNX_INT8,
                cfg.preprocessing,
                num_classes=cfg.num_classes,
                speed_batch=images,
            )
            int8 = dataclasses.asdict(report)
            log.info(
                "int8: %.1f vs fp32 %.1f images/s; top-1 int8 %s vs fp32 %s on %d test images -> %s (%s)",
                report.int8_images_per_s,
                report.fp32_images_per_s,
                report.int8_top1,
                report.fp32_top1,
                report.eval_images,
                "kept" if report.kept else "discarded",
                report.reason,
            )
            if report.kept:
                files["onnx_int8"] = ONNX_INT8
            else:
                (staging / ONNX_INT8).unlink()

    tensorrt = None
    reason = trt_step.unavailable_reason()
    if reason is not None:
        log.info(reason)
    else:
        with step(f"TensorRT engine ({settings['precision']})"):
            tensorrt = trt_step.build_engine(
                staging / ONNX,
                staging,
                input_shape=(cfg.in_chans, cfg.img_size, cfg.img_size),
                max_batch=max_batch,
                precision=settings["precision"],
                previous_cache=previous / trt_step.TIMING_CACHE,
            )
        with step("TensorRT engine vs fp32 on the parity images"):
            # Raises EngineParityError (the export fails, nothing is written) unless the plan agrees.
            tensorrt["parity"] = trt_step.engine_parity(
                staging / trt_step.PLAN, staging / ONNX, images, precision=settings["precision"], origin=origin
            )
        files["plan"], files["layers"] = trt_step.PLAN, trt_step.LAYERS

    meta = {
        "format": FORMAT,
        "name": source.name,
        "version": checkpoint_sha[:12],
        "variant": source.variant,
        "config": cfg.to_dict(),
        "class_names": source.class_names,
        "class_names_source": source.class_names_source,
        "wordnet_ids": source.wordnet_ids,
        "preprocessing": cfg.preprocessing.to_dict(),
        "grid": [cfg.grid_size, cfg.grid_size],
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": [-1, cfg.in_chans, cfg.img_size, cfg.img_size]}],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": [-1, cfg.num_classes]},
            {"name": "tokens", "dtype": "float32", "shape": [-1, token_count(model), cfg.embed_dim]},
        ],
        "files": files,
        "checksums": {name: sha256_file(staging / name) for name in files.values()},
        "checkpoint": {"path": str(checkpoint), "sha256": checkpoint_sha},
        "fingerprint": fingerprint,
        "settings": settings,
        "parity": parity,
        "int8": int8,
        "tensorrt": tensorrt,
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "tensorrt": trt_step.tensorrt_version(),
        },
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(meta, indent=2) + "\n"
    (staging / METADATA).write_text(text)
    _readable_by_all(staging)
    return json.loads(text)  # what a later up-to-date call reads back: lists, not tuples


def check_graph(graph: onnx.ModelProto, cfg: ViTAEConfig) -> None:
    """The promises of the export about its graph: BatchNorms folded, GELU as `Gelu`, each PRM fused-ready."""
    ops = op_counts(graph)
    if ops.get("BatchNormalization"):
        raise GraphCheckError(f"{ops['BatchNormalization']} BatchNormalization nodes survived folding")
    if not ops.get("Gelu"):
        raise GraphCheckError(f"no Gelu op in the graph (opset {OPSET}); GELU was decomposed")
    expected = sum(1 for r in cfg.downsample_ratios if r > 1)
    blocks = find_prm_blocks(graph)
    if len(blocks) != expected:
        raise GraphCheckError(f"found {len(blocks)} PRM Conv->Gelu->Concat blocks, expected {expected}")


def _readable_by_all(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only modes; artifacts are read by the service, often another user."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _previous_entries(out: Path) -> list[str]:
    """What the export in `out` consists of, to be replaced: its files, its timing cache, its metadata."""
    meta = _read_metadata(out) or {}
    return [*(meta.get("files") or {}).values(), trt_step.TIMING_CACHE, METADATA]


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


def _install_triton(out: Path, meta: dict[str, Any], repo: Path, plan: bool) -> None:
    with step(f"Triton repository in {repo}"):
        repo.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".vitae-staging-", dir=repo))
        try:
            for model_dir in write_repository(out, meta, staging, plan=plan):
                _replace_dir(model_dir, repo / model_dir.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
