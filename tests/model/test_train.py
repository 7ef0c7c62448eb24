"""The trainer really trains: learning, exact resume, DDP ranks in sync, ImageFolder, evaluation."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support.checkpoints import DEMO_CHECKPOINT, ROOT

from model import get_variant
from model.checkpoint import load_checkpoint
from model.data import ArrayImageDataset, ImageFolderDataset, build_datasets, fashion_mnist_dir, read_idx
from model.evaluate import evaluate
from model.preprocess import preprocess
from model.train import lr_lambda

TINY = json.dumps(
    {
        "embed_dims": [8, 8, 16],
        "token_dims": [8, 16, 32],
        "nc_depth": [0, 0, 1],
        "nc_heads": [1, 1, 2],
        "nc_groups": [1, 1, 8],
    }
)
needs_fmnist = pytest.mark.skipif(
    not fashion_mnist_dir().is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)


def run(args: list[str], *, torchrun: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={torchrun}",
            "-m",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_args(out: Path, *extra: str) -> list[str]:
    return [
        "model.train",
        "--out",
        str(out),
        "--overrides",
        TINY,
        "--no-progress",
        "--threads",
        "1",
        "--train-subset",
        "2000",
        "--val-subset",
        "1000",
        "--batch-size",
        "50",
        "--lr",
        "3e-3",
        "--drop-path",
        "0",
        *extra,
    ]


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@needs_fmnist
def test_short_run_on_a_subset_learns(tmp_path):
    run(train_args(tmp_path, "--epochs", "10"))
    records = log_records(tmp_path)
    assert len(records) == 10
    assert records[-1]["val_top1"] >= 0.60, records[-1]
    meta = json.loads((tmp_path / "best.json").read_text())
    assert meta["class_names"][0] == "T-shirt/top" and meta["in_chans"] == 1
    assert meta["preprocessing"]["mean"] == [0.286]
    assert {"variant", "config", "train_args", "epoch", "metrics", "git_commit"} <= set(meta)


@needs_fmnist
def test_resume_after_a_stop_reproduces_the_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--epochs", "2", "--train-subset", "500", "--drop-path", "0.1", "--ema-decay", "0.9")
    run(train_args(straight, *common))
    run(train_args(resumed, *common, "--stop-after", "1"))
    assert len(log_records(resumed)) == 1
    run(train_args(resumed, *common, "--resume"))
    for name in ("last", "last_ema"):
        a, b = load_file(str(straight / f"{name}.safetensors")), load_file(str(resumed / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key].numpy(), b[key].numpy()), (name, key)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_small_fashion_mnist(root: Path, n_train: int = 400, n_test: int = 100) -> None:
    """IDX files shaped like Fashion-MNIST: each class a bright square at its own place, on noise."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for image, label in zip(images, labels, strict=True):
            row, col = divmod(int(label), 4)
            image[2 + 8 * row : 8 + 8 * row, 2 + 6 * col : 8 + 6 * col] = 230
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)


def test_augmentation_is_fixed_by_seed_epoch_and_index_and_keeps_the_shape():
    prep = get_variant("vitae_fmnist").preprocessing
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    labels = np.arange(4)
    ds = ArrayImageDataset(images, labels, prep, train=True, seed=3)
    again = ArrayImageDataset(images, labels, prep, train=True, seed=3)
    ds.set_epoch(5)
    again.set_epoch(5)
    first = ds[1][0]
    assert first.shape == (1, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, ds[1][0]) and torch.equal(first, again[1][0])
    others = []
    for epoch in (6, 7, 8):
        ds.set_epoch(epoch)
        others.append(ds[1][0])
    assert not all(torch.equal(first, other) for other in others)
    ds.set_epoch(5)
    assert not torch.equal(ds[1][0], ds[2][0])
    plain = ArrayImageDataset(images, labels, prep, train=False)
    assert torch.equal(plain[1][0], torch.from_numpy(preprocess(Image.fromarray(images[1]), prep)))


