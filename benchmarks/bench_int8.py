"""Would OpenVINO int8 (NNCF post-training quantization) earn a place as the CPU's reduced precision?

The export keeps one reduced-precision CPU path (bf16). This script measures the int8 alternative with the
settings a careful user would pick — NNCF's transformer preset, the Performer kernel (the reduction cells' own
ops, `export.tensorrt.PERFORMER_KERNEL`) left in fp32, calibration on the export's own real images — against
OpenVINO fp32 of the same `model.onnx`, in one process, interleaved rounds:

- the demo model: top-1 of both on the Fashion-MNIST test set (where installed), argmax agreement, speed;
- ViTAE-T at 224 (the shared released weights when present, else random): argmax agreement on the export's
  stand-in images, max logit difference, speed at `--batch`.

Needs `pip install nncf` (not a dependency of the project). Not a test:

    python benchmarks/bench_int8.py [--batch 8] [--rounds 3] [--calibration 300]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from export.fold import fold_batchnorms  # noqa: E402
from export.inputs import fashion_mnist_test, model_inputs  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from export.precision import run_logits  # noqa: E402
from export.source import load_source  # noqa: E402
from export.tensorrt import PERFORMER_KERNEL  # noqa: E402
from model import create_model  # noqa: E402
from model.data import load_fashion_mnist  # noqa: E402
from model.preprocess import preprocess  # noqa: E402

DEMO = ROOT / "demo" / "model" / "vitae_fmnist.safetensors"
SHARED_WEIGHTS = ROOT.parent / "shared" / "reference" / "vitae_t_official.safetensors"


def quantized_pair(onnx_path: Path, calibration: np.ndarray, threads: int):
    """(fp32, int8) OpenVINO CPU compiled models of one ONNX file; int8 by NNCF PTQ on `calibration` (N, C, S, S)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    fp32 = core.read_model(str(onnx_path))
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    start = time.perf_counter()
    int8 = nncf.quantize(
        fp32,
        dataset,
        model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=nncf.IgnoredScope(patterns=[PERFORMER_KERNEL.pattern], validate=False),
        subset_size=len(calibration),
    )
    print(f"  quantized in {time.perf_counter() - start:.0f} s on {len(calibration)} calibration images")
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    return core.compile_model(fp32, "CPU", config), core.compile_model(int8, "CPU", config)


def speeds(models: dict, images: np.ndarray, rounds: int, seconds: float = 5.0) -> dict[str, float]:
    """Best img/s of each compiled model on `images` as one batch, rounds interleaved."""
    best = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for name, compiled in models.items():
            run_logits(compiled, images, len(images))
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                run_logits(compiled, images, len(images))
                done += len(images)
            best[name] = max(best[name], done / (time.perf_counter() - start))
    return best


def compare(name: str, model, folder: Path, args: argparse.Namespace) -> None:
    prep = model.config.preprocessing
    onnx_path = folder / f"{name}.onnx"
    export_onnx(fold_batchnorms(model), onnx_path)
    test = fashion_mnist_test() if prep.in_chans == 1 else None
    if test is not None:
        # Calibrate on training images, measure on the test set.
        train_images, _ = load_fashion_mnist(split="train")
        calibration = np.stack([preprocess(_pil(a), prep) for a in train_images[: args.calibration]])
        print(f"{name}: calibration on {args.calibration} Fashion-MNIST training images")
    else:
        # Calibrate on the first stand-ins, measure on the next 256.
        images, origin = model_inputs(prep, args.calibration + 256)
        calibration, x = images[: args.calibration], images[args.calibration :]
        print(f"{name}: {origin}, the first {args.calibration} for calibration")
    fp32, int8 = quantized_pair(onnx_path, calibration, args.threads)
    if test is not None:
        images, labels = test
        x = np.stack([preprocess(_pil(a), prep) for a in images])  # (10000, 1, S, S)
        a, b = run_logits(fp32, x), run_logits(int8, x)
        top1 = [100 * float((logits.argmax(1) == labels).mean()) for logits in (a, b)]
        loss = top1[1] - top1[0]
        print(f"  Fashion-MNIST test top-1: fp32 {top1[0]:.2f} %, int8 {top1[1]:.2f} % ({loss:+.2f} points)")
    else:
        a, b = run_logits(fp32, x), run_logits(int8, x)
    agree = 100 * float((a.argmax(1) == b.argmax(1)).mean())
    print(f"  argmax agreement {agree:.2f} % on {len(x)} images, max |logit diff| {np.abs(a - b).max():.3f}")
    figures = speeds({"fp32": fp32, "int8": int8}, x[: args.batch], args.rounds)
    print(
        f"  batch {args.batch}, {args.threads} threads: fp32 {figures['fp32']:.1f} img/s, "
        f"int8 {figures['int8']:.1f} img/s ({figures['int8'] / figures['fp32']:.2f}x)"
    )


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(array)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calibration", type=int, default=300, help="calibration images (NNCF's default subset)")
    p.add_argument("--threads", type=int, default=0, help="OpenVINO CPU threads (0: all cores)")
    args = p.parse_args()
    try:
        import nncf  # noqa: F401
    except ImportError:
        raise SystemExit("this benchmark needs NNCF: pip install nncf") from None
    logging.getLogger("nncf").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        compare("demo", load_source(DEMO).model, Path(tmp), args)
        if SHARED_WEIGHTS.is_file():
            vitae_t = load_source(SHARED_WEIGHTS, variant="vitae_t").model
        else:
            print("ViTAE-T: no shared released weights, random init")
            vitae_t = create_model("vitae_t").eval()
        compare("vitae_t", vitae_t, Path(tmp), args)


if __name__ == "__main__":
    main()
