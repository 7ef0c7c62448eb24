"""CPU reduced precision: OpenVINO's bf16 against its fp32 on real images, measured once, at export.

The service serves bf16 only where this measurement found it safe and the CPU computes bf16 natively
(AVX512_BF16 or AMX). Without native bf16 there is nothing to measure: the report says so and the
service stays in fp32.

This module is also where both stages compile a model for OpenVINO's CPU plugin, so the export measures
exactly what the service runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.config import Preprocessing
from model.data import FASHION_MNIST_CLASSES
from model.preprocess import preprocess

from .bf16_probe import first_non_finite_node
from .inputs import fashion_mnist_test, model_inputs, stress_images

log = logging.getLogger(__name__)

CPU_PRECISIONS = ("bf16", "fp32")
MAX_TOP1_LOSS = 0.2  # points of top-1 accuracy on a labelled test set
MIN_AGREEMENT = 99.0  # % of images on which bf16 and fp32 pick the same class
STAND_IN_IMAGES = 256  # unlabelled images for models that are not Fashion-MNIST classifiers
EVAL_BATCH = 64
SPEED_REPEATS = 10
# bf16 may differ from fp32 by at most this share of the largest |fp32 output|: bf16 keeps 8 significant bits
# (0.2 % per stored value), which adds up to about 1 % over the model's matmuls; a wrong kernel gives ~100 %.
MAX_RELATIVE_DIFF = 0.05
# cpuinfo flags of native bf16 arithmetic: AVX-512 BF16 (Cooper Lake, Zen 4 and later) and AMX (Sapphire Rapids).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


# ---------------------------------------------------------------- what the CPU can do


def native_bf16(capabilities: Iterable[str], cpu_flags: Iterable[str]) -> bool:
    """Whether a CPU computes bf16 natively, from OpenVINO's OPTIMIZATION_CAPABILITIES and /proc/cpuinfo flags.

    Either source suffices: OpenVINO lists BF16 when its plugin has bf16 kernels for the CPU, and the
    flags cover an OpenVINO build that does not report it.
    """
    return "BF16" in {c.upper() for c in capabilities} or bool(BF16_CPU_FLAGS & {f.lower() for f in cpu_flags})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's feature flags (Linux), empty where /proc/cpuinfo is absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def openvino_capabilities() -> frozenset[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU device; empty without the openvino package."""
    try:
        import openvino as ov
    except ImportError:
        return frozenset()
    return frozenset(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def this_cpu_has_native_bf16() -> bool:
    """native_bf16() on this machine's CPU."""
    return native_bf16(openvino_capabilities(), cpu_flags())


def cpu_kind(flags: Iterable[str]) -> str:
    """The kind of x86 CPU, by the flags that decide which kernels OpenVINO runs bf16 (and int8) on.

    amx: AMX tiles (Sapphire Rapids and later); avx512_bf16: AVX-512 with native bf16 (Zen 4, Cooper Lake);
    avx512: AVX-512 without bf16; avx2; other. bf16 measured on one kind says nothing of another: the
    kernels differ (AMX tiles against AVX-512 dot products), and so may their results.
    """
    flags = {f.lower() for f in flags}
    for kind, flag in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return kind
    return "other"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first processor's model name (Linux), "unknown" where /proc/cpuinfo is absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


def openvino_version() -> str | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.get_version()


# ---------------------------------------------------------------- compiling and running


def compile_cpu(
    model: Path | Any, precision: str, *, threads: int = 0, streams: int = 1, cache_dir: Path | None = None
) -> Any:
    """model.onnx (or an OpenVINO IR path, or an ov.Model) compiled by OpenVINO's CPU plugin in `precision` (bf16
    or fp32) -> ov.CompiledModel.

    streams=1: the LATENCY hint, one request at a time using every core for one batch. streams=N > 1: the
    THROUGHPUT hint with N streams, each on its share of the cores, for N requests in flight at once;
    streams=0: the THROUGHPUT hint with the plugin's own stream count (the compiled model's
    OPTIMAL_NUMBER_OF_INFER_REQUESTS says how many). `threads` caps the threads of all streams together.
    With `cache_dir`, a second compile of the same model and options loads the compiled blob instead.
    """
    import openvino as ov

    if precision not in CPU_PRECISIONS:
        raise ValueError(f"CPU precision must be one of {', '.join(CPU_PRECISIONS)}, got {precision!r}")
    if streams < 0:
        raise ValueError(f"streams must be >= 0, got {streams}")
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "PERFORMANCE_HINT": "LATENCY" if streams == 1 else "THROUGHPUT",
    }
    if streams > 1:
        config["NUM_STREAMS"] = streams
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    core = ov.Core()
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(cache_dir)})
    return core.compile_model(str(model) if isinstance(model, Path) else model, "CPU", config)


