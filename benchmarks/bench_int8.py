"""OpenVINO int8 by plain NNCF post-training quantization (no accuracy control), against fp32.

The export's own int8 (`python -m export --cpu-int8`, export/int8.py) adds NNCF's accuracy control; this script
measures what quantization alone gives, with the settings a careful user would pick — NNCF's transformer
preset, the Performer kernel (the reduction cells' own ops, `export.engine.fp16_graph.PERFORMER_KERNEL`) and the
classifier head (`export.int8.CLASSIFIER_HEAD`) left in fp32 as the export leaves them (`NEVER_QUANTIZED`; the
export's probe of the layers this CPU computes in int8 is not applied here), calibration on the
export's own real images — against OpenVINO fp32 of the same `model.onnx`, both compiled as the service compiles
them (`export.precision`), on the images the export judges bf16 on (`evaluation_inputs`), speed as the median of
interleaved calls:

- the demo model: top-1 of both on the Fashion-MNIST test set (where installed; calibrated on training
  images), argmax agreement, max logit difference, speed at `--batch`;
- ViTAE-T at 224 (the shared released weights when present, else random): the same on the export's stand-in
  images (calibrated on the stand-ins that follow them).

Needs `pip install nncf` (not a dependency of the project). Not a test:

    python benchmarks/bench_int8.py [--batch 8] [--repeats 10] [--calibration 300]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import add_record_option, record  # noqa: E402

from export.fold import fold_batchnorms  # noqa: E402
from export.inputs import model_inputs  # noqa: E402
from export.int8 import NEVER_QUANTIZED  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from export.precision import compare_logits, compile_cpu, evaluation_inputs, images_per_second, run_logits  # noqa: E402
from export.source import load_source  # noqa: E402
from model import create_model  # noqa: E402
from model.data import load_fashion_mnist  # noqa: E402
from model.preprocess import preprocess  # noqa: E402

DEMO = ROOT / "demo" / "model" / "vitae_fmnist.safetensors"
SHARED_WEIGHTS = ROOT.parent / "shared" / "reference" / "vitae_t_official.safetensors"


def quantize(onnx_path: Path, calibration: np.ndarray, out: Path) -> Path:
    """NNCF post-training int8 of `onnx_path`, calibrated on `calibration` (N, C, S, S), saved as OpenVINO IR."""
    import nncf
    import openvino as ov

    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    start = time.perf_counter()
    int8 = nncf.quantize(
        ov.Core().read_model(str(onnx_path)),
        dataset,
        model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=nncf.IgnoredScope(patterns=list(NEVER_QUANTIZED), validate=False),
        subset_size=len(calibration),
    )
    print(f"  quantized in {time.perf_counter() - start:.0f} s on {len(calibration)} calibration images")
    ov.save_model(int8, str(out))
    return out


def calibration_images(prep, labelled: bool, measured: int, count: int) -> tuple[np.ndarray, str]:
    """`count` images (N, C, S, S) none of which is measured: Fashion-MNIST training images for a labelled
    Fashion-MNIST classifier, else the stand-ins that follow the `measured` ones."""
    if labelled:
        train_images, _ = load_fashion_mnist(split="train")
        images = [Image.fromarray(a, "L") for a in train_images[:count]]
        return np.stack([preprocess(image, prep) for image in images]), f"{count} Fashion-MNIST training images"
    images, _ = model_inputs(prep, measured + count)
    return images[measured:], f"{count} further stand-ins"


@dataclass
class Int8Figures:
    """One model's fp32 against int8: top-1 % where labelled (else None), argmax agreement, images/s."""

    model: str
    images: int
    fp32_top1: float | None
    int8_top1: float | None
    agreement: float  # % of `images`
    fp32_images_per_s: float
    int8_images_per_s: float


def compare(name: str, model, class_names: list[str], folder: Path, args: argparse.Namespace) -> Int8Figures:
    prep = model.config.preprocessing
    onnx_path = folder / f"{name}.onnx"
    export_onnx(fold_batchnorms(model), onnx_path)
    images, labels, origin = evaluation_inputs(prep, class_names)
    calibration, where = calibration_images(prep, labels is not None, len(images), args.calibration)
    print(f"{name}: measured on {origin}, calibrated on {where}")
    int8_path = quantize(onnx_path, calibration, folder / f"{name}_int8.xml")
    fp32, int8 = (compile_cpu(path, "fp32", threads=args.threads) for path in (onnx_path, int8_path))
    a, b = run_logits(fp32, images), run_logits(int8, images)  # (N, K) each
    agree, fp32_top1, int8_top1 = compare_logits(a, b, labels)
    if labels is not None:
        print(f"  top-1: fp32 {fp32_top1:.2f} %, int8 {int8_top1:.2f} % ({int8_top1 - fp32_top1:+.2f} points)")
    print(f"  argmax agreement {agree:.2f} % on {len(images)} images, max |logit diff| {np.abs(a - b).max():.3f}")
    fp32_speed, int8_speed = images_per_second([fp32, int8], images[: args.batch], args.repeats)
    print(
        f"  batch {args.batch}: fp32 {fp32_speed:.1f} img/s, int8 {int8_speed:.1f} img/s "
        f"({int8_speed / fp32_speed:.2f}x)"
    )
    return Int8Figures(name, len(images), fp32_top1, int8_top1, agree, fp32_speed, int8_speed)


def result_rows(figures: list[Int8Figures]) -> list[dict[str, object]]:
    """One row per model as printed (benchmarks/results/int8.csv's columns)."""
    return [
        {
            "model": f.model,
            "top1_fp32_percent": None if f.fp32_top1 is None else round(f.fp32_top1, 2),
            "top1_int8_percent": None if f.int8_top1 is None else round(f.int8_top1, 2),
            "argmax_agreement": f"{f.agreement:.2f} % of {f.images:,}",
            "fp32_images_per_s": round(f.fp32_images_per_s, 1),
            "int8_images_per_s": round(f.int8_images_per_s, 1),
        }
        for f in figures
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per model (median; interleaved)")
    p.add_argument("--calibration", type=int, default=300, help="calibration images (NNCF's default subset)")
    p.add_argument("--threads", type=int, default=0, help="OpenVINO CPU threads (0: all cores)")
    add_record_option(p)
    args = p.parse_args()
    try:
        import nncf  # noqa: F401
    except ImportError:
        raise SystemExit("this benchmark needs NNCF: pip install nncf") from None
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        demo = load_source(DEMO)
        figures = [compare("demo", demo.model, demo.class_names, Path(tmp), args)]
        if SHARED_WEIGHTS.is_file():
            released = load_source(SHARED_WEIGHTS, variant="vitae_t")
            figures.append(compare("vitae_t", released.model, released.class_names, Path(tmp), args))
        else:
            print("ViTAE-T: no shared released weights, random init")
            model = create_model("vitae_t").eval()
            classes = [str(i) for i in range(model.config.num_classes)]
            figures.append(compare("vitae_t", model, classes, Path(tmp), args))
    record("int8", result_rows(figures), args.record)


if __name__ == "__main__":
    main()
