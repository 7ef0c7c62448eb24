"""The exported graph stays inside FP16's range on real images, checked on CPU with every intermediate exposed.

An FP16 TensorRT engine overflows wherever an intermediate passes 65504 (a cast to FP16 follows even the ops kept
in FP32). ONNX Runtime computes the same graph in fp32 here; these tests read every node output.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support.checkpoints import SHARED_REFERENCE

from export.fold import fold_batchnorms
from export.fp16_range import FP16_MAX, FP16_SAFE_LIMIT, intermediate_ranges, out_of_range, with_all_outputs
from export.inputs import model_inputs
from export.onnx_export import export_onnx
from export.parity import TOLERANCE_FP32, cpu_session
from export.performer import StableTokenPerformer, stable_performers
from export.serving import serving_outputs
from export.source import load_source
from model import ViTAE, create_model
from model.layers import TokenPerformer

VITAE_T_REFERENCE = SHARED_REFERENCE / "vitae_t_official.safetensors"
DEMO_IMAGES = 20  # every demo sample
VITAE_T_IMAGES = 8  # 224x224: a few suffice, and all intermediates of ViTAE-T at once are large


def exported(model: ViTAE, folder: Path, *, fp16_safe: bool = True) -> Path:
    path = folder / "model.onnx"
    export_onnx(fold_batchnorms(model), path, fp16_safe=fp16_safe)
    return path


def report(ranges, label: str) -> None:
    print(f"\n{label}: largest intermediates " + ", ".join(f"{r.name} ({r.op}) {r.max_abs:.3g}" for r in ranges[:5]))


def assert_inside_fp16(model: ViTAE, folder: Path, count: int, label: str) -> None:
    images, origin = model_inputs(model.config.preprocessing, count)
    onnx_path = exported(model, folder)
    ranges = intermediate_ranges(onnx_path, images)
    report(ranges, f"{label} on {origin}")
    assert len(ranges) > 100  # every node output was read, not just the two graph outputs
    assert out_of_range(ranges) == [], f"intermediates at or past {FP16_SAFE_LIMIT:g}: {out_of_range(ranges)[:10]}"
    # The stable form computes what the release computes: fp32 ONNX Runtime against the unfolded release model.
    got = cpu_session(onnx_path).run(["logits", "tokens"], {"images": images})
    expected = serving_outputs(model, images)
    for name, value in zip(("logits", "tokens"), got, strict=True):
        assert np.abs(value - expected[name]).max() <= TOLERANCE_FP32, name


def test_demo_model_intermediates_stay_inside_fp16_on_the_demo_samples(demo_model, tmp_path):
    assert_inside_fp16(demo_model, tmp_path, DEMO_IMAGES, "demo model")


def test_release_arithmetic_of_the_demo_model_overflows_fp16_so_the_check_bites(demo_model, tmp_path):
    images, _ = model_inputs(demo_model.config.preprocessing, DEMO_IMAGES)
    ranges = intermediate_ranges(exported(demo_model, tmp_path, fp16_safe=False), images)
    report(ranges, "demo model, release arithmetic")
    overflowing = [r for r in ranges if r.max_abs > FP16_MAX]
    assert overflowing and {r.op for r in overflowing} & {"Exp", "Einsum", "Div"}


@pytest.mark.skipif(not VITAE_T_REFERENCE.is_file(), reason=f"no reference ViTAE-T weights at {VITAE_T_REFERENCE}")
def test_released_vitae_t_intermediates_stay_inside_fp16(tmp_path):
    model = load_source(VITAE_T_REFERENCE, variant="vitae_t").model
    assert_inside_fp16(model, tmp_path, VITAE_T_IMAGES, "ViTAE-T, reference weights")


def test_random_init_vitae_t_intermediates_stay_inside_fp16(tmp_path):
    torch.manual_seed(0)
    model = create_model("vitae_t").eval()
    assert_inside_fp16(model, tmp_path, VITAE_T_IMAGES, "ViTAE-T, random init")


def test_stable_performer_keeps_the_state_dict_and_the_result_where_the_release_underflows():
    torch.manual_seed(0)
    release = TokenPerformer(dim=16, token_dim=16).eval()
    stable = StableTokenPerformer.from_release(release).eval()
    ours, theirs = stable.state_dict(), release.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    # Larger inputs: |q|^2/2 dominates, so some tokens' features all underflow to 0 in the release (y = 0 there)
    # while others reach ~1e4; the stable form must give the same answer, not renormalise the dead tokens.
    x = torch.randn(2, 50, 16) * torch.linspace(0.5, 6.0, 50)[None, :, None]  # (B, T, C)
    with torch.inference_mode():
        k, q, _ = torch.split(release.kqv(x), release.emb, dim=-1)
        assert (release.prm_exp(q).amax(dim=-1) == 0).any()
        expected, got = release.attention(x), stable.attention(x)
    assert torch.isfinite(expected).all()
    assert (got - expected).abs().max() <= 1e-4


def test_stable_performers_swaps_every_release_performer_and_leaves_the_original(demo_model):
    twin = copy.deepcopy(demo_model)
    assert stable_performers(twin) == 2
    assert not any(type(m) is TokenPerformer for m in twin.modules())
    assert sum(type(m) is TokenPerformer for m in demo_model.modules()) == 2
    assert twin.state_dict().keys() == demo_model.state_dict().keys()


def test_every_float_node_output_is_exposed(tmp_path):
    torch.manual_seed(0)
    model = create_model("vitae_fmnist", num_classes=10, img_size=32, in_chans=1).eval()
    graph = onnx.load(str(exported(model, tmp_path)))
    exposed = with_all_outputs(graph)
    outputs = {o.name for o in exposed.graph.output}
    exps = [n.output[0] for n in graph.graph.node if n.op_type in ("Exp", "Einsum", "Gelu")]
    assert exps and set(exps) <= outputs
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    assert len(session.get_outputs()) == len(outputs)
