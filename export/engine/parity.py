"""The built engine against the fp32 model on real images: the rule a plan (or any reduced-precision GPU
backend) must pass before it is served."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import INPUT_NAME, LOGITS, OUTPUT_NAMES, TOKENS
from .runner import run_plan

log = logging.getLogger(__name__)

# The engine must reproduce the fp32 model: max |logits - fp32 logits| <= tolerance x max(1, max |fp32 logits|).
# FP16 keeps 11 significant bits (relative step 4.9e-4); over a dozen cells the rounding adds up to ~1e-3 of
# the logit scale, so 2e-2 is loose enough for any sound FP16 engine and far below what an overflow or a wrong
# layer does. FP32 engines may use TF32 tensor cores (10 bits), hence 5e-3 rather than the ONNX parity's 1e-4.
ENGINE_TOLERANCE = {"fp16": 2e-2, "fp32": 5e-3}


class EngineParityError(RuntimeError):
    """The built engine does not compute what the fp32 model computes; the plan is refused."""


def compare_to_fp32(
    got: dict[str, np.ndarray], expected: dict[str, np.ndarray], precision: str
) -> tuple[dict[str, Any], list[str]]:
    """The agreement figures of reduced-precision outputs with fp32 ones, and what fails the engine rule."""
    finite = bool(all(np.isfinite(got[name]).all() for name in expected))
    agree = int((got[LOGITS].argmax(axis=1) == expected[LOGITS].argmax(axis=1)).sum())
    count = len(expected[LOGITS])
    scale = max(1.0, float(np.abs(expected[LOGITS]).max()))
    with np.errstate(invalid="ignore"):
        diff = {name: float(np.abs(got[name] - expected[name]).max()) for name in expected}
    tolerance = ENGINE_TOLERANCE[precision]
    figures = {
        "images": count,
        "finite": finite,
        "top1_agree": agree,
        "max_abs_diff": diff,
        "logit_scale": scale,
        "tolerance": tolerance,
        "tolerance_rule": "max |logits - fp32| <= tolerance * max(1, max |fp32 logits|)",
    }
    problems = []
    if not finite:
        problems.append("non-finite outputs (inf/NaN)")
    if agree != count:
        problems.append(f"top-1 agrees with fp32 on {agree}/{count} images only")
    if not diff[LOGITS] <= tolerance * scale:  # also catches NaN
        problems.append(f"max |logits - fp32| {diff['logits']:.3g} > {tolerance:g} x logit scale {scale:.3g}")
    return figures, problems


def engine_parity(plan: Path, onnx_path: Path, images: np.ndarray, *, precision: str, origin: str) -> dict[str, Any]:
    """Run the plan and fp32 ONNX Runtime (CPU) on the same real images; the figures, or EngineParityError.

    Refused unless every output is finite, top-1 agrees with fp32 on every image, and the max logit difference
    is within `ENGINE_TOLERANCE[precision]` of the logit scale.
    """
    from ..parity import cpu_session

    images = np.ascontiguousarray(images, np.float32)
    names = list(OUTPUT_NAMES)
    expected = dict(zip(names, cpu_session(onnx_path).run(names, {INPUT_NAME: images}), strict=True))
    figures, problems = compare_to_fp32(run_plan(plan, images), expected, precision)
    if problems:
        raise EngineParityError(f"the {precision} TensorRT engine is refused on {origin}: " + "; ".join(problems))
    log.info(
        "TensorRT %s vs fp32 on %s: top-1 %d/%d, max |logits diff| %.3g (scale %.3g), max |tokens diff| %.3g",
        precision,
        origin,
        figures["top1_agree"],
        figures["images"],
        figures["max_abs_diff"][LOGITS],
        figures["logit_scale"],
        figures["max_abs_diff"][TOKENS],
    )
    return {"inputs": origin, **figures}
