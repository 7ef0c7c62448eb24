"""Train a ViTAE: `python -m model.train --variant vitae_fmnist --data fashion-mnist --out runs/demo`.

One process on CPU or GPU, or many under `torchrun --nproc_per_node N -m model.train ...`
(DistributedDataParallel; nccl on GPU, gloo on CPU; only rank 0 writes checkpoints and logs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from .checkpoint import checkpoint_metadata, save_checkpoint
from .config import VARIANTS, ViTAEConfig
from .data import build_datasets, collate_skipping_none
from .evaluate import evaluation_counts, metrics_from_counts
from .vitae import ViTAE
from .weights import CheckpointError, check_state_dict, read_state_dict

log = logging.getLogger("model.train")
STATE_FILE = "last_state.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m model.train", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    _model_and_data_arguments(p)
    _recipe_arguments(p)
    _run_arguments(p)
    return p.parse_args(argv)


def _model_and_data_arguments(p: argparse.ArgumentParser) -> None:
    """The variant, the data and where the run writes."""
    p.add_argument("--variant", default="vitae_fmnist", choices=sorted(VARIANTS))
    p.add_argument("--overrides", default="{}", help="JSON object of ViTAEConfig fields to change")
    p.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or an ImageFolder root (train/, val/)")
    p.add_argument("--data-dir", default=None, help="where the Fashion-MNIST IDX files are (default: Debian's)")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--val-subset", type=int, default=None, help="use only the first N validation images")
    p.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="validate on the last N training images instead of the test/val split (which is then left untouched)",
    )
    p.add_argument("--out", required=True, help="folder for checkpoints and the JSON-lines log")


def _recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The schedule, the optimiser and the regularisation."""
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate for the whole (global) batch")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument(
        "--cooldown-epochs",
        type=float,
        default=0.0,
        help="0: cosine decay over the whole run after warmup; N > 0: constant peak rate, then cosine decay "
        "over the last N epochs (the rate before the cooldown does not depend on --epochs)",
    )
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument(
        "--erase-p", type=float, default=0.25, help="random-erasing probability (Fashion-MNIST augmentation)"
    )
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0 disables)")
    p.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="keep an exponential moving average of the weights with this decay per step (0 disables); "
        "best.* holds whichever of the model and its average validates better",
    )
    p.add_argument(
        "--amp",
        choices=["auto", "bf16", "fp16", "none"],
        default="auto",
        help="autocast on CUDA; auto = bf16 where supported, else fp16. CPU always runs fp32",
    )


def _run_arguments(p: argparse.ArgumentParser) -> None:
    """Where to start and stop, and what the processes run on."""
    p.add_argument("--init", default=None, help="weights to start from (any file model.load_weights accepts)")
    p.add_argument("--resume", action="store_true", help="continue exactly from <out>/last_state.pt")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many epochs of the schedule (the run can be continued with --resume)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: torch's)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs only)")


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and the class token: the usual ViT recipe."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("cls_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float, cooldown_steps: int = 0):
    """Learning-rate multiplier per optimizer step: linear warmup to 1, then cosine down to `min_ratio`.

    The cosine spans everything after warmup, or with `cooldown_steps` only the last steps, the rate
    staying at its peak until then (warmup-stable-decay): a run's length can then be fixed late, as
    the rate up to the cooldown is the same for any total.
    """
    decay_start = total_steps - cooldown_steps if cooldown_steps else warmup_steps

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def init_from(model: ViTAE, path: str) -> None:
    """Fine-tuning start: load everything, replacing the head when the class count differs."""
    state = read_state_dict(path)
    head_w = state.get("head.weight")
    if head_w is not None and head_w.shape[0] != model.num_classes:
        log.info(
            "--init: checkpoint has %d classes, model %d: the head is re-initialised",
            head_w.shape[0],
            model.num_classes,
        )
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    check_state_dict(model, state)
    model.load_state_dict(state)