def test_holdout_validates_on_the_end_of_the_training_split(tmp_path):
    write_small_fashion_mnist(tmp_path, n_train=400, n_test=100)
    prep = get_variant("vitae_fmnist").preprocessing
    train_ds, val_ds, _ = build_datasets("fashion-mnist", prep, data_dir=str(tmp_path), holdout=150)
    assert len(train_ds) == 250 and len(val_ds) == 150
    train_images = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert torch.equal(val_ds[0][0], torch.from_numpy(preprocess(Image.fromarray(train_images[250]), prep)))
    _, test_ds, _ = build_datasets("fashion-mnist", prep, data_dir=str(tmp_path), train=False)
    assert len(test_ds) == 100
    with pytest.raises(ValueError, match="holdout 400 leaves no training images"):
        build_datasets("fashion-mnist", prep, data_dir=str(tmp_path), holdout=400)


def test_ema_run_ships_the_better_of_model_and_average_as_a_plain_checkpoint(tmp_path):
    write_small_fashion_mnist(tmp_path / "data")
    out = tmp_path / "run"
    run(train_args(out, "--data-dir", str(tmp_path / "data"), "--epochs", "2", "--holdout", "100",
                   "--ema-decay", "0.9"))  # fmt: skip
    records = log_records(out)
    assert len(records) == 2 and {"val_top1", "ema_val_top1"} <= set(records[-1])
    meta = json.loads((out / "best.json").read_text())
    assert meta["metrics"]["holdout"] == 100 and meta["metrics"]["val_images"] == 100
    chosen = "ema_val_top1" if meta["metrics"]["weights"] == "ema" else "val_top1"
    assert meta["metrics"]["top1"] == max(r[key] for r in records for key in ("val_top1", "ema_val_top1"))
    assert meta["metrics"]["top1"] == records[meta["epoch"] - 1][chosen]
    # The average is saved under the model's own keys, so everything that loads a checkpoint loads it.
    model, _ = load_checkpoint(out / "best.safetensors")
    assert set(load_file(str(out / "last_ema.safetensors"))) == set(model.state_dict())


@needs_fmnist
def test_two_process_gloo_run_keeps_the_ranks_identical_and_shares_validation_exactly(tmp_path):
    # 999 validation images: the ranks' shards differ in size and together must cover every image once
    extra = ("--epochs", "1", "--val-subset", "999", "--ema-decay", "0.9")
    run(train_args(tmp_path, *extra), torchrun=2)
    (record,) = log_records(tmp_path)
    assert record["world_size"] == 2
    assert record["ranks_in_sync"] is True
    # The ranks share validation; one process measuring the saved model and average on the same images agrees
    # (the loss to float32 rounding: batches are cut differently).
    for weights, prefix in (("last", "val_"), ("last_ema", "ema_val_")):
        model, _ = load_checkpoint(tmp_path / f"{weights}.safetensors")
        _, val_ds, names = build_datasets("fashion-mnist", model.config.preprocessing, train=False, val_subset=999)
        alone = evaluate(model, val_ds, names, progress=False)
        assert alone["n"] == 999
        assert (record[f"{prefix}top1"], record[f"{prefix}top5"]) == (alone["top1"], alone["top5"]), weights
        assert record[f"{prefix}loss"] == pytest.approx(alone["loss"], rel=1e-6), weights


