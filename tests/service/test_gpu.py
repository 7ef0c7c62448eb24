"""The service's GPU backends on a real GPU; they skip elsewhere, with the reason."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from export import export_artifacts
from export.inputs import model_inputs
from model.config import Preprocessing
from service.artifacts import read_artifacts
from service.backends import OnnxRuntimeBackend

CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA_EP, reason="ONNX Runtime has no CUDAExecutionProvider here (needs onnxruntime-gpu)"),
]


def test_onnx_runtime_on_cuda_runs_on_the_gpu_and_matches_cpu(tiny_checkpoint, tmp_path):
    meta = export_artifacts(tiny_checkpoint, tmp_path / "artifacts", max_batch=4)
    served = read_artifacts(tmp_path / "artifacts")
    gpu = OnnxRuntimeBackend(served, gpu=True, device="cuda:0")
    # If the CUDA provider failed to load (CUDA/cuDNN libraries of another major), the session runs on CPU and
    # the backend must report that, not "cuda:0".
    assert "CUDAExecutionProvider" in gpu.session.get_providers(), gpu.session.get_providers()
    assert gpu.device == "cuda:0"
    cpu = OnnxRuntimeBackend(served, gpu=False, device="cpu")
    images, _ = model_inputs(Preprocessing.from_dict(meta["preprocessing"]), 4)
    assert np.abs(gpu.infer(images)[0] - cpu.infer(images)[0]).max() <= 1e-3
