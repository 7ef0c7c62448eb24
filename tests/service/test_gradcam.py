"""Grad-CAM: the backend-output map at the last cell is exactly autograd's, and pytorch-grad-cam's."""

from __future__ import annotations

import importlib
import sys
import threading
import types

import numpy as np
import pytest
import torch
from support.checkpoints import exported
from support.images import sample_images

from model import Preprocessing, ViTAE, load_weights
from model.preprocess import decode_image, preprocess
from service.artifacts import read_artifacts
from service.backends import OnnxRuntimeBackend
from service.gradcam import AutogradGradCAM, cells, resolve_cell
from service.postprocess import last_cell_cam, normalize_cam


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    return read_artifacts(exported(tiny_checkpoint))


def fresh_model(served) -> ViTAE:
    return load_weights(ViTAE(served.metadata.model_config()), served.file("weights")).eval()


@pytest.fixture(scope="module")
def images(served) -> np.ndarray:
    prep: Preprocessing = served.preprocessing
    return np.stack([preprocess(decode_image(data), prep) for data in sample_images(6)])  # (6, 1, 32, 32)


@pytest.fixture(scope="module")
def backend_outputs(served, images):
    backend = OnnxRuntimeBackend(served, gpu=False, threads=1)
    return backend.infer(images)  # logits (B, K), tokens (B, N, D)


def test_raw_last_cell_map_sums_to_logit_minus_bias(served, backend_outputs):
    logits, tokens = backend_outputs
    targets = np.array([0, 1, 2, 3, 4, 5])
    raw = last_cell_cam(tokens, served.head_weight, targets, served.grid)
    expected = logits[np.arange(6), targets] - served.head_bias[targets]
    np.testing.assert_allclose(raw.sum(axis=(1, 2)), expected, atol=1e-5)


def test_backend_output_cam_equals_autograd_gradcam_at_the_last_cell(served, images, backend_outputs):
    logits, tokens = backend_outputs
    targets = logits.argmax(axis=1)
    from_backend = normalize_cam(last_cell_cam(tokens, served.head_weight, targets, served.grid))
    explainer = AutogradGradCAM(fresh_model(served))
    _, raw = explainer(images, targets, layer=len(explainer.cells) - 1)
    assert np.abs(from_backend - normalize_cam(raw)).max() <= 1e-4
    assert from_backend.max() == pytest.approx(1.0)  # a real map, not all zeros


def test_a_batch_with_mixed_targets_equals_one_image_at_a_time(served, images):
    explainer = AutogradGradCAM(fresh_model(served))
    targets = [0, 3, 7, 1, 9, 3]
    for layer in (0, len(explainer.cells) - 1):
        _, together = explainer(images, targets, layer)
        for i, target in enumerate(targets):
            _, alone = explainer(images[i : i + 1], [target], layer)
            np.testing.assert_allclose(together[i], alone[0], atol=1e-5)


