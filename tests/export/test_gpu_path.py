"""The parts of the GPU path that can be proven on a CPU: the FP16 graph TensorRT 11 builds from, the engine
acceptance rule, the fusion evidence from layers.json, the Triton repository, ONNX Runtime's real device.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from onnx import TensorProto, helper
from support.checkpoints import SHARED_REFERENCE, tiny_model
from support.optional import triton_model_config

from export import export_artifacts
from export.artifacts import ArtifactsMetadata
from export.engine.fp16_graph import fp16_onnx, fp32_node_names
from export.engine.parity import compare_to_fp32
from export.fold import fold_batchnorms
from export.fusion import format_fusion, fusion_problems, prm_fusion
from export.graph import find_prm_blocks
from export.inputs import model_inputs
from export.onnx_export import export_onnx
from export.parity import cpu_session
from export.source import load_source
from export.triton import MODEL_NAME, config_pbtxt, plan_model_name, write_repository
from model import ViTAE, create_model
from service.backends import session_device

OUTPUTS = ["logits", "tokens"]
VITAE_T_REFERENCE = SHARED_REFERENCE / "vitae_t_official.safetensors"


def fp16_against_fp32(model: ViTAE, folder: Path, count: int, *, fp16_safe: bool = True):
    """The FP16 graph a strongly typed TensorRT build starts from, run by ONNX Runtime on CPU, against fp32."""
    fp32 = folder / "model.onnx"
    export_onnx(fold_batchnorms(model), fp32, fp16_safe=fp16_safe)
    fp16 = fp16_onnx(fp32, folder / "model_fp16.onnx")
    images, origin = model_inputs(model.config.preprocessing, count)
    expected = dict(zip(OUTPUTS, cpu_session(fp32).run(OUTPUTS, {"images": images}), strict=True))
    session = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    got = dict(zip(OUTPUTS, session.run(OUTPUTS, {"images": images}), strict=True))
    return compare_to_fp32(got, expected, "fp16"), origin


def test_fp16_graph_of_the_demo_model_passes_the_engine_rule_on_cpu(demo_model, tmp_path):
    (figures, problems), origin = fp16_against_fp32(demo_model, tmp_path, 20)
    print(f"\nFP16 graph (ONNX Runtime CPU) vs fp32 on {origin}: {figures}")
    assert problems == []


def test_fp16_graph_of_the_release_arithmetic_passes_too_with_its_kernel_fp32_end_to_end(demo_model, tmp_path):
    (figures, problems), _ = fp16_against_fp32(demo_model, tmp_path, 20, fp16_safe=False)
    print(f"\nrelease arithmetic in FP16 vs fp32: {figures}")
    assert problems == []


def test_kept_fp32_nodes_feed_each_other_without_an_fp16_round_trip(tmp_path):
    # A Performer-like tail: e = exp(x) for x = -20 (2e-9, below FP16's smallest subnormal), then e / (e + e).
    # Through FP16 between the kept nodes it is 0 / 0; kept FP32 end to end it is 0.5.
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    nodes = [
        helper.make_node("Exp", ["images"], ["e"], name="/RC/Exp"),
        helper.make_node("Add", ["e", "e"], ["s"], name="/RC/Add"),
        helper.make_node("Div", ["e", "s"], ["q"], name="/RC/Div"),
        helper.make_node("Mul", ["q", "q"], ["logits"], name="/RC/proj/MatMul"),  # outside the kernel: FP16
    ]
    graph = helper.make_model(helper.make_graph(nodes, "tail", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(graph, tmp_path / "tail.onnx")
    fp16 = onnx.load(fp16_onnx(tmp_path / "tail.onnx", tmp_path / "tail_fp16.onnx"))
    session = ort.InferenceSession(fp16.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": np.full((1, 4), -20.0, np.float32)})[0]
    np.testing.assert_allclose(got, 0.25)
    casts = [n for n in fp16.graph.node if n.op_type == "Cast"]
    # Left: FP32 input -> FP16 for the Mul, and its FP16 output -> the FP32 graph output.
    assert len(casts) == 2, [(n.input, n.output) for n in casts]


def test_fp16_graph_of_random_init_vitae_t_stays_close_to_fp32_on_cpu(tmp_path):
    torch.manual_seed(0)
    (figures, problems), origin = fp16_against_fp32(create_model("vitae_t").eval(), tmp_path, 4)
    print(f"\nViTAE-T (random init) FP16 graph vs fp32 on {origin}: {figures}")
    # Random-init logits are all near 0 (top-1 among near-ties is noise): only finiteness and closeness count.
    assert figures["finite"] and figures["max_abs_diff"]["logits"] <= figures["tolerance"] * figures["logit_scale"]


@pytest.mark.skipif(not VITAE_T_REFERENCE.is_file(), reason=f"no reference ViTAE-T weights at {VITAE_T_REFERENCE}")
def test_fp16_graph_of_released_vitae_t_passes_the_engine_rule_on_cpu(tmp_path):
    model = load_source(VITAE_T_REFERENCE, variant="vitae_t").model
    (figures, problems), origin = fp16_against_fp32(model, tmp_path, 4)
    print(f"\nViTAE-T (reference weights) FP16 graph vs fp32 on {origin}: {figures}")
    assert problems == []


def test_fp16_conversion_keeps_the_performer_kernel_and_only_it_in_fp32(tmp_path):
    graph = export_onnx(fold_batchnorms(tiny_model()), tmp_path / "model.onnx")
    kept = set(fp32_node_names(graph))
    kinds = {node.name: node.op_type for node in graph.graph.node}
    performer_ops = {"Exp", "Einsum", "TopK", "Log", "Min"}
    assert {name for name, op in kinds.items() if op in performer_ops} <= kept
    assert not {name for name, op in kinds.items() if op in ("Conv", "Gelu", "MatMul")} & kept


def test_compare_to_fp32_names_every_failure():
    expected = {"logits": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), "tokens": np.zeros((2, 3), np.float32)}
    got = {"logits": np.array([[0.0, 1.0], [0.0, 1.0]], np.float32), "tokens": np.array([[0, np.nan, 0]] * 2)}
    figures, problems = compare_to_fp32(got, expected, "fp16")
    assert figures["top1_agree"] == 1 and not figures["finite"]
    assert len(problems) == 3 and "1/2 images" in problems[1]
    close = {"logits": expected["logits"] + 0.01, "tokens": expected["tokens"]}
    assert compare_to_fp32(close, expected, "fp16")[1] == []


def inspector(*layers) -> dict:
    return {"Layers": list(layers), "Bindings": ["images", "logits", "tokens"]}


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("fusion") / "model.onnx"
    return export_onnx(fold_batchnorms(tiny_model()), path)


def test_fusion_is_read_from_fused_names_metadata_and_foreign_nodes(tiny_graph):
    blocks = find_prm_blocks(tiny_graph)
    order = [n.name for n in tiny_graph.graph.node]
    first, second, third = blocks[0], blocks[1], blocks[2]
    layers = [
        # Conv + activation layers as TensorRT names them
        *({"Name": f"{c} + {g}", "LayerType": "Conv"} for c, g in zip(first.convs, first.gelus, strict=True)),
        # DETAILED metadata naming the ONNX nodes of a layer
        *(
            {"Name": f"fused_{i}", "LayerType": "Conv", "Metadata": f"[ONNX Layer: {c}]\x1e[ONNX Layer: {g}]"}
            for i, (c, g) in enumerate(zip(second.convs, second.gelus, strict=True))
        ),
        # a Myelin region spanning the whole third PRM
        {"Name": f"{{ForeignNode[{third.convs[0]}...{third.transpose}]}}", "LayerType": "Myelin"},
    ]
    report = prm_fusion(inspector(*layers), blocks, order)
    print("\n" + format_fusion(report))
    assert fusion_problems(report) == []
    assert all(b.layer for b in report) and report[-1].layer.startswith("{ForeignNode[")


def test_fusion_check_fails_when_a_conv_and_its_gelu_run_apart(tiny_graph):
    blocks = find_prm_blocks(tiny_graph)
    apart = [{"Name": n, "LayerType": "X"} for b in blocks for n in (*b.convs, *b.gelus)]
    report = prm_fusion(inspector(*apart), blocks, [n.name for n in tiny_graph.graph.node])
    assert len(fusion_problems(report)) == sum(len(b.convs) for b in blocks)
    assert "NOT FUSED" in format_fusion(report)


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "artifacts"
    return out, ArtifactsMetadata.from_dict(export_artifacts(tiny_checkpoint, out, max_batch=4))


def test_triton_default_is_the_onnx_model_with_the_tensorrt_accelerator(tiny_artifacts, tmp_path):
    model_config_pb2 = triton_model_config()
    out, meta = tiny_artifacts
    (folder,) = write_repository(out, meta, tmp_path)
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert folder.name == config.name == MODEL_NAME and config.platform == "onnxruntime_onnx"
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.onnx"]


def test_triton_plan_only_on_request_and_named_after_its_tensorrt(tiny_artifacts, tmp_path):
    out, meta = tiny_artifacts
    with pytest.raises(ValueError, match="no TensorRT plan"):
        write_repository(out, meta, tmp_path, plan=True)
    built = dataclasses.replace(
        meta, tensorrt={"version": "10.13.3.9", "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}
    )
    model_config_pb2 = triton_model_config()
    text = config_pbtxt(built, plan=True)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == plan_model_name("10.13.3.9") == "vitae_trt10_13_3" and config.platform == "tensorrt_plan"
    assert "TensorRT 10.13.3.9" in text.splitlines()[0]


def test_onnx_runtime_reports_the_device_it_really_runs_on(tiny_artifacts, caplog):
    out, _ = tiny_artifacts
    # Asked for CUDA where the provider cannot load, ONNX Runtime quietly runs on CPU; the backend must say so.
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.warns(UserWarning) if "CUDAExecutionProvider" not in ort.get_available_providers() else _noop():
        session = ort.InferenceSession(str(out / "model.onnx"), providers=providers)
    expected = "cuda:0" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
    with caplog.at_level(logging.WARNING, logger="service.backends"):
        assert session_device(session, "cuda:0") == expected
    assert (expected == "cpu") == ("did not load" in caplog.text)
    assert session_device(session, "cpu") == "cpu"


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