def run_logits(compiled: Any, images: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
    """images float32 (N, C, S, S) -> logits float32 (N, K), `batch` images per call."""
    request = compiled.create_infer_request()
    out = []
    for start in range(0, len(images), batch):
        request.infer({"images": np.ascontiguousarray(images[start : start + batch])})
        out.append(np.array(request.get_tensor("logits").data, dtype=np.float32))  # copy: the tensor is reused
    return np.concatenate(out)


def images_per_second(models: list[Any], batch: np.ndarray, repeats: int = SPEED_REPEATS) -> list[float]:
    """Median throughput of each compiled model on the same batch; runs alternate so load hits all alike."""
    requests = [m.create_infer_request() for m in models]
    spent: list[list[float]] = [[] for _ in models]
    for request in requests:
        request.infer({"images": batch})  # warm-up
    for _ in range(repeats):
        for request, times in zip(requests, spent, strict=True):
            start = time.perf_counter()
            request.infer({"images": batch})
            times.append(time.perf_counter() - start)
    return [len(batch) / float(np.median(times)) for times in spent]


# ---------------------------------------------------------------- the measurement


@dataclass(frozen=True)
class Bf16Report:
    """What metadata.json records under `cpu_bf16`; `safe` is None when it could not be measured."""

    safe: bool | None
    reason: str
    inputs: str
    images: int
    top1_agreement: float | None  # % of the natural images where bf16 and fp32 pick the same class
    max_logit_diff: float | None  # max |bf16 - fp32| over every logit of every image
    fp32_top1: float | None  # % correct, labelled inputs only
    bf16_top1: float | None
    fp32_images_per_s: float | None
    bf16_images_per_s: float | None
    cpu_kind: str | None = None  # cpu_kind() of the CPU it was measured on: the verdict holds for that kind only
    cpu_model: str | None = None
    stress_images: int = 0  # flat and extreme images (inputs.stress_images), judged on finiteness and closeness
    max_relative_diff: float | None = None  # max |bf16 - fp32| / max |fp32|, over logits and tokens


def evaluation_inputs(prep: Preprocessing, class_names: list[str]) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Images (N, C, S, S) to compare on, their labels (or None) and where they came from.

    A Fashion-MNIST classifier gets the full labelled test set, where present; any other model gets
    demo samples, Fashion-MNIST images and drawn stand-ins, unlabelled.
    """
    test = fashion_mnist_test() if list(class_names) == list(FASHION_MNIST_CLASSES) else None
    if test is not None:
        pixels, labels = test
        images = np.stack([preprocess(Image.fromarray(p, "L"), prep) for p in pixels])
        return images, labels.astype(np.int64), f"{len(labels)} Fashion-MNIST test images"
    images, origin = model_inputs(prep, STAND_IN_IMAGES)
    return images, None, origin


def verdict(
    agreement: float,
    fp32_top1: float | None,
    bf16_top1: float | None,
    logits_finite: bool,
    relative_diff: float = 0.0,
) -> tuple[bool, str]:
    """Safe when every output is finite and within MAX_RELATIVE_DIFF of fp32's scale, bf16 picks fp32's class on
    >= MIN_AGREEMENT % of images and, on labelled images, loses at most MAX_TOP1_LOSS points of top-1."""
    if not logits_finite:
        return False, "bf16 produced non-finite logits"
    if relative_diff > MAX_RELATIVE_DIFF:
        return False, f"bf16 differs from fp32 by {100 * relative_diff:.1f} % of the output scale, above " + (
            f"{100 * MAX_RELATIVE_DIFF:.0f} %"
        )
    if agreement < MIN_AGREEMENT:
        return False, f"bf16 agrees with fp32 on {agreement:.2f} % of images, below {MIN_AGREEMENT} %"
    if fp32_top1 is not None and bf16_top1 is not None and fp32_top1 - bf16_top1 > MAX_TOP1_LOSS:
        return False, f"bf16 loses {fp32_top1 - bf16_top1:.2f} points of top-1, more than {MAX_TOP1_LOSS}"
    return True, f"top-1 agreement >= {MIN_AGREEMENT} % and top-1 loss <= {MAX_TOP1_LOSS} points"


def compare_logits(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None
) -> tuple[float, float | None, float | None]:
    """Argmax agreement of `candidate` with `reference` (N, K) each, and each one's top-1 on `labels` (N,) when
    there are labels; all in percent."""
    agreement = 100.0 * float((reference.argmax(1) == candidate.argmax(1)).mean())
    if labels is None:
        return agreement, None, None
    return agreement, *(100.0 * float((logits.argmax(1) == labels).mean()) for logits in (reference, candidate))


def run_outputs(compiled: Any, images: np.ndarray, batch: int = EVAL_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """images float32 (N, C, S, S) -> logits (N, K) and tokens (N, T, D), float32, `batch` images per call."""
    request = compiled.create_infer_request()
    logits, tokens = [], []
    for start in range(0, len(images), batch):
        request.infer({"images": np.ascontiguousarray(images[start : start + batch])})
        logits.append(np.array(request.get_tensor("logits").data, dtype=np.float32))  # copies: tensors are reused
        tokens.append(np.array(request.get_tensor("tokens").data, dtype=np.float32))
    return np.concatenate(logits), np.concatenate(tokens)


def relative_difference(reference: np.ndarray, candidate: np.ndarray) -> float:
    """max |candidate - reference| / max |reference|: how far off, as a share of the output's own scale."""
    return float(np.abs(candidate - reference).max() / max(float(np.abs(reference).max()), 1e-30))


def non_finite_detail(onnx_path: Path, images: np.ndarray, outputs: np.ndarray, stress_names: list[str]) -> str:
    """How many natural images and which stress images (the last len(stress_names) of `images`) went non-finite
    in `outputs` (N, ...), and the node where it started."""
    bad = ~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)  # (N,)
    natural = len(images) - len(stress_names)
    stressed = [name for name, failed in zip(stress_names, bad[natural:], strict=True) if failed]
    node = first_non_finite_node(onnx_path, images[np.flatnonzero(bad)[:EVAL_BATCH]])
    where = node.describe() if node else "no single node's bf16 output was non-finite when probed"
    return (
        f"{int(bad[:natural].sum())} of {natural} natural images and {len(stressed)} of {len(stress_names)} flat "
        f"or extreme ones ({', '.join(stressed) or 'none'}); {where}"
    )


