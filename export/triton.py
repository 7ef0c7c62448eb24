"""A Triton Inference Server model repository serving the same artifacts.

By default one model, `vitae/`: the ONNX model on Triton's ONNX Runtime backend (`onnxruntime_onnx`) with the
TensorRT execution accelerator configured in `optimization`, so Triton's own TensorRT builds the engine for the
GPU and TensorRT version it runs with. A plan built by pip's TensorRT only loads on a Triton release with that
exact TensorRT version, so it is written only on request (`plan=True`), as a second model named after that
version, `vitae_trt<major>_<minor>_<patch>/`, with the version in a comment of its config.

Matching Triton releases: the ONNX model needs a Triton whose ONNX Runtime is >= 1.17 (opset 20, `Gelu`);
the CUDA 13 containers (25.08 and later, driver >= 580) match this project's GPU image. A plan needs the
Triton release whose TensorRT equals `metadata.json`'s `tensorrt.version` (NVIDIA's frameworks support
matrix lists the TensorRT of each release).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from .artifacts import ArtifactsMetadata

MODEL_NAME = "vitae"
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}
# Engines Triton's ONNX Runtime backend builds with TensorRT: kept in the model folder across restarts.
TRT_WORKSPACE_BYTES = 1 << 30


def plan_model_name(tensorrt_version: str) -> str:
    """The Triton model name of a plan built with `tensorrt_version`, e.g. 10.13.3.9 -> vitae_trt10_13_3."""
    parts = re.findall(r"\d+", tensorrt_version)[:3]
    return f"{MODEL_NAME}_trt{'_'.join(parts)}"


def _tensor(entry: dict[str, Any]) -> str:
    dims = ", ".join(str(d) for d in entry["shape"][1:])  # Triton leaves the batch dim out when batching
    dtype = TRITON_TYPES[entry["dtype"]]
    return f'  {{\n    name: "{entry["name"]}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}'


def _tensorrt_accelerator(precision: str) -> str:
    parameters = {
        "precision_mode": precision.upper(),
        "max_workspace_size_bytes": str(TRT_WORKSPACE_BYTES),
        "trt_engine_cache_enable": "1",
    }
    lines = "".join(f'        parameters {{ key: "{k}" value: "{v}" }}\n' for k, v in parameters.items())
    return (
        "optimization {\n"
        "  execution_accelerators {\n"
        "    gpu_execution_accelerator: [\n"
        "      {\n"
        '        name: "tensorrt"\n'
        f"{lines}"
        "      }\n"
        "    ]\n"
        "  }\n"
        "}\n"
    )


def config_pbtxt(metadata: ArtifactsMetadata, *, plan: bool, max_queue_delay_us: int = 2000) -> str:
    """Triton's text-format ModelConfig: the ONNX model with the TensorRT accelerator, or (`plan`) the plan."""
    max_batch = metadata.max_batch
    preferred = sorted({b for b in (max_batch // 4, max_batch // 2, max_batch) if b >= 1})
    inputs = ",\n".join(_tensor(e) for e in metadata.inputs)
    outputs = ",\n".join(_tensor(e) for e in metadata.outputs)
    if plan:
        built = metadata.tensorrt
        if built is None:
            raise ValueError("a Triton plan model needs artifacts with a TensorRT plan (metadata.json has no tensorrt)")
        header = (
            f"# TensorRT {built['version']} plan for {built['gpu_name']} (sm {built['compute_capability']}): "
            f"serve it only with the Triton release whose TensorRT is {built['version']}.\n"
        )
        name, platform, kind, optimization = plan_model_name(built["version"]), "tensorrt_plan", "KIND_GPU", ""
    else:
        header = "# ONNX model; on a GPU, Triton's ONNX Runtime builds a TensorRT engine for its own TensorRT.\n"
        precision = metadata.settings.get("precision", "fp16")
        optimization = _tensorrt_accelerator(precision)
        name, platform, kind = MODEL_NAME, "onnxruntime_onnx", "KIND_AUTO"
    return (
        header + f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {max_batch}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
        f"{optimization}"
        "instance_group [\n"
        f"  {{\n    count: 1\n    kind: {kind}\n  }}\n"
        "]\n"
    )


def write_repository(artifacts: Path, metadata: ArtifactsMetadata, repo: Path, *, plan: bool = False) -> list[Path]:
    """Write `repo/vitae/` (ONNX) and, with `plan`, `repo/vitae_trt<version>/`; returns the model folders.

    `repo` may already hold other models. ValueError when a plan is asked for but the artifacts have none.
    """
    files = metadata.files
    if plan and "plan" not in files:
        raise ValueError("a Triton plan model was requested but the export built no TensorRT plan (no GPU here?)")
    model_dir = repo / MODEL_NAME
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(artifacts / files["onnx"], model_dir / "1" / "model.onnx")
    (model_dir / "config.pbtxt").write_text(config_pbtxt(metadata, plan=False))
    folders = [model_dir]
    if plan:
        plan_dir = repo / plan_model_name(metadata.tensorrt["version"])
        (plan_dir / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy2(artifacts / files["plan"], plan_dir / "1" / "model.plan")
        (plan_dir / "config.pbtxt").write_text(config_pbtxt(metadata, plan=True))
        folders.append(plan_dir)
    return folders