def state_checksum(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def ranks_in_sync(model: torch.nn.Module, world: int) -> bool:
    """True when every rank holds bit-identical weights (compared by checksum)."""
    if world == 1:
        return True
    digests: list[str | None] = [None] * world
    dist.all_gather_object(digests, state_checksum(model))
    return len(set(digests)) == 1


def average_buffers(model: torch.nn.Module, world: int) -> None:
    """Average BatchNorm running statistics over ranks.

    DDP broadcasts buffers before each forward, but every rank then updates them with its own batch,
    so after the last step they differ; the average is the statistic of the whole global batch.
    """
    if world == 1:
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world


def build_ema(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics, or None when decay is 0."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1) (0 disables the average), got {decay}")
    if decay == 0.0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def amp_for(device: torch.device, amp: str) -> tuple[AbstractContextManager, torch.amp.GradScaler]:
    """Autocast and its gradient scaler, both doing nothing on CPU or with `--amp none`.

    The scaler only acts for fp16; bf16 and fp32 keep the exponent range that makes scaling pointless.
    """
    if device.type != "cuda" or amp == "none":
        return nullcontext(), torch.amp.GradScaler("cuda", enabled=False)
    dtype = torch.float16 if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


@dataclass(frozen=True)
class Process:
    """Where this process sits in the run."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 validates, logs and writes every file."""
        return self.rank == 0


@dataclass
class Training:
    """Everything one run trains with, built once by `build_training`.

    `net` is `model` itself, or `model` wrapped in DistributedDataParallel when there are several ranks;
    forward passes go through `net`, everything else (clipping, averaging, saving) uses `model`.
    """

    model: ViTAE
    net: torch.nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    autocast: AbstractContextManager
    scaler: torch.amp.GradScaler
    sampler: DistributedSampler
    loader: DataLoader
    train_ds: Dataset
    val_ds: Dataset
    class_names: list[str]


def start_process(args: argparse.Namespace) -> Process:
    """Join the process group (under torchrun), set up logging, threads and seeds, make the output folder."""
    process = Process(*setup_distributed(args.device))
    logging.basicConfig(
        level=logging.INFO if process.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    if process.is_main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    return process


def build_data(args: argparse.Namespace) -> tuple[ViTAEConfig, Dataset, Dataset, list[str]]:
    """(model config, train set, validation set, class names); the class count comes from the data."""
    overrides = json.loads(args.overrides)
    base = VARIANTS[args.variant]
    overrides.setdefault("drop_path_rate", args.drop_path)
    prep_base = base.replace(**{k: v for k, v in overrides.items() if k != "num_classes"})
    train_ds, val_ds, class_names = build_datasets(
        args.data,
        prep_base.preprocessing,
        data_dir=args.data_dir,
        seed=args.seed,
        train_subset=args.train_subset,
        val_subset=args.val_subset,
        holdout=args.holdout,
        erase_p=args.erase_p,
    )
    overrides["num_classes"] = len(class_names)
    return base.replace(**overrides), train_ds, val_ds, class_names


def build_model(
    args: argparse.Namespace, config: ViTAEConfig, process: Process
) -> tuple[ViTAE, torch.nn.Module, AveragedModel | None]:
    """(model, the model as trained: DDP-wrapped on several ranks, its weight average or None)."""
    model = ViTAE(config)
    if args.init:
        init_from(model, args.init)
    model.to(process.device)
    net = model
    if process.world > 1:
        device_ids = [process.device.index] if process.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
    # Built after --init and .to(device): the average starts from the weights training starts from.
    ema = build_ema(model, args.ema_decay)
    if process.world > 1:
        # Same initial weights everywhere (seeded above, broadcast by DDP); different drop-path masks per rank.
        torch.manual_seed(args.seed + process.rank)
    return model, net, ema


def build_loader(
    args: argparse.Namespace, train_ds: Dataset, process: Process
) -> tuple[DistributedSampler, DataLoader]:
    """This rank's share of the training set, reshuffled each epoch; fails when there is not one full batch."""
    sampler = DistributedSampler(
        train_ds, num_replicas=process.world, rank=process.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(
        train_ds,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=collate_skipping_none,
        drop_last=True,
        pin_memory=process.device.type == "cuda",
    )
    if len(loader) == 0:
        raise ValueError(
            f"{len(train_ds)} training images are fewer than one batch of {args.batch_size * process.world}"
        )
    return sampler, loader


def build_optimizer(
    args: argparse.Namespace, model: torch.nn.Module, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its per-step schedule: warmup, then cosine decay (over the whole run or the cooldown)."""
    if not 0 <= args.cooldown_epochs <= args.epochs - args.warmup_epochs:
        raise ValueError(
            f"--cooldown-epochs must be between 0 and --epochs minus --warmup-epochs "
            f"({args.epochs - args.warmup_epochs:g}), got {args.cooldown_epochs:g}"
        )
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    schedule = lr_lambda(
        round(args.warmup_epochs * steps_per_epoch),
        args.epochs * steps_per_epoch,
        args.min_lr / args.lr,
        round(args.cooldown_epochs * steps_per_epoch),
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def build_training(args: argparse.Namespace, process: Process) -> Training:
    """Data, model, optimizer and precision, in the order that fixes what the seeded generators give each."""
    config, train_ds, val_ds, class_names = build_data(args)
    model, net, ema = build_model(args, config, process)
    sampler, loader = build_loader(args, train_ds, process)
    optimizer, scheduler = build_optimizer(args, model, len(loader))
    autocast, scaler = amp_for(process.device, args.amp)
    return Training(
        model, net, ema, optimizer, scheduler, autocast, scaler, sampler, loader, train_ds, val_ds, class_names
    )


@dataclass
class ResumeState:
    """What `<out>/last_state.pt` holds: everything `--resume` needs to continue bit for bit.

    Saved as a plain dict whose keys are these fields, so `save_state` and `load_state` cannot disagree.
    """

    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None  # empty or None when no fp16 scaling ran
    ema: dict[str, Any] | None
    epoch: int  # epochs done
    best: dict[str, Any]
    rng: list[dict[str, Any]]  # one per rank (a single-process file may hold one dict)


def save_state(path: Path, t: Training, process: Process, epoch: int, best: dict[str, Any]) -> None:
    """Write the resume state after `epoch` epochs. Every rank must call it: their random states are gathered."""
    rngs: list[Any] = [None] * process.world
    if process.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if process.is_main:
        state = ResumeState(
            model=t.model.state_dict(),
            optimizer=t.optimizer.state_dict(),
            scheduler=t.scheduler.state_dict(),
            scaler=t.scaler.state_dict(),
            ema=t.ema.state_dict() if t.ema is not None else None,
            epoch=epoch,
            best=best,
            rng=rngs,
        )
        tmp = path.with_suffix(".tmp")
        torch.save({f.name: getattr(state, f.name) for f in fields(state)}, tmp)
        tmp.replace(path)  # atomic: a run killed mid-write keeps the previous state
    if process.world > 1:
        dist.barrier()


def load_state(path: Path, t: Training, process: Process) -> tuple[int, dict[str, Any]]:
    """Restore what `save_state` wrote into `t` and this rank's generators; returns (epochs done, best so far)."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found")
    state = ResumeState(**torch.load(path, map_location="cpu", weights_only=False))
    t.model.load_state_dict(state.model)
    t.optimizer.load_state_dict(state.optimizer)
    t.scheduler.load_state_dict(state.scheduler)
    if state.scaler:
        t.scaler.load_state_dict(state.scaler)
    if t.ema is not None:
        if state.ema is None:
            raise ValueError(f"--resume: {path} holds no weight average; it was written without --ema-decay")
        t.ema.load_state_dict(state.ema)
    set_rng_state(state.rng[process.rank] if isinstance(state.rng, list) else state.rng)
    return state.epoch, state.best


@dataclass
class EpochStats:
    """Running training figures of one epoch on this rank."""

    seen: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    time_s: float = 0.0


def train_one_epoch(args: argparse.Namespace, t: Training, process: Process, epoch: int) -> EpochStats:
    """One pass over this rank's share of the training set: one optimizer step per batch."""
    t.sampler.set_epoch(epoch)
    t.train_ds.set_epoch(epoch)
    t.net.train()
    stats, t0 = EpochStats(), time.time()
    bar = tqdm(
        t.loader,
        desc=f"epoch {epoch + 1}/{args.epochs}",
        disable=not process.is_main or args.no_progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    for batch in bar:
        if batch is None:  # every image of the batch was unreadable
            continue
        x, y = (v.to(process.device, non_blocking=True) for v in batch)  # (B, C, H, W), (B,)
        # forward, in reduced precision where --amp allows
        with t.autocast:
            logits = t.net(x)  # (B, num_classes)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
        # backward; the scaler multiplies the loss for fp16 only
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        # clip the true (unscaled) gradients
        t.scaler.unscale_(t.optimizer)
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(t.model.parameters(), args.clip_grad)
        # step the weights, the learning rate and the weight average
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.scheduler.step()
        if t.ema is not None:
            t.ema.update_parameters(t.model)
        # running figures for the bar and the log
        stats.seen += len(y)
        stats.loss_sum += loss.item() * len(y)
        stats.correct += (logits.argmax(1) == y).sum().item()
        bar.set_postfix(
            loss=f"{stats.loss_sum / stats.seen:.4f}",
            acc=f"{stats.correct / stats.seen:.4f}",
            img_s=f"{stats.seen * process.world / (time.time() - t0):.0f}",
        )
    stats.time_s = time.time() - t0
    return stats


def validate(
    args: argparse.Namespace, t: Training, process: Process
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(model metrics, weight-average metrics or None) on rank 0; (None, None) on the other ranks.

    Each rank evaluates every world-th validation image and the sums are all-reduced, so validation takes
    1/world of the time it takes on one rank. The models must be identical on all ranks: the weights are (DDP),
    the BatchNorm statistics are averaged before this, and the weight average's statistics (rank-local
    updates) are made rank 0's here, which is the average that gets saved.
    """
    shard = t.val_ds
    if process.world > 1:
        shard = Subset(t.val_ds, range(process.rank, len(t.val_ds), process.world))
        if t.ema is not None:
            for buffer in t.ema.module.buffers():
                dist.broadcast(buffer, src=0)

    def evaluate_on(module: torch.nn.Module) -> dict[str, Any] | None:
        counts = evaluation_counts(
            module,
            shard,
            len(t.class_names),
            device=process.device,
            batch_size=256,
            progress=process.is_main and not args.no_progress,
        )
        if process.world > 1:
            counts = counts.to(process.device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        return metrics_from_counts(counts, t.class_names) if process.is_main else None

    metrics = evaluate_on(t.model)
    ema_metrics = evaluate_on(t.ema.module) if t.ema is not None else None
    return metrics, ema_metrics


def epoch_record(
    epoch: int,
    stats: EpochStats,
    metrics: dict[str, Any],
    ema_metrics: dict[str, Any] | None,
    t: Training,
    process: Process,
    synced: bool,
) -> dict[str, Any]:
    """One line of log.jsonl."""
    record = {
        "epoch": epoch + 1,
        "train_loss": stats.loss_sum / max(stats.seen, 1),
        "train_acc": stats.correct / max(stats.seen, 1),
        "val_top1": metrics["top1"],
        "val_top5": metrics["top5"],
        "val_loss": metrics["loss"],
        "lr": t.scheduler.get_last_lr()[0],
        "epoch_time_s": round(stats.time_s, 2),
        "images_per_s": round(stats.seen * process.world / stats.time_s, 1),
        "world_size": process.world,
        "ranks_in_sync": synced,
    }
    if ema_metrics is not None:
        record.update(
            ema_val_top1=ema_metrics["top1"], ema_val_top5=ema_metrics["top5"], ema_val_loss=ema_metrics["loss"]
        )
    return record


def save_checkpoints(
    args: argparse.Namespace,
    t: Training,
    epoch: int,
    metrics: dict[str, Any],
    ema_metrics: dict[str, Any] | None,
    best: dict[str, Any],
) -> dict[str, Any]:
    """Write last.* (and last_ema.*), and best.* when the model or its average beats `best`; returns the new best.

    The plain model and (with --ema-decay) its average compete for best.* on the validation split.
    """
    out = Path(args.out)
    candidates = [("model", t.model, metrics)]
    if t.ema is not None:
        candidates.append(("ema", t.ema.module, ema_metrics))
    for weights, module, m in candidates:
        meta = checkpoint_metadata(
            module,
            variant=args.variant,
            class_names=t.class_names,
            train_args=dict(vars(args)),
            epoch=epoch + 1,
            metrics={
                "top1": m["top1"],
                "top5": m["top5"],
                "val_loss": m["loss"],
                "val_images": m["n"],
                "holdout": args.holdout,
                "weights": weights,
            },
        )
        save_checkpoint(module, out / ("last" if weights == "model" else "last_ema"), meta)
        if m["top1"] > best["top1"]:
            best = {"top1": m["top1"], "epoch": epoch + 1, "weights": weights}
            save_checkpoint(module, out / "best", meta)
    return best


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or with --resume continue) a training run; returns a summary of it."""
    process = start_process(args)
    t = build_training(args, process)
    out = Path(args.out)
    state_path = out / STATE_FILE
    start_epoch, best = 0, {"top1": -1.0}
    if args.resume:
        start_epoch, best = load_state(state_path, t, process)
        log.info("resumed from %s at epoch %d", state_path, start_epoch)
    stop = min(args.epochs, args.stop_after) if args.stop_after else args.epochs
    t_run, record = time.time(), {}
    for epoch in range(start_epoch, stop):
        # train on this rank's share of the data
        stats = train_one_epoch(args, t, process, epoch)
        # BatchNorm statistics of the global batch, then validation shared by the ranks
        average_buffers(t.model, process.world)
        metrics, ema_metrics = validate(args, t, process)
        if process.world > 1:
            dist.barrier()
        synced = ranks_in_sync(t.model, process.world)
        # log the epoch and write the checkpoints (rank 0)
        if process.is_main:
            record = epoch_record(epoch, stats, metrics, ema_metrics, t, process, synced)
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("epoch %d: %s", epoch + 1, json.dumps(record))
            best = save_checkpoints(args, t, epoch, metrics, ema_metrics, best)
        # the exact state to continue from
        save_state(state_path, t, process, epoch + 1, best)
    summary = {
        "epochs_run": stop - start_epoch,
        "best_top1": best.get("top1"),
        "best_epoch": best.get("epoch"),
        "best_weights": best.get("weights"),
        "last": record,
        "wall_time_s": round(time.time() - t_run, 1),
        "out": str(out),
    }
    if process.is_main:
        print(
            f"done: {stop} epochs, best top-1 {best.get('top1', 0):.4f} at epoch {best.get('epoch')} "
            f"({best.get('weights')} weights), {summary['wall_time_s']:.0f} s, checkpoints in {out}",
            flush=True,
        )
    if process.world > 1:
        dist.destroy_process_group()
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv))
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