def measure_bf16(
    onnx_path: Path,
    prep: Preprocessing,
    class_names: list[str],
    speed_batch: np.ndarray,
    *,
    flags: frozenset[str] | None = None,
    capabilities: frozenset[str] | None = None,
) -> Bf16Report:
    """bf16 against fp32, both OpenVINO on this CPU: finiteness and closeness on natural and stress images, top-1
    agreement and (labelled) top-1 on the natural ones, and throughput on `speed_batch` (N, C, S, S).

    `flags` and `capabilities` stand for this CPU's (/proc/cpuinfo, OpenVINO's) where given, as tests do.
    """
    flags = cpu_flags() if flags is None else flags
    capabilities = openvino_capabilities() if capabilities is None else capabilities
    if openvino_version() is None:
        return _unmeasured("the openvino package is not installed")
    if not native_bf16(capabilities, flags):
        return _unmeasured("this CPU has no native bf16 (AVX512_BF16 or AMX); re-export on one that has to measure")
    natural, labels, origin = evaluation_inputs(prep, class_names)
    stress, stress_names = stress_images(prep.img_size)
    images = np.concatenate([natural, np.stack([preprocess(image, prep) for image in stress])])  # (N + S, C, S, S)
    fp32, bf16 = compile_cpu(onnx_path, "fp32"), compile_cpu(onnx_path, "bf16")
    (fp32_logits, fp32_tokens), (bf16_logits, bf16_tokens) = run_outputs(fp32, images), run_outputs(bf16, images)
    agreement, fp32_top1, bf16_top1 = compare_logits(fp32_logits[: len(natural)], bf16_logits[: len(natural)], labels)
    finite = bool(np.isfinite(bf16_logits).all() and np.isfinite(bf16_tokens).all())
    relative = (
        max(relative_difference(fp32_logits, bf16_logits), relative_difference(fp32_tokens, bf16_tokens))
        if finite
        else None
    )
    safe, reason = verdict(agreement, fp32_top1, bf16_top1, finite, relative or 0.0)
    if not finite:
        outputs = np.concatenate([bf16_logits, bf16_tokens.reshape(len(images), -1)], axis=1)  # (N + S, K + T*D)
        reason += ": " + non_finite_detail(onnx_path, images, outputs, stress_names)
    fp32_speed, bf16_speed = images_per_second([fp32, bf16], np.ascontiguousarray(speed_batch, np.float32))
    return Bf16Report(
        safe=safe,
        reason=reason,
        inputs=f"{origin} + {len(stress)} flat and extreme images",
        images=len(natural),
        top1_agreement=round(agreement, 3),
        max_logit_diff=round(float(np.abs(bf16_logits - fp32_logits).max()), 5) if finite else None,
        fp32_top1=None if fp32_top1 is None else round(fp32_top1, 2),
        bf16_top1=None if bf16_top1 is None else round(bf16_top1, 2),
        fp32_images_per_s=round(fp32_speed, 1),
        bf16_images_per_s=round(bf16_speed, 1),
        cpu_kind=cpu_kind(flags),
        cpu_model=cpu_model(),
        stress_images=len(stress),
        max_relative_diff=None if relative is None else round(relative, 5),
    )


def _unmeasured(reason: str) -> Bf16Report:
    return Bf16Report(None, reason, "", 0, None, None, None, None, None, None)
