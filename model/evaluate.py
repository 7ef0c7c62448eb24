"""Evaluate a checkpoint: `python -m model.evaluate --checkpoint PATH --data fashion-mnist [--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .config import Preprocessing
from .data import build_datasets, collate_skipping_none
from .weights import CheckpointError


@torch.no_grad()
def evaluation_counts(
    model: torch.nn.Module,
    dataset: Dataset,
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """Sums over `dataset`, as one float64 vector that ranks can all-reduce and `metrics_from_counts` reads:
    [images, top-1 hits, top-5 hits, summed loss, images per class (K), top-1 hits per class (K)]."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_skipping_none)
    k = num_classes
    counts = torch.zeros(4 + 2 * k, dtype=torch.float64)
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False, file=sys.stderr):
        if batch is None:
            continue
        x, y = batch
        logits = model(x.to(device)).float().cpu()  # (B, K)
        top = logits.topk(min(5, k), dim=1).indices  # (B, 5)
        hit1 = top[:, 0] == y  # (B,)
        counts[0] += len(y)
        counts[1] += hit1.sum().item()
        counts[2] += (top == y[:, None]).any(1).sum().item()
        counts[3] += F.cross_entropy(logits, y, reduction="sum").item()
        counts[4 : 4 + k] += torch.bincount(y, minlength=k)
        counts[4 + k :] += torch.bincount(y[hit1], minlength=k)
    model.train(was_training)
    return counts


def metrics_from_counts(counts: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Top-1, top-5, mean loss and per-class accuracy from `evaluation_counts` (summed over shards, if any)."""
    k = len(class_names)
    n, top1, top5, loss = (counts[i].item() for i in range(4))
    per_class_total, per_class_correct = counts[4 : 4 + k], counts[4 + k :]
    per_class = {
        name: (per_class_correct[i] / per_class_total[i]).item() if per_class_total[i] else None
        for i, name in enumerate(class_names)
    }
    return {
        "top1": top1 / max(n, 1),
        "top5": top5 / max(n, 1),
        "loss": loss / max(n, 1),
        "n": int(n),
        "per_class": per_class,
    }


def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    class_names: list[str],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1, top-5, mean loss and per-class accuracy of `model` on an evaluation dataset."""
    counts = evaluation_counts(
        model, dataset, len(class_names), device=device, batch_size=batch_size, progress=progress
    )
    return metrics_from_counts(counts, class_names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of this project (.safetensors)")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or an ImageFolder root with val/")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    try:
        model, meta = load_checkpoint(args.checkpoint, device=args.device)
        prep = Preprocessing.from_dict(meta["preprocessing"])
        _, val_ds, class_names = build_datasets(
            args.data, prep, data_dir=args.data_dir, val_subset=args.limit, train=False
        )
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if class_names != meta["class_names"]:
        print(
            f"error: the data's classes {class_names} differ from the checkpoint's {meta['class_names']}",
            file=sys.stderr,
        )
        return 2
    result = evaluate(
        model, val_ds, class_names, device=args.device, batch_size=args.batch_size, progress=not args.json
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"checkpoint {args.checkpoint} on {args.data}: {result['n']} images")
    print(f"top-1 {result['top1'] * 100:.2f}%   top-5 {result['top5'] * 100:.2f}%   loss {result['loss']:.4f}")
    width = max(len(c) for c in class_names)
    for name, acc in result["per_class"].items():
        print(f"  {name:<{width}}  {'n/a' if acc is None else f'{acc * 100:.2f}%'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
