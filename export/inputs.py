"""Real inputs for parity, calibration and accuracy: demo samples, Fashion-MNIST, or drawn images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model.config import Preprocessing
from model.data import load_fashion_mnist
from model.preprocess import decode_image, preprocess

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "demo" / "samples"


def fashion_mnist_test(root: Path | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """The Fashion-MNIST test set, (10000, 28, 28) uint8 images and labels, or None where it is absent or unreadable."""
    try:
        return load_fashion_mnist(root, "test")
    except (FileNotFoundError, ValueError, OSError) as exc:
        log.info("Fashion-MNIST test set not used: %s", exc)
        return None


def drawn_images(count: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Natural-looking stand-ins: smooth colour gradients with a few filled shapes on them.

    Valid for every seed, count >= 0 and size >= 2: each shape's box is a corner plus a positive extent.
    """
    if size < 2:
        raise ValueError(f"drawn images need size >= 2, got {size}")
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)  # (S, S) each, in [0, 1]
    low, high = max(1, size // 8), max(2, size // 2)
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        base = 0.5 + 0.25 * (a[:, None, None] * xs + b[:, None, None] * ys + c[:, None, None] * xs * ys)  # (3, S, S)
        image = Image.fromarray((np.clip(base, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 4)):
            x0, y0 = (int(v) for v in rng.integers(0, high, 2))
            width, height = (int(v) for v in rng.integers(low, high + 1, 2))
            box = (x0, y0, min(x0 + width, size - 1), min(y0 + height, size - 1))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        images.append(image)
    return images


def real_images(
    count: int, seed: int = 0, samples: Path | None = SAMPLES, fashion_mnist: bool = True
) -> tuple[list[Image.Image], str]:
    """Exactly `count` images and where they came from: demo samples, then Fashion-MNIST, then drawn ones.

    Neither the samples folder nor the dataset is required: whatever is missing is made up with drawn images.
    """
    images: list[Image.Image] = []
    sources = []
    if samples is not None and samples.is_dir():
        for path in sorted(samples.glob("*.png"))[:count]:
            images.append(decode_image(path.read_bytes()))
        if images:
            sources.append(f"{len(images)} demo samples")
    test = fashion_mnist_test() if fashion_mnist and len(images) < count else None
    if test is not None:
        pixels = test[0][: count - len(images)]
        images += [Image.fromarray(p, "L") for p in pixels]
        sources.append(f"{len(pixels)} Fashion-MNIST test images")
    if len(images) < count:
        drawn = drawn_images(count - len(images), seed=seed)
        images += drawn
        sources.append(f"{len(drawn)} drawn images")
    return images, " + ".join(sources)


def model_inputs(prep: Preprocessing, count: int) -> tuple[np.ndarray, str]:
    """`count` real images through the checkpoint's own preprocessing: float32 (count, C, S, S)."""
    images, origin = real_images(count)
    return np.stack([preprocess(image, prep) for image in images]), origin


def stress_images(size: int) -> tuple[list[Image.Image], list[str]]:
    """Flat and extreme pictures, each named: the inputs reduced precision breaks first.

    Natural images keep activations in a comfortable range; a flat picture gives every token the same value
    (zero variance into each LayerNorm), saturated ones push the preprocessing's output to its ends, and a
    hard checkerboard or noise puts the largest differences between neighbouring pixels into the convolutions.
    """
    flat = {
        "black": (0, 0, 0),
        "white": (255, 255, 255),
        "grey": (128, 128, 128),
        "red": (255, 0, 0),
        "green": (0, 255, 0),
        "blue": (0, 0, 255),
    }
    images = {name: Image.new("RGB", (size, size), colour) for name, colour in flat.items()}
    ys, xs = np.mgrid[0:size, 0:size]  # (S, S) each
    images["checkerboard"] = Image.fromarray((((ys + xs) % 2) * 255).astype(np.uint8), "L")
    images["noise"] = Image.fromarray(np.random.default_rng(0).integers(0, 2, (size, size, 3), np.uint8) * 255, "RGB")
    dot = np.zeros((size, size), np.uint8)
    dot[size // 2, size // 2] = 255
    images["one white pixel"] = Image.fromarray(dot, "L")
    return list(images.values()), list(images)
