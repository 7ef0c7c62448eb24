"""TensorRT checks of the export stage; they need an NVIDIA GPU and the tensorrt package, and skip without.

`make test-gpu` (or benchmarks/gpu_check.sh) runs them; `-s` shows the per-PRM fusion evidence they print.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from support.checkpoints import DEMO_CHECKPOINT, ROOT, tiny_model
from support.optional import triton_model_config

from export import export_artifacts
from export.engine.machine import builder_probe, plan_matches_this_machine, unavailable_reason
from export.engine.parity import ENGINE_TOLERANCE, EngineParityError, engine_parity
from export.engine.runner import run_plan
from export.fold import fold_batchnorms
from export.fusion import format_fusion, fusion_problems, prm_fusion
from export.graph import find_prm_blocks
from export.inputs import model_inputs
from export.onnx_export import export_onnx
from export.parity import cpu_session
from export.triton import MODEL_NAME, plan_model_name
from model.config import Preprocessing

REASON = unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
MAX_BATCH = 32


@pytest.fixture(scope="module")
def gpu_export(tiny_checkpoint, tmp_path_factory):
    """The demo model when it is there (else the tiny one), exported with an FP16 engine and a Triton repo."""
    checkpoint = DEMO_CHECKPOINT if DEMO_CHECKPOINT.is_file() else tiny_checkpoint
    root = tmp_path_factory.mktemp("gpu_export")
    meta = export_artifacts(
        checkpoint, root / "artifacts", max_batch=MAX_BATCH, triton_repo=root / "triton", triton_plan=True
    )
    return root / "artifacts", meta, root / "triton"


def test_builder_probe_succeeds_on_this_gpu():
    assert builder_probe() is None


def test_plan_is_built_and_recorded_for_this_gpu(gpu_export):
    out, meta, _ = gpu_export
    assert meta["files"]["plan"] == "model.plan" and (out / "model.plan").stat().st_size > 0
    assert (out / "timing.cache").stat().st_size > 0
    assert meta["tensorrt"]["precision"] == "fp16"
    assert meta["tensorrt"]["profile"] == {"min": 1, "opt": MAX_BATCH // 2, "max": MAX_BATCH}
    fits, why = plan_matches_this_machine(meta)
    assert fits, why


def test_engine_parity_figures_are_in_the_metadata(gpu_export):
    _, meta, _ = gpu_export
    parity = meta["tensorrt"]["parity"]
    print(f"\nengine vs fp32: {json.dumps(parity)}")
    assert parity["finite"] and parity["top1_agree"] == parity["images"] == MAX_BATCH
    assert parity["max_abs_diff"]["logits"] <= parity["tolerance"] * parity["logit_scale"]


def test_each_prm_branch_runs_its_conv_and_gelu_in_one_engine_layer(gpu_export):
    out, _, _ = gpu_export
    layers = json.loads((out / "layers.json").read_text())
    graph = onnx.load(str(out / "model.onnx"))
    blocks = find_prm_blocks(graph)
    report = prm_fusion(layers, blocks, [n.name for n in graph.graph.node])
    print("\n" + format_fusion(report))
    assert len(report) == sum(len(b.convs) for b in blocks) > 0
    assert fusion_problems(report) == []


def test_tensorrt_fp16_agrees_with_onnx_runtime_on_64_real_images(gpu_export):
    out, meta, _ = gpu_export
    images, _ = model_inputs(Preprocessing.from_dict(meta["preprocessing"]), 64)
    expected = cpu_session(out / "model.onnx").run(["logits"], {"images": images})[0]
    got = run_plan(out / "model.plan", images)["logits"]
    assert np.isfinite(got).all()
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert np.abs(got - expected).max() <= ENGINE_TOLERANCE["fp16"] * max(1.0, np.abs(expected).max())


def test_engine_parity_refuses_an_engine_of_another_model(gpu_export, tmp_path):
    out, meta, _ = gpu_export
    other = tiny_model(seed=7)  # same input format and classes as the demo model and the tiny fallback
    export_onnx(fold_batchnorms(other), tmp_path / "other.onnx")
    images, origin = model_inputs(Preprocessing.from_dict(meta["preprocessing"]), 16)
    with pytest.raises(EngineParityError, match="refused"):
        engine_parity(out / "model.plan", tmp_path / "other.onnx", images, precision="fp16", origin=origin)


def test_an_engine_outside_tolerance_is_refused_and_nothing_is_written(gpu_export, monkeypatch, tmp_path):
    _, meta, _ = gpu_export
    out = tmp_path / "refused"
    monkeypatch.setitem(ENGINE_TOLERANCE, "fp16", 0.0)  # any FP16 rounding now counts as a failure
    with pytest.raises(EngineParityError, match="refused"):
        export_artifacts(meta["checkpoint"]["path"], out, max_batch=4)
    assert not out.exists()


def test_a_timing_cache_from_elsewhere_is_discarded_and_rebuilt(gpu_export, tmp_path):
    out, meta, _ = gpu_export
    copy = tmp_path / "artifacts"
    shutil.copytree(out, copy)
    (copy / "timing.cache").write_bytes(b"a timing cache from another GPU or TensorRT version")
    checkpoint = meta["checkpoint"]["path"]
    export_artifacts(checkpoint, copy, max_batch=MAX_BATCH, force=True)
    rebuilt = (copy / "timing.cache").read_bytes()
    assert rebuilt and not rebuilt.startswith(b"a timing cache")


def test_triton_repository_defaults_to_onnx_with_the_tensorrt_accelerator_and_labels_the_plan(gpu_export):
    model_config_pb2 = triton_model_config()

    _, meta, repo = gpu_export
    onnx_config = text_format.Parse((repo / MODEL_NAME / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert onnx_config.platform == "onnxruntime_onnx"
    assert [a.name for a in onnx_config.optimization.execution_accelerators.gpu_execution_accelerator] == ["tensorrt"]
    plan_dir = repo / plan_model_name(meta["tensorrt"]["version"])
    plan_config = text_format.Parse((plan_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert plan_config.platform == "tensorrt_plan" and plan_config.name == plan_dir.name
    assert (plan_dir / "1" / "model.plan").is_file()


def test_a_gpu_cuda_cannot_start_on_gives_one_line_and_no_traceback():
    # nvidia-smi still lists the GPU, but CUDA in this process sees none: the case of a container without
    # device access or a driver older than the CUDA runtime. The probe must say so in one line.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    code = "from export.engine.machine import unavailable_reason; print(unavailable_reason())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert run.stdout.startswith("TensorRT step skipped:"), run.stdout
