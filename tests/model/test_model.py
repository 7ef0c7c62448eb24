"""The model package is the released ViTAE: same keys, same parameter counts, same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support.checkpoints import FIXTURES, SHARED_REFERENCE, tiny_model

from model import (
    CheckpointError,
    ViTAE,
    ViTAEConfig,
    checkpoint_filter_fn,
    config_from_official,
    create_model,
    get_variant,
    load_weights,
)
from model.checkpoint import checkpoint_metadata, load_checkpoint, save_checkpoint

RELEASED = ["vitae_t", "vitae_6m", "vitae_13m", "vitae_s"]
STATE_DICT_ENTRIES = {"vitae_t": 4_897_912, "vitae_6m": 6_629_758, "vitae_13m": 10_856_128, "vitae_s": 24_075_430}


def mini_official():
    path = FIXTURES / "vitae_mini_official.safetensors"
    with safe_open(str(path), "pt") as f:
        kwargs = json.loads(f.metadata()["config"])
    return path, kwargs


@pytest.mark.parametrize("name", RELEASED)
def test_state_dict_entry_count_matches_release(name):
    state = create_model(name).state_dict()
    assert sum(v.numel() for v in state.values()) == STATE_DICT_ENTRIES[name]


@pytest.mark.parametrize("name", RELEASED)
def test_state_dict_keys_shapes_and_order_match_release_manifest(name):
    # Copied from ../shared/reference: the release's own state_dict listing.
    manifest = FIXTURES / f"{name}_keys.tsv"
    rows = [line.split("\t") for line in manifest.read_text().strip().splitlines()[1:]]
    state = create_model(name).state_dict()
    assert list(state) == [key for key, _, _ in rows]
    for key, shape, dtype in rows:
        assert ("x".join(map(str, state[key].shape)) or "scalar") == shape, key
        assert str(state[key].dtype).removeprefix("torch.") == dtype, key


def test_mini_release_weights_give_release_logits():
    path, kwargs = mini_official()
    model = ViTAE(config_from_official(kwargs)).eval()
    load_weights(model, path)
    io = load_file(str(FIXTURES / "vitae_mini_official_io.safetensors"))
    with torch.no_grad():
        logits = model(io["input"])
    assert (logits - io["logits"]).abs().max().item() <= 1e-4


@pytest.mark.skipif(
    not (SHARED_REFERENCE / "vitae_t_official.safetensors").is_file(),
    reason="the vitae_t reference weights live in ../shared/reference, absent on this machine",
)
def test_vitae_t_release_weights_give_release_logits():
    model = create_model("vitae_t").eval()
    load_weights(model, SHARED_REFERENCE / "vitae_t_official.safetensors")
    io = load_file(str(SHARED_REFERENCE / "vitae_t_official_io.safetensors"))
    with torch.no_grad():
        logits = model(io["input"])
    assert (logits - io["logits"]).abs().max().item() <= 1e-4


def test_config_from_official_maps_release_arguments():
    _, kwargs = mini_official()
    cfg = config_from_official(kwargs)
    assert cfg.embed_dims == (16, 16, 32) and cfg.token_dims == (16, 16, 64)
    assert cfg.nc_depth == (0, 0, 2) and cfg.nc_groups == (1, 1, 16) and cfg.num_classes == 7
    assert cfg.img_size == 64 and cfg.dilations == ((1, 2, 3, 4), (1, 2, 3), (1, 2))
    with pytest.raises(ValueError, match="unsupported constructor arguments"):
        config_from_official({**kwargs, "frobnicate": 1})


def test_released_pth_tar_with_module_prefix_loads(tmp_path):
    path, kwargs = mini_official()
    state = load_file(str(path))
    wrapped = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 300}
    torch.save(wrapped, tmp_path / "checkpoint.pth.tar")
    model = ViTAE(config_from_official(kwargs)).eval()
    load_weights(model, tmp_path / "checkpoint.pth.tar")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_checkpoint_filter_fn_unwraps_and_strips_prefixes():
    w = torch.zeros(2)
    assert list(checkpoint_filter_fn({"model": {"module.a.b": w}})) == ["a.b"]
    assert list(checkpoint_filter_fn({"state_dict_ema": {"c": w}, "state_dict": {"d": w}})) == ["c"]
    assert list(checkpoint_filter_fn({"e": w})) == ["e"]
    with pytest.raises(CheckpointError):
        checkpoint_filter_fn({"epoch": 3})


def test_missing_key_is_named_and_nothing_is_loaded(tmp_path):
    path, kwargs = mini_official()
    state = load_file(str(path))
    del state["layers.2.NC.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "partial.pth")
    model = ViTAE(config_from_official(kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing keys: layers\.2\.NC\.1\.mlp\.fc2\.bias"):
        load_weights(model, tmp_path / "partial.pth")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shape_mismatch_is_named(tmp_path):
    path, kwargs = mini_official()
    state = load_file(str(path))
    state["head.weight"] = torch.zeros(9, 64)
    torch.save(state, tmp_path / "wrong.pth")
    model = ViTAE(config_from_official(kwargs))
    with pytest.raises(CheckpointError, match=r"head\.weight: checkpoint \(9, 64\) vs model \(7, 64\)"):
        load_weights(model, tmp_path / "wrong.pth")


def test_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_weights(tiny_model(), bad)


def test_project_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    meta = checkpoint_metadata(model, variant="vitae_fmnist", class_names=[str(i) for i in range(10)])
    path = save_checkpoint(model, tmp_path / "ckpt", meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded.config == model.config
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # The bare weights file carries the metadata too.
    path.with_suffix(".json").unlink()
    assert load_checkpoint(path)[1]["class_names"] == meta["class_names"]


def test_cls_pooling_forward_and_training_step_moves_the_class_token():
    torch.manual_seed(0)
    model = create_model(
        "vitae_fmnist",
        num_classes=10,
        img_size=32,
        in_chans=1,
        pooling="cls",
        embed_dims=(8, 8, 16),
        token_dims=(8, 16, 32),
        nc_depth=(0, 0, 2),
        nc_heads=(1, 1, 2),
        nc_groups=(1, 1, 8),
    )
    x = torch.randn(4, 1, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (4, 1 + 16, 32)
    assert model.forward_head(tokens).shape == (4, 10)
    before = model.cls_token.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(4))
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.cls_token.detach())
    assert "cls_token" in model.state_dict() and "norm.weight" in model.state_dict()


def test_each_image_gives_the_same_logits_alone_and_in_a_batch():
    model = tiny_model()
    x = torch.randn(6, 1, 32, 32)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(6)])
    assert (batched - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shape", [(1, 1, 30, 30), (1, 1, 32, 48), (1, 3, 32, 32), (32, 32)])
def test_wrong_input_size_names_accepted_sizes(shape):
    with pytest.raises(ValueError, match=r"S a positive multiple of 8"):
        tiny_model()(torch.randn(shape))


def test_other_sizes_divisible_by_the_reduction_work():
    with torch.no_grad():
        assert tiny_model()(torch.randn(1, 1, 48, 48)).shape == (1, 10)


def test_unknown_variant_lists_known_ones():
    with pytest.raises(ValueError, match="known variants: vitae_t"):
        get_variant("vitae_xxl")


def test_config_rejects_inconsistent_values():
    base = get_variant("vitae_t")
    with pytest.raises(ValueError, match="img_size 100 must be divisible by the total reduction 16"):
        base.replace(img_size=100)
    with pytest.raises(ValueError, match="pooling"):
        base.replace(pooling="max")
    assert ViTAEConfig.from_dict(base.to_dict()) == base


def test_onnx_export_smoke_with_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = tiny_model()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model,
        (torch.randn(2, 1, 32, 32),),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 1, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {"images": x.numpy()})
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() <= 1e-4