def test_autograd_gradcam_leaves_parameters_without_gradients(served, images):
    model = fresh_model(served)
    explainer = AutogradGradCAM(model)
    explainer(images, [1] * len(images), layer=0)
    assert not model.training
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_autograd_gradcam_is_safe_under_concurrent_calls(served, images):
    explainer = AutogradGradCAM(fresh_model(served))
    layer = len(explainer.cells) - 2
    expected = {t: explainer(images, [t] * len(images), layer)[1] for t in range(4)}
    results: dict[int, np.ndarray] = {}
    threads = [
        threading.Thread(target=lambda t=t: results.__setitem__(t, explainer(images, [t] * len(images), layer)[1]))
        for t in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for t in range(4):
        np.testing.assert_array_equal(results[t], expected[t])


def test_cells_are_named_in_forward_order_with_their_grids(served):
    model = fresh_model(served)
    found = cells(model)
    assert [c.name for c in found] == ["layers.0.RC", "layers.1.RC", "layers.2.RC", "layers.2.NC.0"]
    assert [c.grid for c in found] == [(16, 16), (8, 8), (4, 4), (4, 4)]
    names = [c.name for c in found]
    assert resolve_cell(names, "-1") == 3 and resolve_cell(names, "layers.1.RC") == 1
    with pytest.raises(ValueError, match="layers.0.RC"):
        resolve_cell(names, "7")


# ------------------------------------------------------------------ pytorch-grad-cam


def import_pytorch_grad_cam():
    """pytorch_grad_cam, or a skip saying what is missing.

    Its package __init__ imports torchvision for helpers the GradCAM class does not use. PyPI's
    torchvision wheels are CUDA builds that cannot load beside this CPU-only torch ("operator
    torchvision::nms does not exist"), and the CPU wheels are not on PyPI; so where torchvision cannot
    be imported, a placeholder module stands in for it. The CAM itself is entirely grad-cam's code.
    """
    for name in ("cv2", "ttach", "matplotlib", "scipy", "sklearn"):
        pytest.importorskip(name, reason=f"grad-cam needs {name}")
    placeholders: dict[str, types.ModuleType] = {}
    try:
        importlib.import_module("torchvision")
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        # Only names are needed at import time: torchvision.transforms' Compose/Normalize/ToTensor and
        # torchvision.transforms.functional.resize (for other CAM methods and image helpers).
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            placeholders[name] = types.ModuleType(name)
            placeholders[name].__path__ = []  # a package, so that submodules resolve
        transforms = placeholders["torchvision.transforms"]
        transforms.Compose = transforms.Normalize = transforms.ToTensor = None
        placeholders["torchvision.transforms.functional"].resize = None
        placeholders["torchvision"].transforms = transforms
        transforms.functional = placeholders["torchvision.transforms.functional"]
        sys.modules.update(placeholders)
    try:
        module = pytest.importorskip("pytorch_grad_cam", reason="the grad-cam package is not installed")
        importlib.import_module("pytorch_grad_cam.utils.model_targets")
    finally:
        for name, placeholder in placeholders.items():
            if sys.modules.get(name) is placeholder:
                del sys.modules[name]  # the rest of the session sees no fake torchvision
    return module


def grid_gradcam(pgc, model, layer, grid: tuple[int, int]):
    """pytorch-grad-cam's GradCAM on a token layer, asked for maps at the token grid's own size."""
    h, w = grid

    def tokens_to_maps(tokens: torch.Tensor) -> torch.Tensor:
        B, N, C = tokens.shape
        return tokens.transpose(1, 2).reshape(B, C, h, w)  # (B, C, h, w)

    class GridGradCAM(pgc.GradCAM):
        # The map at the grid's own size, so the comparison is on the grid and not after a resize.
        def get_target_width_height(self, input_tensor):
            return w, h

    return GridGradCAM(model, target_layers=[layer], reshape_transform=tokens_to_maps)


def test_last_cell_cam_equals_pytorch_grad_cam(served, images, backend_outputs):
    pgc = import_pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = fresh_model(served)  # grad-cam needs trainable parameters: its own copy

    logits, tokens = backend_outputs
    targets = [int(t) for t in logits.argmax(axis=1)]
    with grid_gradcam(pgc, model, model.layers[2].NC[-1], served.grid) as cam:
        theirs = cam(torch.from_numpy(images), targets=[ClassifierOutputTarget(t) for t in targets])  # (B, h, w)
    ours = normalize_cam(last_cell_cam(tokens, served.head_weight, np.array(targets), served.grid))
    assert theirs.shape == ours.shape
    assert np.abs(theirs - ours).max() <= 1e-4


def test_autograd_gradcam_at_an_earlier_cell_equals_pytorch_grad_cam(served, images):
    pgc = import_pytorch_grad_cam()
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = fresh_model(served)
    explainer = AutogradGradCAM(fresh_model(served))
    cell = explainer.cells[0]  # layers.0.RC, a 16x16 grid

    targets = [2, 5, 7, 0, 1, 9]
    with grid_gradcam(pgc, model, model.layers[0].RC, cell.grid) as cam:
        theirs = cam(torch.from_numpy(images), targets=[ClassifierOutputTarget(t) for t in targets])
    _, raw = explainer(images, targets, layer=0)
    assert np.abs(theirs - normalize_cam(raw)).max() <= 1e-4


def test_backend_batch_with_mixed_cam_targets_equals_one_image_at_a_time(served, images):
    from service.inference import ClassifyInput, classify_batch

    backend = OnnxRuntimeBackend(served, gpu=False, threads=1)
    inputs = [
        ClassifyInput(pixels, cam=True, cam_class=target)
        for pixels, target in zip(images, [0, 3, 7, None, 9, 3], strict=True)
    ]
    together = classify_batch(backend, served, inputs)
    for item, batched in zip(inputs, together, strict=True):
        (alone,) = classify_batch(backend, served, [item])
        assert batched.cam_class == alone.cam_class
        np.testing.assert_allclose(batched.cam_raw, alone.cam_raw, atol=1e-6)
        np.testing.assert_allclose(batched.logits, alone.logits, atol=1e-6)
    assert together[3].cam_class == int(np.argmax(together[3].logits))  # no class asked: its own top-1
