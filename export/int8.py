"""CPU int8: an OpenVINO int8 model from NNCF post-training quantization with accuracy control, measured at export.

Offered only where the CPU multiplies int8 natively (AVX-512 VNNI, AVX-VNNI or AMX-INT8): elsewhere OpenVINO
emulates it and it is slower than fp32. The steps, in order:

1. calibrate   on images the evaluation never sees (Fashion-MNIST training images for a Fashion-MNIST
               classifier, else the stand-ins after the evaluation's own);
2. probe       which layers this CPU computes in int8: a quick quantization (PROBE_IMAGES calibration images),
               compiled; a convolution or matmul it computes in floating point anyway (on AVX-512 VNNI, ViTAE-T's
               grouped convolutions in the normal cells, 4 input channels a group) is left unquantized, since its
               quantize and dequantize would cost time and accuracy and buy nothing;
3. quantize    with NNCF's accuracy control: layers go back to full precision, most harmful first, until int8
               picks fp32's class on all but RESTORE_UNTIL % of validation images that are neither calibration
               nor evaluation images. Never quantized: the Performer kernel (as in the FP16 engine,
               `export.engine.fp16_graph.PERFORMER_KERNEL`: its log-domain features do not survive 8 bits) and
               the classifier head (CLASSIFIER_HEAD: its 8-bit input moves every logit at once; on ViTAE-T
               keeping it raised agreement with fp32 from 94.1 % to 98.8-99.2 % of the evaluation images);
4. measure     against fp32 on the export's evaluation images (`export.precision.evaluation_inputs`): top-1
               agreement, top-1 on labelled images, and images/s of fp32, bf16 (where native) and int8, for
               each way of computing the layers left unquantized: fp32, and bf16 where the CPU has it natively
               and the export's bf16 step measured it safe for this model (finite and close, stress images too);
5. judge       each safe when agreement >= MIN_AGREEMENT % and, on labelled images, top-1 loss <=
               MAX_TOP1_DROP; the record is the fastest safe one (`compute`), else the fp32 one.

The model is written as OpenVINO IR beside model.onnx (INT8_XML, INT8_BIN) and recorded under `cpu_int8`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.config import Preprocessing
from model.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from model.preprocess import preprocess

from .engine.fp16_graph import PERFORMER_KERNEL
from .inputs import model_inputs
from .precision import (
    MIN_AGREEMENT,
    compare_logits,
    compile_cpu,
    cpu_flags,
    cpu_kind,
    evaluation_inputs,
    images_per_second,
    native_bf16,
    openvino_capabilities,
    run_logits,
)

log = logging.getLogger(__name__)

INT8_XML, INT8_BIN = "model_int8.xml", "model_int8.bin"
# cpuinfo flags of native int8 dot products: AVX-512 VNNI (Cascade Lake, Zen 4), AVX-VNNI (Alder Lake), AMX-INT8.
INT8_CPU_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
MAX_TOP1_DROP = 0.2  # points of top-1, as for bf16
# The restorer's target, in % of validation images whose class differs from fp32's: half of what the gate allows
# (100 - MIN_AGREEMENT), a margin for the evaluation images being other images. A tighter target chases single
# images: at 0.2 (one image in 500) ViTAE-T, at 99.6 % agreement, went into ranking rounds of ~3.5 minutes each.
RESTORE_UNTIL = (100 - MIN_AGREEMENT) / 2
CALIBRATION_IMAGES = 300
VALIDATION_IMAGES = 500
# Bounds on the accuracy restorer, so an export takes minutes, not hours: at most this many layer groups go back
# to full precision (then the model is judged as it stands), each ranked on this many validation images.
MAX_RESTORED_GROUPS = 8
RANKING_IMAGES = 100
# ViTAE.head, the Linear from the pooled features to the logits (ONNX node names follow the module names).
CLASSIFIER_HEAD = re.compile(r"^/head/")
# Patterns of the layers never quantized (NNCF IgnoredScope patterns): see step 3 above.
NEVER_QUANTIZED = (PERFORMER_KERNEL.pattern, CLASSIFIER_HEAD.pattern)
# The probe's calibration: which kernel the CPU plugin picks for a layer does not depend on the ranges.
PROBE_IMAGES = 8
# The CPU plugin's names for the layers that carry weights (runtime model `layerType`), and its int8 precisions.
WEIGHTED_LAYERS = frozenset({"Convolution", "FullyConnected", "MatMul"})
INT8_PRECISIONS = frozenset({"i8", "u8"})
QUANTIZABLE_OPS = frozenset({"Convolution", "GroupConvolution", "MatMul"})  # the same layers in the model's opset


def native_int8(flags: Iterable[str]) -> bool:
    """Whether a CPU multiplies int8 natively, from its /proc/cpuinfo flags."""
    return bool(INT8_CPU_FLAGS & {f.lower() for f in flags})


@dataclass(frozen=True)
class Int8Report:
    """What metadata.json records under `cpu_int8`; `safe` is None when it was not measured."""

    safe: bool | None
    reason: str
    inputs: str = ""
    images: int = 0
    top1_agreement: float | None = None  # % of images where int8 and fp32 pick the same class
    fp32_top1: float | None = None  # % correct, labelled inputs only
    int8_top1: float | None = None
    fp32_images_per_s: float | None = None
    bf16_images_per_s: float | None = None  # None where the CPU has no native bf16
    int8_images_per_s: float | None = None
    cpu_kind: str | None = None  # the verdict holds for this kind of CPU only (export.precision.cpu_kind)
    quantize_s: float | None = None
    left_in_float: list[str] = field(default_factory=list)  # layers this CPU computes in floating point anyway
    compute: str = "fp32"  # the precision of the layers left unquantized, as served
    computes: dict[str, dict[str, Any]] = field(default_factory=dict)  # each one measured, by compute


def int8_verdict(agreement: float, fp32_top1: float | None, int8_top1: float | None) -> tuple[bool, str]:
    """Safe when int8 picks fp32's class on >= MIN_AGREEMENT % of images and loses <= MAX_TOP1_DROP points."""
    if agreement < MIN_AGREEMENT:
        return False, f"int8 agrees with fp32 on {agreement:.2f} % of images, below {MIN_AGREEMENT} %"
    if fp32_top1 is not None and int8_top1 is not None and fp32_top1 - int8_top1 > MAX_TOP1_DROP:
        return False, f"int8 loses {fp32_top1 - int8_top1:.2f} points of top-1, more than {MAX_TOP1_DROP}"
    return True, f"top-1 agreement >= {MIN_AGREEMENT} % and top-1 loss <= {MAX_TOP1_DROP} points"


