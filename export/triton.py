"""A Triton Inference Server model repository serving the same artifacts: `vitae/config.pbtxt`, `vitae/1/`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .artifacts import ArtifactsMetadata

MODEL_NAME = "vitae"
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}


def _tensor(entry: dict[str, Any]) -> str:
    dims = ", ".join(str(d) for d in entry["shape"][1:])  # Triton leaves the batch dim out when batching
    dtype = TRITON_TYPES[entry["dtype"]]
    return f'  {{\n    name: "{entry["name"]}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}'


def config_pbtxt(metadata: ArtifactsMetadata, *, plan: bool, max_queue_delay_us: int = 2000) -> str:
    """Triton's text-format ModelConfig for the exported model (ONNX Runtime, or TensorRT when a plan exists)."""
    max_batch = metadata.max_batch
    preferred = sorted({b for b in (max_batch // 4, max_batch // 2, max_batch) if b >= 1})
    platform, kind = ("tensorrt_plan", "KIND_GPU") if plan else ("onnxruntime_onnx", "KIND_AUTO")
    inputs = ",\n".join(_tensor(e) for e in metadata.inputs)
    outputs = ",\n".join(_tensor(e) for e in metadata.outputs)
    return (
        f'name: "{MODEL_NAME}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {max_batch}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        "}\n"
        "instance_group [\n"
        f"  {{\n    count: 1\n    kind: {kind}\n  }}\n"
        "]\n"
    )


def write_repository(artifacts: Path, metadata: ArtifactsMetadata, repo: Path) -> Path:
    """Write `repo/vitae/` from an artifacts folder; returns the model folder. `repo` may already hold others."""
    files = metadata.files
    plan = "plan" in files
    model_dir = repo / MODEL_NAME
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(artifacts / files["onnx"], version_dir / "model.onnx")
    if plan:
        shutil.copy2(artifacts / files["plan"], version_dir / "model.plan")
    (model_dir / "config.pbtxt").write_text(config_pbtxt(metadata, plan=plan))
    return model_dir
