"""The export stage: artifacts, parity, graph structure, idempotence, refusals, Triton, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from onnx import TensorProto, helper
from safetensors.torch import load_file
from support.checkpoints import DEMO_CHECKPOINT, FIXTURES, ROOT, SHARED_REFERENCE
from support.optional import triton_model_config

from export import artifacts_are_fresh, export_artifacts
from export.engine.machine import plan_matches_this_machine, unavailable_reason
from export.fold import fold_batchnorms
from export.graph import GraphCheckError, find_prm_blocks, op_counts
from export.inputs import fashion_mnist_test, model_inputs
from export.parity import ParityError, check_parity, cpu_session
from export.precision import STAND_IN_IMAGES, compare_logits, this_cpu_has_native_bf16, verdict
from export.source import sha256_file
from model import CheckpointError, ViTAE, ViTAEConfig
from model.checkpoint import load_checkpoint

MAX_BATCH = 4
METADATA_KEYS = {
    "format",
    "name",
    "version",
    "variant",
    "config",
    "class_names",
    "class_names_source",
    "wordnet_ids",
    "preprocessing",
    "grid",
    "inputs",
    "outputs",
    "files",
    "checkpoint",
    "settings",
    "parity",
    "cpu_bf16",
    "tensorrt",
    "versions",
    "exported_at",
}


@pytest.fixture(scope="module")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> tuple[Path, dict, Path]:
    """One export of the tiny checkpoint (with a Triton repository), shared by the read-only tests."""
    root = tmp_path_factory.mktemp("export")
    meta = export_artifacts(tiny_checkpoint, root / "artifacts", max_batch=MAX_BATCH, triton_repo=root / "triton")
    return root / "artifacts", meta, root / "triton"


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_artifacts_folder_has_the_documented_layout(tiny_export, tiny_checkpoint):
    out, meta, _ = tiny_export
    assert METADATA_KEYS <= set(meta)
    assert json.loads((out / "metadata.json").read_text()) == meta
    assert meta["format"] == "vitae-artifacts/1"
    assert meta["name"] == meta["variant"] == "vitae_fmnist"
    assert meta["version"] == sha256_file(tiny_checkpoint)[:12]
    assert meta["checkpoint"]["sha256"] == sha256_file(tiny_checkpoint)
    assert meta["class_names"][0] == "T-shirt/top" and len(meta["class_names"]) == 10
    assert meta["class_names_source"] == "checkpoint" and meta["wordnet_ids"] is None
    assert meta["grid"] == [4, 4]
    assert meta["preprocessing"]["in_chans"] == 1 and meta["preprocessing"]["img_size"] == 32
    assert meta["inputs"] == [{"name": "images", "dtype": "float32", "shape": [-1, 1, 32, 32]}]
    assert meta["outputs"] == [
        {"name": "logits", "dtype": "float32", "shape": [-1, 10]},
        {"name": "tokens", "dtype": "float32", "shape": [-1, 16, 32]},
    ]
    assert meta["settings"] == {"max_batch": MAX_BATCH, "precision": "fp16", "opset": 20}
    assert meta["files"] == {"onnx": "model.onnx", "weights": "model.safetensors", "head": "head.safetensors"}
    assert set(meta["versions"]) == {"torch", "onnx", "onnxruntime", "openvino", "tensorrt"}
    for name in meta["files"].values():
        assert (out / name).is_file()
    if unavailable_reason() is not None:
        assert meta["tensorrt"] is None and not (out / "model.plan").exists()
    assert not [p for p in out.parent.iterdir() if "staging" in p.name]


def test_onnx_is_self_contained_with_a_dynamic_batch(tiny_export):
    out, _, _ = tiny_export
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not any(init.data_location == TensorProto.EXTERNAL for init in graph.graph.initializer)
    assert sorted(p.name for p in out.iterdir()) == [
        "head.safetensors",
        "metadata.json",
        "model.onnx",
        "model.safetensors",
    ]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.opset_import[0].version == 20


def test_onnx_runtime_matches_pytorch_on_real_images_at_batch_1_and_max(tiny_export, tiny_checkpoint):
    out, meta, _ = tiny_export
    model, _ = load_checkpoint(tiny_checkpoint)
    session = cpu_session(out / "model.onnx")
    images, _ = model_inputs(model.config.preprocessing, MAX_BATCH)
    for batch in (1, MAX_BATCH):
        x = images[:batch]
        logits, tokens = session.run(["logits", "tokens"], {"images": x})
        with torch.inference_mode():
            expected_tokens = model.forward_features(torch.from_numpy(x))
            expected_logits = model.forward_head(expected_tokens)
        assert np.abs(logits - expected_logits.numpy()).max() <= 1e-4
        assert np.abs(tokens - expected_tokens.numpy()).max() <= 1e-4
    diffs = meta["parity"]["max_abs_diff"]
    for figures in (diffs["batch_1"], diffs[f"batch_{MAX_BATCH}"]):
        assert figures["logits"] <= 1e-4 and figures["tokens"] <= 1e-4


def test_parity_failure_reports_every_figure(tiny_export, tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        model.head.bias += 1e-3  # a model that is not the exported one
    images, _ = model_inputs(model.config.preprocessing, 2)
    with pytest.raises(ParityError, match=r"batch_1: logits .*tokens .*batch_2: logits"):
        check_parity(model, tiny_export[0] / "model.onnx", images, (1, 2))


def test_graph_has_no_batchnorm_and_uses_the_gelu_op(tiny_export):
    ops = op_counts(onnx.load(str(tiny_export[0] / "model.onnx")))
    assert ops["BatchNormalization"] == 0
    assert ops["Gelu"] > 0 and ops["Erf"] == 0


def test_each_prm_is_parallel_conv_gelu_into_one_channel_concat_then_the_flatten(tiny_export):
    graph = onnx.load(str(tiny_export[0] / "model.onnx"))
    nodes = {n.name: n for n in graph.graph.node}
    blocks = find_prm_blocks(graph)
    assert [len(b.convs) for b in blocks] == [4, 3, 2]  # the dilations of the three reduction cells
    for block in blocks:
        assert nodes[block.concat].input == [nodes[g].output[0] for g in block.gelus]
        assert nodes[block.flatten].op_type == "Reshape"
        assert list(nodes[block.flatten].input)[0] == nodes[block.concat].output[0]
        assert nodes[block.transpose].input[0] == nodes[block.flatten].output[0]
        assert {nodes[c].input[0] for c in block.convs} == {nodes[block.convs[0]].input[0]}


def test_prm_check_rejects_a_concat_that_is_not_on_channels():
    def conv_gelu(i):
        return [
            helper.make_node("Conv", ["x", f"w{i}"], [f"c{i}"], name=f"conv{i}"),
            helper.make_node("Gelu", [f"c{i}"], [f"g{i}"], name=f"gelu{i}"),
        ]

    nodes = conv_gelu(0) + conv_gelu(1) + [helper.make_node("Concat", ["g0", "g1"], ["y"], name="cat", axis=2)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor(f"w{i}", TensorProto.FLOAT, [1, 1, 1, 1], [1.0]) for i in range(2)],
    )
    with pytest.raises(GraphCheckError, match="axis 2"):
        find_prm_blocks(helper.make_model(graph))


def test_folding_removes_every_batchnorm_and_keeps_the_outputs(tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    folded = fold_batchnorms(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    x = torch.from_numpy(model_inputs(model.config.preprocessing, 3)[0])
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_weights_rebuild_the_model_and_the_head_gives_the_logits(tiny_export):
    out, meta, _ = tiny_export
    model = ViTAE(ViTAEConfig.from_dict(meta["config"])).eval()
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    head = load_file(str(out / "head.safetensors"))
    assert head["weight"].shape == (10, 32) and head["bias"].shape == (10,)
    x = model_inputs(model.config.preprocessing, 2)[0]
    logits, tokens = cpu_session(out / "model.onnx").run(["logits", "tokens"], {"images": x})
    # Grad-CAM without backward relies on this: logits = mean_n(W x_n) + b.
    from_tokens = tokens.mean(axis=1) @ head["weight"].numpy().T + head["bias"].numpy()
    assert np.abs(from_tokens - logits).max() <= 1e-5
    with torch.inference_mode():
        assert np.abs(model(torch.from_numpy(x)).numpy() - logits).max() <= 1e-4


def test_second_export_rebuilds_nothing_and_force_rebuilds(tiny_checkpoint, tmp_path):
    out = tmp_path / "artifacts"
    first = export_artifacts(tiny_checkpoint, out, max_batch=2)
    before = mtimes(out)
    assert artifacts_are_fresh(tiny_checkpoint, out, max_batch=2)
    again = export_artifacts(tiny_checkpoint, out, max_batch=2)
    assert again == first and mtimes(out) == before
    forced = export_artifacts(tiny_checkpoint, out, max_batch=2, force=True)
    assert forced["exported_at"] >= first["exported_at"]
    assert all(mtimes(out)[name] > before[name] for name in before)


def test_changed_settings_or_tampered_files_make_the_artifacts_stale(tiny_export, tiny_checkpoint, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_export[0], out)
    assert artifacts_are_fresh(tiny_checkpoint, out, max_batch=MAX_BATCH)
    assert not artifacts_are_fresh(tiny_checkpoint, out, max_batch=MAX_BATCH + 1)
    assert not artifacts_are_fresh(tiny_checkpoint, out, max_batch=MAX_BATCH, precision="fp32")
    assert not artifacts_are_fresh(tiny_checkpoint, out, max_batch=MAX_BATCH, force=True)
    with open(out / "model.onnx", "ab") as f:
        f.write(b"\0")
    assert not artifacts_are_fresh(tiny_checkpoint, out, max_batch=MAX_BATCH)


def test_corrupted_checkpoint_is_refused_and_nothing_is_written(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        export_artifacts(bad, tmp_path / "out", variant="vitae_t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors"]


def test_mismatched_checkpoint_is_refused_naming_keys_and_old_artifacts_survive(tiny_export, tmp_path):
    out = tmp_path / "artifacts"
    shutil.copytree(tiny_export[0], out)
    before = mtimes(out)
    with pytest.raises(CheckpointError) as err:
        export_artifacts(FIXTURES / "vitae_mini_official.safetensors", out, variant="vitae_t", force=True)
    assert "missing keys" in str(err.value) or "shape mismatches" in str(err.value)
    assert "layers." in str(err.value)  # names the offending state-dict keys
    assert mtimes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]


def test_foreign_weights_without_a_variant_ask_for_one(tmp_path):
    with pytest.raises(ValueError, match="--variant"):
        export_artifacts(FIXTURES / "vitae_mini_official.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_triton_config_agrees_with_the_onnx_model(tiny_export):
    model_config_pb2 = triton_model_config()
    out, meta, repo = tiny_export
    config = text_format.Parse((repo / "vitae" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    graph = onnx.load(str(repo / "vitae" / "1" / "model.onnx")).graph
    assert sha256_file(repo / "vitae" / "1" / "model.onnx") == sha256_file(out / "model.onnx")
    assert config.name == "vitae" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == MAX_BATCH
    assert config.HasField("dynamic_batching") and len(config.instance_group) == 1

    def onnx_io(values):
        return {
            v.name: ([d.dim_value for d in v.type.tensor_type.shape.dim][1:], v.type.tensor_type.elem_type)
            for v in values
        }

    def triton_io(tensors):
        fp32 = {model_config_pb2.TYPE_FP32: TensorProto.FLOAT}
        return {t.name: (list(t.dims), fp32[t.data_type]) for t in tensors}

    assert triton_io(config.input) == onnx_io(graph.input)
    assert triton_io(config.output) == onnx_io(graph.output)


def test_bf16_check_records_its_figures_and_a_verdict_by_the_rule(tiny_export):
    _, meta, _ = tiny_export
    bf16 = meta["cpu_bf16"]
    if not this_cpu_has_native_bf16():
        assert bf16["safe"] is None and "no native bf16" in bf16["reason"]
        return
    test_set = fashion_mnist_test()
    assert bf16["images"] == (10_000 if test_set is not None else STAND_IN_IMAGES)
    assert bf16["fp32_images_per_s"] > 0 and bf16["bf16_images_per_s"] > 0 and bf16["max_logit_diff"] >= 0
    if test_set is not None:  # the tiny model is a Fashion-MNIST classifier: labelled figures too
        assert 0 <= bf16["fp32_top1"] <= 100 and 0 <= bf16["bf16_top1"] <= 100
    assert bf16["safe"] == verdict(bf16["top1_agreement"], bf16["fp32_top1"], bf16["bf16_top1"], True)[0]


def test_bf16_verdict_needs_agreement_and_at_most_0_2_points_of_top1_lost():
    assert verdict(99.9, 92.94, 92.89, True) == (True, verdict(100.0, None, None, True)[1])
    assert verdict(98.9, None, None, True)[0] is False
    safe, why = verdict(99.5, 92.9, 92.6, True)
    assert not safe and "loses 0.30 points" in why
    assert verdict(100.0, None, None, False) == (False, "bf16 produced non-finite logits")


def test_native_bf16_is_needed_to_measure(tiny_export):
    import export.precision

    out, _, _ = tiny_export
    avx2_only = frozenset({"avx", "avx2", "fma"})
    report = export.precision.measure_bf16(
        out / "model.onnx", None, [], speed_batch=np.zeros(0), flags=avx2_only, capabilities=frozenset({"FP32"})
    )
    assert report.safe is None and "no native bf16" in report.reason and report.images == 0


def test_plan_check_refuses_artifacts_without_a_matching_plan():
    fits, why = plan_matches_this_machine({"tensorrt": None})
    assert not fits and "no TensorRT plan" in why
    built_elsewhere = {"tensorrt": {"version": "0.0.0", "gpu_name": "nowhere", "compute_capability": "0.0"}}
    fits, why = plan_matches_this_machine(built_elsewhere)
    assert not fits and why


@pytest.mark.skipif(not (SHARED_REFERENCE / "vitae_t_official.safetensors").is_file(), reason="no shared reference")
def test_released_vitae_t_exports_and_matches_the_release(tmp_path):
    meta = export_artifacts(
        SHARED_REFERENCE / "vitae_t_official.safetensors", tmp_path / "out", variant="vitae_t", max_batch=2
    )
    assert meta["name"] == meta["variant"] == "vitae_t"
    assert meta["class_names"][281] == "tabby, tabby cat" and len(meta["class_names"]) == 1000
    assert meta["class_names_source"] == "imagenet-1k" and meta["wordnet_ids"][281] == "n02123045"
    assert meta["grid"] == [14, 14]
    assert max(meta["parity"]["max_abs_diff"]["batch_2"].values()) <= 1e-4
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert [len(b.convs) for b in find_prm_blocks(graph)] == [4, 3, 2]
    reference = load_file(str(SHARED_REFERENCE / "vitae_t_official_io.safetensors"))
    logits = cpu_session(tmp_path / "out" / "model.onnx").run(["logits"], {"images": reference["input"].numpy()})[0]
    assert np.abs(logits - reference["logits"].numpy()).max() <= 2e-4


@pytest.mark.skipif(not DEMO_CHECKPOINT.is_file(), reason=f"the demo checkpoint {DEMO_CHECKPOINT} is not there yet")
def test_demo_checkpoint_exports(tmp_path):
    meta = export_artifacts(DEMO_CHECKPOINT, tmp_path / "out", max_batch=2)
    assert meta["name"] == "vitae_fmnist" and meta["class_names"][9] == "Ankle boot"
    assert max(meta["parity"]["max_abs_diff"]["batch_2"].values()) <= 1e-4


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_cli_exports_then_finds_nothing_to_do(tiny_checkpoint, tmp_path):
    out = tmp_path / "cli"
    done = run_cli(
        "--checkpoint",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--max-batch",
        "2",
        "--triton-repo",
        str(tmp_path / "triton"),
    )
    assert done.returncode == 0, done.stderr
    assert "vitae_fmnist" in done.stdout and (out / "model.onnx").is_file()
    assert "parity ONNX Runtime vs PyTorch" in done.stderr and "done in" in done.stderr
    assert (tmp_path / "triton" / "vitae" / "config.pbtxt").is_file()
    again = run_cli("--checkpoint", str(tiny_checkpoint), "--out", str(out), "--max-batch", "2")
    assert again.returncode == 0 and "nothing rebuilt" in again.stderr


def test_cli_fails_with_a_message_on_a_corrupted_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(64))
    done = run_cli("--checkpoint", str(bad), "--variant", "vitae_t", "--out", str(tmp_path / "out"))
    assert done.returncode != 0
    assert "export failed" in done.stderr and "bad.safetensors" in done.stderr
    assert not (tmp_path / "out").exists()


def test_compare_logits_counts_agreement_and_each_top1():
    reference = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [1.0, 2.0]])  # argmax 0, 1, 0, 1
    candidate = np.array([[2.0, 1.0], [4.0, 3.0], [5.0, 1.0], [0.0, 2.0]])  # argmax 0, 0, 0, 1
    labels = np.array([0, 1, 1, 1])
    assert compare_logits(reference, candidate, labels) == (75.0, 75.0, 50.0)
    assert compare_logits(reference, candidate, None) == (75.0, None, None)
