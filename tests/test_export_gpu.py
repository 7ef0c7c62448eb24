"""TensorRT checks of the export stage; they need an NVIDIA GPU and the tensorrt package, and skip without."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from support.checkpoints import DEMO_CHECKPOINT

from export import export_artifacts
from export.graph import find_prm_blocks
from export.inputs import model_inputs
from export.parity import cpu_session
from export.tensorrt import plan_matches_this_machine, prm_fusion_problems, run_plan, unavailable_reason
from model.config import Preprocessing

REASON = unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
MAX_BATCH = 32


@pytest.fixture(scope="module")
def gpu_export(tiny_checkpoint, tmp_path_factory):
    """The demo model when it is there (else the tiny one), exported with an FP16 engine and a Triton repo."""
    checkpoint = DEMO_CHECKPOINT if DEMO_CHECKPOINT.is_file() else tiny_checkpoint
    root = tmp_path_factory.mktemp("gpu_export")
    meta = export_artifacts(checkpoint, root / "artifacts", max_batch=MAX_BATCH, triton_repo=root / "triton")
    return root / "artifacts", meta, root / "triton"


def test_plan_is_built_and_recorded_for_this_gpu(gpu_export):
    out, meta, _ = gpu_export
    assert meta["files"]["plan"] == "model.plan" and (out / "model.plan").stat().st_size > 0
    assert (out / "timing.cache").stat().st_size > 0
    assert meta["tensorrt"]["precision"] == "fp16"
    assert meta["tensorrt"]["profile"] == {"min": 1, "opt": MAX_BATCH // 2, "max": MAX_BATCH}
    fits, why = plan_matches_this_machine(meta)
    assert fits, why


def test_each_prm_conv_is_fused_with_its_gelu_and_no_prm_concat_remains(gpu_export):
    out, _, _ = gpu_export
    layers = json.loads((out / "layers.json").read_text())
    blocks = find_prm_blocks(onnx.load(str(out / "model.onnx")))
    assert blocks
    assert prm_fusion_problems(layers, blocks) == []


def test_tensorrt_fp16_agrees_with_onnx_runtime_on_64_real_images(gpu_export):
    out, meta, _ = gpu_export
    images, _ = model_inputs(Preprocessing.from_dict(meta["preprocessing"]), 64)
    session = cpu_session(out / "model.onnx")
    for start in range(0, 64, MAX_BATCH):
        batch = np.ascontiguousarray(images[start : start + MAX_BATCH])
        expected = session.run(["logits"], {"images": batch})[0]
        got = run_plan(out / "model.plan", batch)["logits"]
        assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
        assert np.abs(got - expected).max() <= 1e-2


def test_triton_repository_serves_the_plan(gpu_export):
    from tritonclient.grpc import model_config_pb2

    _, _, repo = gpu_export
    config = text_format.Parse((repo / "vitae" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan"
    assert (repo / "vitae" / "1" / "model.plan").is_file() and (repo / "vitae" / "1" / "model.onnx").is_file()
