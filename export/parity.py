"""ONNX Runtime against PyTorch on real inputs, before anything is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from model import ViTAE

from .artifacts import INPUT_NAME
from .serving import serving_outputs

TOLERANCE_FP32 = 1e-4


class ParityError(RuntimeError):
    """The exported model does not compute what the PyTorch model computes."""


def cpu_session(path: Path | str, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_abs_diffs(model: ViTAE, session: ort.InferenceSession, images: np.ndarray) -> dict[str, float]:
    expected = serving_outputs(model, images)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, {INPUT_NAME: images}), strict=True))
    return {name: float(np.max(np.abs(got[name] - expected[name]))) for name in expected}


def check_parity(
    model: ViTAE, onnx_path: Path, images: np.ndarray, batch_sizes: tuple[int, ...], tolerance: float = TOLERANCE_FP32
) -> dict[str, dict[str, float]]:
    """Max abs differences of both outputs per batch size, `{"batch_1": {"logits": .., "tokens": ..}, ...}`;
    raises ParityError (with every figure) when one is over tolerance.

    `model` is the unfolded PyTorch model, so the check covers the BatchNorm folding as well as the export.
    """
    session = cpu_session(onnx_path)
    figures = {}
    for batch in batch_sizes:
        chunk = np.resize(images, (batch, *images.shape[1:])) if batch > len(images) else images[:batch]
        figures[f"batch_{batch}"] = max_abs_diffs(model, session, np.ascontiguousarray(chunk))
    worst = max(v for diffs in figures.values() for v in diffs.values())
    if not worst <= tolerance:  # also catches NaN
        table = "; ".join(
            f"{batch}: " + ", ".join(f"{name} {diff:.3g}" for name, diff in diffs.items())
            for batch, diffs in figures.items()
        )
        raise ParityError(f"ONNX Runtime differs from PyTorch by more than {tolerance:g} (max abs): {table}")
    return figures
