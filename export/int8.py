"""CPU int8: an ONNX Runtime dynamically quantized model, kept only when it is faster and as accurate."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.config import Preprocessing
from model.preprocess import preprocess

from .artifacts import INPUT_NAME, LOGITS
from .inputs import fashion_mnist_test
from .parity import cpu_session

log = logging.getLogger(__name__)

MAX_TOP1_LOSS = 0.5  # points of top-1 accuracy
EVAL_BATCH = 256  # accuracy only; the batch dimension is dynamic, so it need not be the serving batch


@dataclass
class Int8Report:
    kept: bool
    reason: str
    fp32_images_per_s: float
    int8_images_per_s: float
    fp32_top1: float | None
    int8_top1: float | None
    eval_images: int


def quantize(fp32_path: Path, int8_path: Path) -> None:
    """Dynamic int8 quantization of the MatMul/Gemm weights (per channel); convolutions stay fp32.

    Dynamic quantization needs no calibration set and keeps activations in float, which the Performer's
    exp features need; ConvInteger on CPU is slower than fp32 Conv in ONNX Runtime, so convs are left out.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs a line per tensor on the root logger at INFO; keep the export's log readable.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        quantize_dynamic(
            str(fp32_path),
            str(int8_path),
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    finally:
        root.setLevel(level)


def images_per_second(paths: tuple[Path, ...], batch: np.ndarray, repeats: int = 15) -> list[float]:
    """Median throughput of each model on this CPU (ONNX Runtime's default threads), same batch.

    The runs alternate between the models, so a change in background load hits them alike.
    """
    sessions = [cpu_session(path) for path in paths]
    times: list[list[float]] = [[] for _ in paths]
    for session in sessions:
        session.run(None, {INPUT_NAME: batch})  # warm-up
    for _ in range(repeats):
        for session, spent in zip(sessions, times, strict=True):
            start = time.perf_counter()
            session.run(None, {INPUT_NAME: batch})
            spent.append(time.perf_counter() - start)
    return [len(batch) / float(np.median(spent)) for spent in times]


def top1(path: Path, images: np.ndarray, labels: np.ndarray, batch: int = EVAL_BATCH) -> float:
    session = cpu_session(path)
    correct = 0
    for start in range(0, len(images), batch):
        logits = session.run([LOGITS], {INPUT_NAME: images[start : start + batch]})[0]
        correct += int((logits.argmax(axis=1) == labels[start : start + batch]).sum())
    return 100.0 * correct / len(images)


def fashion_mnist_inputs(prep: Preprocessing, limit: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The Fashion-MNIST test set through the model's preprocessing, or None where the set is absent."""
    test = fashion_mnist_test()
    if test is None:
        return None
    pixels, labels = test
    if limit is not None:
        pixels, labels = pixels[:limit], labels[:limit]
    images = np.stack([preprocess(Image.fromarray(p, "L"), prep) for p in pixels])
    return images, labels.astype(np.int64)


def evaluate_int8(
    fp32_path: Path, int8_path: Path, prep: Preprocessing, *, num_classes: int, speed_batch: np.ndarray
) -> Int8Report:
    """Compare the two models on speed (same batch, same session options) and on Fashion-MNIST top-1."""
    fp32_speed, int8_speed = images_per_second((fp32_path, int8_path), speed_batch)
    test = fashion_mnist_inputs(prep) if num_classes == 10 else None
    fp32_acc = int8_acc = None
    if test is None:
        kept, reason = False, "no Fashion-MNIST test set for this model, so the accuracy loss cannot be checked"
    else:
        fp32_acc = top1(fp32_path, *test)
        int8_acc = top1(int8_path, *test)
        if int8_speed <= fp32_speed:
            kept, reason = False, "int8 is not faster than fp32 on this CPU"
        elif fp32_acc - int8_acc > MAX_TOP1_LOSS:
            kept, reason = False, f"int8 loses more than {MAX_TOP1_LOSS} points of top-1"
        else:
            kept, reason = True, "faster than fp32 and within the accuracy budget"
    return Int8Report(
        kept=kept,
        reason=reason,
        fp32_images_per_s=round(fp32_speed, 1),
        int8_images_per_s=round(int8_speed, 1),
        fp32_top1=None if fp32_acc is None else round(fp32_acc, 2),
        int8_top1=None if int8_acc is None else round(int8_acc, 2),
        eval_images=0 if test is None else len(test[1]),
    )
