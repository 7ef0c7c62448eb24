"""The export's bf16 measurement on each kind of CPU: flat and extreme images, non-finite outputs traced to their
node, and a verdict that holds only for the kind of CPU it was measured on.

Behaviour that differs by CPU is tested here with the CPU's flags injected, so every kind is covered on any
machine; the tests that need bf16 arithmetic itself skip, naming the flags, where the CPU has none.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import export.pipeline
from export import artifacts_are_fresh, export_artifacts
from export.bf16_probe import first_non_finite_node
from export.inputs import stress_images
from export.precision import (
    MAX_RELATIVE_DIFF,
    cpu_flags,
    cpu_kind,
    measure_bf16,
    native_bf16,
    this_cpu_has_native_bf16,
    verdict,
)
from model.config import Preprocessing
from model.preprocess import preprocess
from service.backends.openvino_backend import PrecisionRefused, choose_cpu_precision

pytest.importorskip("openvino", reason="the openvino package (a core dependency) is not installed")

NATIVE_BF16 = this_cpu_has_native_bf16()
NO_BF16 = "needs a CPU with native bf16 (cpuinfo flag avx512_bf16 or amx_bf16); this one has neither"

# The flags that matter of the three kinds of CPU these machines come with (from their /proc/cpuinfo).
AVX2_EPYC = frozenset("fpu sse4_2 avx f16c fma avx2 bmi2 sha_ni".split())
AVX512_BF16_EPYC = AVX2_EPYC | frozenset("avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni".split())
AMX_XEON = AVX512_BF16_EPYC | frozenset("amx_bf16 amx_tile amx_int8 avx512_fp16".split())
KINDS = {"avx2": AVX2_EPYC, "avx512_bf16": AVX512_BF16_EPYC, "amx": AMX_XEON}

GRAY_8 = Preprocessing(img_size=8, in_chans=1, mean=(0.5,), std=(0.5,), crop_pct=1.0, interpolation="bilinear")
GRAY_32 = dataclasses.replace(GRAY_8, img_size=32)
SAFE_HERE = {"safe": True, "reason": "measured", "top1_agreement": 100.0, "max_logit_diff": 0.01}


def cancelling_model(path: Path) -> Path:
    """A model that is finite in fp32 and infinite in bf16 on most images: 1 / (b - a) with b = 1.001 a.

    a and b are two matmuls of the image (its mean pixel, and 1.001 times it); bf16 stores each with 8
    significant bits, so both round to the same value, their difference is 0 and its inverse inf: the way a real
    graph goes non-finite in reduced precision (cancellation, then a division).
    """
    pixels = 8 * 8
    mean = np.full((pixels, 4), 1 / pixels, np.float32)
    constants = {
        "mean": mean,
        "mean_plus": mean * np.float32(1.001),
        "one": np.ones((1, 4), np.float32),
        "head": np.full((4, 3), 1e-3, np.float32),
        "to_tokens": np.eye(4, dtype=np.float32),
        "token_shape": np.array([-1, 2, 2], np.int64),
    }
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "mean"], ["a"], name="a/MatMul"),
        helper.make_node("MatMul", ["flat", "mean_plus"], ["b"], name="b/MatMul"),
        helper.make_node("Sub", ["b", "a"], ["gap"], name="gap/Sub"),
        helper.make_node("Div", ["one", "gap"], ["inverse"], name="gap/Div"),
        helper.make_node("MatMul", ["inverse", "head"], ["logits"], name="head/MatMul"),
        helper.make_node("MatMul", ["inverse", "to_tokens"], ["flat_tokens"], name="tokens/MatMul"),
        helper.make_node("Reshape", ["flat_tokens", "token_shape"], ["tokens"], name="tokens/Reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "cancelling",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", 2, 2]),
        ],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


# ------------------------------------------------------------------ what each kind of CPU is


@pytest.mark.parametrize(("kind", "flags"), KINDS.items())
def test_cpu_kind_from_the_flags_of_each_kind_of_machine(kind, flags):
    assert cpu_kind(flags) == kind
    assert native_bf16(set(), flags) == (kind != "avx2")


def test_a_cpu_without_avx512_bf16_or_amx_gets_no_bf16_measurement(tmp_path):
    report = measure_bf16(tmp_path / "absent.onnx", GRAY_8, [], np.zeros(0), flags=AVX2_EPYC, capabilities=frozenset())
    assert report.safe is None and "no native bf16" in report.reason and report.images == 0


@pytest.mark.parametrize("served_on", ["avx512_bf16", "amx"])
def test_bf16_measured_on_another_kind_of_cpu_is_not_served_here(served_on):
    measured_on = "amx" if served_on == "avx512_bf16" else "avx512_bf16"
    report = SAFE_HERE | {"cpu_kind": measured_on}
    choice = choose_cpu_precision("auto", native_bf16=True, export_report=report, cpu_kind=served_on)
    assert choice.precision == "fp32" and f"another kind ({measured_on}, this one is {served_on})" in choice.reason
    with pytest.raises(PrecisionRefused, match="another kind"):
        choose_cpu_precision("bf16", native_bf16=True, export_report=report, cpu_kind=served_on)
    same = choose_cpu_precision("auto", native_bf16=True, export_report=report, cpu_kind=measured_on)
    assert same.precision == "bf16"


@pytest.mark.skipif(not NATIVE_BF16, reason=NO_BF16 + " (only such a CPU records the kind it measured bf16 on)")
def test_artifacts_measured_on_another_kind_of_cpu_are_rebuilt_here(monkeypatch, tiny_checkpoint, tmp_path):
    out = tmp_path / "artifacts"
    meta = export_artifacts(tiny_checkpoint, out, max_batch=2, tensorrt=False)
    assert meta["cpu_bf16"]["cpu_kind"] == cpu_kind(cpu_flags())
    assert artifacts_are_fresh(tiny_checkpoint, out, max_batch=2, tensorrt=False)
    other = "amx" if meta["cpu_bf16"]["cpu_kind"] != "amx" else "avx512_bf16"
    monkeypatch.setattr(export.pipeline, "cpu_flags", lambda: KINDS[other])
    assert not artifacts_are_fresh(tiny_checkpoint, out, max_batch=2, tensorrt=False)


# ------------------------------------------------------------------ the images bf16 is judged on


def test_stress_images_are_flat_and_extreme_and_each_named():
    images, names = stress_images(16)
    assert len(images) == len(names) == len(set(names)) >= 6
    assert {"black", "white", "checkerboard"} <= set(names)
    for image, name in zip(images, names, strict=True):
        pixels = preprocess(image, GRAY_8)  # (1, 8, 8)
        assert pixels.shape == (1, 8, 8) and np.isfinite(pixels).all(), name
    flat = [np.ptp(np.asarray(image)) for image, name in zip(images, names, strict=True) if name == "black"]
    assert flat == [0]


def test_outputs_far_from_fp32_make_bf16_unsafe_even_when_the_classes_agree():
    safe, why = verdict(100.0, None, None, True, relative_diff=2 * MAX_RELATIVE_DIFF)
    assert not safe and "of the output scale" in why
    assert verdict(100.0, None, None, True, relative_diff=MAX_RELATIVE_DIFF / 2)[0]


# ------------------------------------------------------------------ bf16 arithmetic itself


@pytest.mark.skipif(not NATIVE_BF16, reason=NO_BF16)
def test_the_probe_finds_the_node_where_bf16_first_goes_non_finite(tmp_path):
    model = cancelling_model(tmp_path / "cancelling.onnx")
    found = first_non_finite_node(model, np.ones((2, 1, 8, 8), np.float32))
    assert found is not None and (found.name, found.op_type) == ("gap/Div", "Divide")
    assert any(entry.startswith("gap/Sub: [0, 0]") for entry in found.inputs), found.inputs  # the cancellation


@pytest.mark.skipif(not NATIVE_BF16, reason=NO_BF16)
def test_a_model_that_goes_non_finite_in_bf16_is_measured_unsafe_with_the_node_named(tmp_path):
    model = cancelling_model(tmp_path / "cancelling.onnx")
    report = measure_bf16(model, GRAY_8, ["a", "b", "c"], np.zeros((2, 1, 8, 8), np.float32))
    assert report.safe is False and report.stress_images > 0 and report.max_logit_diff is None
    assert "non-finite" in report.reason and "gap/Div (Divide)" in report.reason and "black" in report.reason
    choice = choose_cpu_precision("auto", True, dataclasses.asdict(report), cpu_kind=report.cpu_kind)
    assert choice.precision == "fp32" and "gap/Div" in choice.reason


@pytest.mark.skipif(not NATIVE_BF16, reason=NO_BF16)
def test_the_tiny_models_bf16_is_finite_at_every_node_here(tiny_checkpoint):
    from support.checkpoints import exported

    artifacts = exported(tiny_checkpoint)
    images = np.stack([preprocess(image, GRAY_32) for image in stress_images(32)[0]])  # (S, 1, 32, 32)
    assert first_non_finite_node(artifacts / "model.onnx", images) is None