def write_image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls, value in (("dark", 40), ("light", 210)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(6):
                pixels = np.clip(rng.normal(value, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "train" / "dark" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")


def test_image_folder_skips_a_corrupt_file(tmp_path, caplog):
    write_image_folder(tmp_path)
    prep = get_variant("vitae_fmnist").replace(in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3).preprocessing
    ds = ImageFolderDataset(tmp_path / "train", prep, train=True)
    assert ds.classes == ["dark", "light"] and len(ds) == 13
    items = [ds[i] for i in range(len(ds))]
    assert sum(item is None for item in items) == 1
    assert "corrupt.jpg" in caplog.text
    x, _ = next(item for item in items if item is not None)
    assert tuple(x.shape) == (3, 32, 32)


def train_on_image_folder(tmp_path: Path, *extra: str) -> Path:
    """One epoch of the tiny RGB model on the two-class folder written by write_image_folder."""
    write_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    overrides = json.dumps({**json.loads(TINY), "in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3})
    run(["model.train", "--data", str(tmp_path / "data"), "--out", str(out), "--overrides", overrides,
         "--epochs", "1", "--batch-size", "4", "--no-progress", "--threads", "1", *extra])  # fmt: skip
    return out


def test_training_on_an_image_folder_with_a_corrupt_file_completes(tmp_path):
    out = train_on_image_folder(tmp_path)
    meta = json.loads((out / "best.json").read_text())
    assert meta["class_names"] == ["dark", "light"] and meta["in_chans"] == 3


def test_read_idx_round_trip(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in data.shape) + data.tobytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte"), data)
    (tmp_path / "bad").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "bad")


@needs_fmnist
@pytest.mark.skipif(not DEMO_CHECKPOINT.is_file(), reason="the demo checkpoint is not in this checkout")
def test_evaluate_json_on_the_shipped_model():
    proc = run(
        ["model.evaluate", "--checkpoint", str(DEMO_CHECKPOINT), "--data", "fashion-mnist", "--limit", "2000", "--json"]
    )
    result = json.loads(proc.stdout)
    assert result["n"] == 2000
    assert 0.9 <= result["top1"] <= result["top5"] <= 1.0


def test_fashion_mnist_png_and_array_preprocess_identically():
    # The samples are PNGs of test images; the trainer sees arrays. Both paths must give the same input.
    prep = get_variant("vitae_fmnist").preprocessing
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    from_png = preprocess(Image.open(io.BytesIO(buffer.getvalue())), prep)
    assert np.array_equal(from_png, preprocess(Image.fromarray(pixels), prep))


def test_fine_tuning_from_a_checkpoint_replaces_the_head_for_a_new_class_count(tmp_path, tiny_rgb_checkpoint):
    out = train_on_image_folder(tmp_path, "--init", str(tiny_rgb_checkpoint), "--lr", "1e-9")
    start, tuned = load_file(str(tiny_rgb_checkpoint)), load_file(str(out / "last.safetensors"))
    assert start["head.weight"].shape == (5, 32) and tuned["head.weight"].shape == (2, 32)
    # The body came from the checkpoint (a learning rate of 1e-9 leaves it where it started).
    key = "layers.0.RC.PRM.convs.0.0.weight"
    assert np.allclose(start[key].numpy(), tuned[key].numpy(), atol=1e-6)


def test_cooldown_schedule_holds_the_peak_whatever_the_length_and_ends_at_the_minimum():
    short, long = lr_lambda(10, 100, 0.01, cooldown_steps=30), lr_lambda(10, 200, 0.01, cooldown_steps=30)
    assert [short(s) for s in range(70)] == [long(s) for s in range(70)]
    assert short(5) == 0.6 and short(69) == 1.0
    assert 0.01 < short(85) < 1.0 and short(99) < 0.02 and short(100) == 0.01
    cosine = lr_lambda(10, 100, 0.01)
    assert cosine(10) == 1.0 and cosine(11) < 1.0 and cosine(100) == 0.01


def test_erase_probability_zero_leaves_only_crop_and_flip_and_one_always_erases():
    prep = get_variant("vitae_fmnist").preprocessing
    images = np.full((8, 28, 28), 128, dtype=np.uint8)
    labels = np.arange(8)
    foreground = float(preprocess(Image.fromarray(images[0]), prep)[0, 16, 16])
    for erase_p, erased in ((0.0, False), (1.0, True)):
        ds = ArrayImageDataset(images, labels, prep, train=True, seed=1, erase_p=erase_p)
        values = torch.stack([ds[i][0] for i in range(len(ds))])  # (8, 1, 32, 32)
        known = torch.isclose(values, torch.tensor(foreground)) | torch.isclose(values, torch.tensor(float(ds.fill[0])))
        assert bool((~known).any(dim=(1, 2, 3)).all()) is erased