def tuning_images(prep: Preprocessing, class_names: list[str], measured: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Calibration images (N, C, S, S) and validation images (V, C, S, S), none of them among the `measured`
    evaluation images, and where they came from."""
    wanted = CALIBRATION_IMAGES + VALIDATION_IMAGES
    if list(class_names) == list(FASHION_MNIST_CLASSES):
        try:
            pixels, _ = load_fashion_mnist(split="train")
        except (FileNotFoundError, ValueError, OSError):
            pixels = None
        if pixels is not None:
            images = np.stack([preprocess(Image.fromarray(p, "L"), prep) for p in pixels[-wanted:]])
            return images[:CALIBRATION_IMAGES], images[CALIBRATION_IMAGES:], f"{wanted} Fashion-MNIST training images"
    images, _ = model_inputs(prep, measured + wanted)
    return (
        images[measured : measured + CALIBRATION_IMAGES],
        images[measured + CALIBRATION_IMAGES :],
        (f"{wanted} stand-ins after the evaluation's"),
    )


def layers_in_float(runtime_layers: Iterable[tuple[str, str, str]]) -> list[str]:
    """Names of the weighted layers computed in floating point, from a compiled model's runtime layers
    (name, layerType, runtimePrecision)."""
    return [
        name
        for name, layer_type, precision in runtime_layers
        if layer_type in WEIGHTED_LAYERS and precision.lower() not in INT8_PRECISIONS
    ]


def runtime_layers(compiled: Any) -> list[tuple[str, str, str]]:
    """(name, layerType, runtimePrecision) of each layer OpenVINO's CPU plugin runs for `compiled`."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layers.append((op.get_friendly_name(), info["layerType"].astype(str), info["runtimePrecision"].astype(str)))
    return layers


def not_computed_in_int8(onnx_path: Path, calibration: np.ndarray, ignored: list[str]) -> list[str]:
    """The layers that a quick int8 of `onnx_path` (`ignored` patterns left out) still computes in floating point
    on this CPU: their names, to be left unquantized."""
    import nncf
    import openvino as ov

    probe = nncf.quantize(
        ov.Core().read_model(str(onnx_path)),
        nncf.Dataset([calibration[i : i + 1] for i in range(min(PROBE_IMAGES, len(calibration)))]),
        model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=nncf.IgnoredScope(patterns=ignored, validate=False),
        subset_size=PROBE_IMAGES,
    )
    patterns = [re.compile(pattern) for pattern in ignored]
    quantizable = {  # the runtime also names layers of its own making (from a decomposed Einsum, say)
        op.get_friendly_name()
        for op in probe.get_ops()
        if op.get_type_name() in QUANTIZABLE_OPS and not any(p.search(op.get_friendly_name()) for p in patterns)
    }
    return [name for name in layers_in_float(runtime_layers(compile_cpu(probe, "fp32"))) if name in quantizable]


def quantize(
    onnx_path: Path, calibration: np.ndarray, validation: np.ndarray, reference: np.ndarray, out: Path
) -> list[str]:
    """NNCF int8 of `onnx_path` with accuracy control: on the validation images, int8 may pick another class than
    `reference` (fp32's, (V,)) on at most RESTORE_UNTIL % of them. Saved as OpenVINO IR at `out` (.xml, .bin).
    Returns the layers left unquantized because this CPU computes them in floating point anyway."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    ignored = list(NEVER_QUANTIZED)
    left_in_float = not_computed_in_int8(onnx_path, calibration, ignored)

    def top1(compiled: Any, items: Iterable[tuple[np.ndarray, int]]) -> tuple[float, list[float]]:
        """Top-1 against `reference`, and each image's 0/1 (NNCF ranks layer groups by the per-image values)."""
        hits = [float(compiled(image)[compiled.output(0)].argmax() == label) for image, label in items]
        return float(np.mean(hits)), hits

    # One image per item: NNCF draws its ranking subset by item and reads per-item values.
    items = [(validation[i : i + 1], int(reference[i])) for i in range(len(validation))]
    int8 = nncf.quantize_with_accuracy_control(
        ov.Core().read_model(str(onnx_path)),
        nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))]),
        nncf.Dataset(items),
        validation_fn=top1,
        max_drop=RESTORE_UNTIL / 100,
        drop_type=nncf.DropType.ABSOLUTE,
        model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=nncf.IgnoredScope(names=left_in_float, patterns=ignored, validate=False),
        subset_size=len(calibration),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            max_num_iterations=MAX_RESTORED_GROUPS, ranking_subset_size=RANKING_IMAGES, num_ranking_workers=1
        ),
    )
    ov.save_model(int8, str(out), compress_to_fp16=False)
    return left_in_float


