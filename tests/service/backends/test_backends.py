"""Backends behind one interface: they agree, `auto` picks and explains, GPU ones skip here with a reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support.checkpoints import exported
from support.images import sample_images

from model.preprocess import decode_image, preprocess
from service.artifacts import ArtifactsError, ensure_artifacts, read_artifacts
from service.backends import BackendUnavailable, OnnxRuntimeBackend, TorchBackend, create_backend, select_backend
from service.settings import Settings

HAS_CUDA = torch.cuda.is_available()
NO_GPU = "needs an NVIDIA GPU (none visible to PyTorch on this machine)"


@pytest.fixture(scope="module", params=["gray", "rgb"])
def served(request, tiny_checkpoint, tiny_rgb_checkpoint):
    checkpoint = tiny_checkpoint if request.param == "gray" else tiny_rgb_checkpoint
    return read_artifacts(exported(checkpoint))


@pytest.fixture(scope="module")
def images(served) -> np.ndarray:
    return np.stack([preprocess(decode_image(data), served.preprocessing) for data in sample_images(8)])


def test_onnxruntime_and_torch_agree_within_1e_4_on_cpu(served, images):
    ort_logits, ort_tokens = OnnxRuntimeBackend(served, gpu=False, threads=1).infer(images)
    torch_logits, torch_tokens = TorchBackend(served, "cpu").infer(images)
    assert ort_logits.shape == (8, served.num_classes) and ort_tokens.shape == (8, 16, 32)
    assert np.abs(ort_logits - torch_logits).max() <= 1e-4
    assert np.abs(ort_tokens - torch_tokens).max() <= 1e-4


def test_auto_picks_openvino_on_a_cpu_and_says_why(served):
    selection = select_backend("auto", served, device="cpu")
    assert selection.backend.name == "openvino" and selection.backend.device == "cpu"  # a core dependency
    assert "fastest" in selection.reason and "CPU" in selection.reason


def test_a_named_backend_is_used_as_asked(served):
    selection = select_backend("torch", served, device="cpu")
    assert isinstance(selection.backend, TorchBackend)
    assert selection.reason == "VITAE_BACKEND=torch"


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")
def test_tensorrt_without_a_gpu_is_refused_with_the_reason(served):
    with pytest.raises(BackendUnavailable, match="TensorRT|tensorrt|CUDA"):
        create_backend("tensorrt", served, "auto")
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
        create_backend("onnxruntime", served, "cuda")


def test_an_unknown_device_is_refused(served):
    with pytest.raises(ValueError, match="cuda:N"):
        create_backend("torch", served, "tpu")


# ------------------------------------------------------------------ GPU (skipped here)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_torch_cuda_and_onnxruntime_cuda_agree_with_cpu(served, images):
    reference, _ = TorchBackend(served, "cpu").infer(images)
    gpu_torch, _ = TorchBackend(served, "cuda").infer(images)
    assert np.abs(gpu_torch - reference).max() <= 1e-3
    try:
        ort_cuda = OnnxRuntimeBackend(served, gpu=True, device="cuda")
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    assert np.abs(ort_cuda.infer(images)[0] - reference).max() <= 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_GPU)
def test_tensorrt_engine_agrees_with_onnxruntime(tiny_checkpoint, tmp_path, images):
    pytest.importorskip("tensorrt", reason="the tensorrt package is not installed")
    import export

    export.export_artifacts(tiny_checkpoint, tmp_path / "trt", max_batch=8)
    gpu_served = read_artifacts(tmp_path / "trt")
    if gpu_served.file("plan") is None:
        pytest.skip("the export stage built no TensorRT plan here")
    if images.shape[1] != gpu_served.preprocessing.in_chans:
        pytest.skip("the plan is for the grayscale model")
    trt_logits, trt_tokens = create_backend("tensorrt", gpu_served, "cuda").infer(images)
    ort_logits, ort_tokens = OnnxRuntimeBackend(gpu_served, gpu=False).infer(images)
    assert (trt_logits.argmax(1) == ort_logits.argmax(1)).all()
    assert np.abs(trt_logits - ort_logits).max() <= 1e-2
    assert select_backend("auto", gpu_served, "auto").backend.name == "tensorrt"


# ------------------------------------------------------------------ artifacts at start


def test_missing_artifacts_are_exported_from_the_configured_checkpoint(tiny_checkpoint, tmp_path):
    settings = Settings(artifacts=tmp_path / "artifacts", checkpoint=tiny_checkpoint)
    served = ensure_artifacts(settings)
    assert served.class_names[7] == "Sneaker" and served.grid == (4, 4)
    exported_at = json.loads((tmp_path / "artifacts" / "metadata.json").read_text())["exported_at"]
    ensure_artifacts(settings)  # fresh: nothing is rebuilt
    assert json.loads((tmp_path / "artifacts" / "metadata.json").read_text())["exported_at"] == exported_at


def test_the_default_checkpoint_never_overwrites_another_models_artifacts(
    tiny_checkpoint, tiny_rgb_checkpoint, tmp_path
):
    import export

    export.export_artifacts(tiny_rgb_checkpoint, tmp_path / "rgb", max_batch=8)
    values = Settings().model_dump() | {"artifacts": tmp_path / "rgb", "checkpoint": tiny_checkpoint}
    # As if VITAE_CHECKPOINT were left at its default (which here names the gray model): not explicitly set.
    settings = Settings.model_construct(_fields_set={"artifacts"}, **values)
    assert ensure_artifacts(settings).num_classes == 5
    explicit = Settings.model_construct(_fields_set={"artifacts", "checkpoint"}, **values)
    assert ensure_artifacts(explicit).num_classes == 10  # set on purpose: that checkpoint is exported


def test_no_artifacts_and_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactsError, match="VITAE_ARTIFACTS"):
        ensure_artifacts(Settings(artifacts=tmp_path / "a", checkpoint=tmp_path / "missing.safetensors"))


def test_a_refused_tensorrt_plan_leaves_an_onnx_export_that_later_starts_keep(tiny_checkpoint, tmp_path, monkeypatch):
    """The engine check itself needs a GPU (tests/export/test_engine_gpu.py); here the refusal is raised where the
    TensorRT step would raise it, and the service's real export then runs again without a plan."""
    import export
    from export.engine.parity import EngineParityError

    real_export, calls = export.export_artifacts, []

    def export_refusing_engines(checkpoint, out, **options):
        calls.append(options.get("tensorrt", True))
        if options.get("tensorrt", True):
            raise EngineParityError("top-1 differs from fp32 on 3 of 8 images")
        return real_export(checkpoint, out, **options)

    monkeypatch.setattr(export, "export_artifacts", export_refusing_engines)
    settings = Settings(artifacts=tmp_path / "a", checkpoint=tiny_checkpoint, max_batch_size=4)
    served = ensure_artifacts(settings)
    assert calls == [True, False]
    assert served.metadata.settings["tensorrt"] is False
    version = served.version
    assert ensure_artifacts(settings).version == version  # fresh as it is: no engine is tried again
    assert calls == [True, False]
