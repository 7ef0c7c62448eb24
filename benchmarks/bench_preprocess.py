"""What preparing one upload costs, step by step, in this process (not a test).

    python benchmarks/bench_preprocess.py [--variant vitae_t] [--photos 24] [--repeat 5]

The service's decode step (`service.inference.prepare_image`) on real JPEG photos (400-800 px), and its parts as
model.preprocess computes them: the JPEG decode (draft mode at about the model's size), the mode conversion with
the resize and centre crop, and the normalisation. Each figure is the best of `--repeat` passes over all photos,
in ms per photo, on one thread with nothing else running; under load the service's decode threads share the cores
with the engine and take longer (bench_service.py prints their CPU per image).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import real_jpegs  # noqa: E402
from results import cpu_flags, machine  # noqa: E402

from model.config import get_variant  # noqa: E402
from model.preprocess import decode_image, normalize, resize_and_crop, resize_size, to_model_mode  # noqa: E402
from service.inference import prepare_image  # noqa: E402


def best_ms(step: Callable[[object], object], inputs: Sequence[object], repeat: int) -> float:
    """The best of `repeat` passes of `step` over `inputs`, in ms per input."""
    passes = []
    for _ in range(repeat):
        started = time.perf_counter()
        for item in inputs:
            step(item)
        passes.append((time.perf_counter() - started) / len(inputs) * 1000)
    return min(passes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="vitae_t")
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    prep = get_variant(args.variant).preprocessing
    photos = real_jpegs(args.photos)
    decoded = [decode_image(data, target_size=resize_size(prep)) for data in photos]
    cropped = [resize_and_crop(to_model_mode(image, prep.in_chans), prep) for image in decoded]
    print(f"machine: {machine()} ({cpu_flags()}); {args.variant}: {prep.img_size} px, {prep.interpolation}")
    print(f"{len(photos)} photos, {min(map(len, photos)) // 1024}-{max(map(len, photos)) // 1024} KiB; ms per photo:")
    figures = {
        "prepare_image (all of it)": best_ms(
            lambda data: prepare_image(data, prep, max_pixels=10**8, cam_max_side=None), photos, args.repeat
        ),
        "decode (draft mode)": best_ms(
            lambda data: decode_image(data, target_size=resize_size(prep)), photos, args.repeat
        ),
        "mode, resize and crop": best_ms(
            lambda image: np.asarray(resize_and_crop(to_model_mode(image, prep.in_chans), prep)), decoded, args.repeat
        ),
        "normalise": best_ms(lambda pixels: normalize(pixels, prep), cropped, args.repeat),
    }
    for name, value in figures.items():
        print(f"  {name:28s} {value:6.2f}")


if __name__ == "__main__":
    main()