def measure_int8(
    onnx_path: Path,
    out_dir: Path,
    prep: Preprocessing,
    class_names: list[str],
    speed_batch: np.ndarray,
    *,
    flags: frozenset[str] | None = None,
    bf16_safe: bool = False,
) -> Int8Report:
    """Quantize `onnx_path` into `out_dir` (INT8_XML) and measure it against fp32 (see the module's steps).

    `flags` stand for this CPU's /proc/cpuinfo flags where given, as tests do; `bf16_safe` is the export's bf16
    verdict for this model (export.precision.measure_bf16), without which no build runs layers in bf16.
    """
    flags = cpu_flags() if flags is None else flags
    if not native_int8(flags):
        return Int8Report(None, "this CPU has no native int8 (AVX512_VNNI, AVX_VNNI or AMX_INT8); not measured")
    try:
        import nncf  # noqa: F401
    except ImportError:
        return Int8Report(None, "the nncf package is not installed (pip install nncf); not measured")
    images, labels, origin = evaluation_inputs(prep, class_names)
    fp32 = compile_cpu(onnx_path, "fp32")
    fp32_logits = run_logits(fp32, images)  # (N, K)
    calibration, validation, tuned_on = tuning_images(prep, class_names, len(images))
    reference = run_logits(fp32, validation).argmax(1)  # (V,) validation is judged against fp32's classes
    start = time.perf_counter()
    left_in_float = quantize(onnx_path, calibration, validation, reference, out_dir / INT8_XML)
    seconds = time.perf_counter() - start
    bf16_here = native_bf16(openvino_capabilities(), flags)
    computes = ["fp32", "bf16"] if bf16_here and bf16_safe else ["fp32"]
    int8 = {compute: compile_cpu(out_dir / INT8_XML, compute) for compute in computes}
    bf16 = [compile_cpu(onnx_path, "bf16")] if bf16_here else []
    speeds = images_per_second([fp32, *int8.values(), *bf16], np.ascontiguousarray(speed_batch, np.float32))
    measured = {}
    for compute, compiled, speed in zip(computes, int8.values(), speeds[1 : 1 + len(computes)], strict=True):
        agreement, fp32_top1, int8_top1 = compare_logits(fp32_logits, run_logits(compiled, images), labels)
        safe, reason = int8_verdict(agreement, fp32_top1, int8_top1)
        measured[compute] = {
            "safe": safe,
            "reason": reason,
            "top1_agreement": round(agreement, 3),
            "int8_top1": None if int8_top1 is None else round(int8_top1, 2),
            "int8_images_per_s": round(speed, 1),
            "fp32_top1": None if fp32_top1 is None else round(fp32_top1, 2),
        }
    compute = served_compute(measured)
    chosen = measured[compute]
    return Int8Report(
        safe=chosen["safe"],
        reason=chosen["reason"] + f"; unquantized layers in {compute}",
        inputs=f"{origin}; tuned on {tuned_on}",
        images=len(images),
        top1_agreement=chosen["top1_agreement"],
        fp32_top1=chosen["fp32_top1"],
        int8_top1=chosen["int8_top1"],
        fp32_images_per_s=round(speeds[0], 1),
        int8_images_per_s=chosen["int8_images_per_s"],
        bf16_images_per_s=round(speeds[-1], 1) if bf16 else None,
        cpu_kind=cpu_kind(flags),
        quantize_s=round(seconds, 1),
        left_in_float=left_in_float,
        compute=compute,
        computes=measured,
    )


def served_compute(measured: dict[str, dict[str, Any]]) -> str:
    """The compute of the unquantized layers to serve: the fastest safe one, else fp32 (recorded as unsafe)."""
    safe = [compute for compute, m in measured.items() if m["safe"]]
    return max(safe, key=lambda compute: measured[compute]["int8_images_per_s"]) if safe else "fp32"
