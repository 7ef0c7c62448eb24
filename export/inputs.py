"""Real inputs for parity, calibration and accuracy: demo samples, Fashion-MNIST, or drawn images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from model.config import Preprocessing
from model.data import FASHION_MNIST_DIR, load_fashion_mnist
from model.preprocess import decode_image, preprocess

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "demo" / "samples"


def fashion_mnist_test(root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray] | None:
    """The Fashion-MNIST test set, (10000, 28, 28) uint8 images and labels, or None where it is absent."""
    try:
        return load_fashion_mnist(root, "test")
    except FileNotFoundError:
        return None


def drawn_images(count: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Natural-looking stand-ins: smooth colour gradients with a few filled shapes on them."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    images = []
    for _ in range(count):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        base = 0.5 + 0.25 * (a[:, None, None] * xs + b[:, None, None] * ys + c[:, None, None] * xs * ys)
        image = Image.fromarray((np.clip(base, 0, 1).transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 4)):
            x0, y0 = rng.integers(0, size // 2, 2)
            x1, y1 = x0 + rng.integers(size // 8, size // 2, 2)
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
        images.append(image)
    return images


def real_images(count: int, seed: int = 0) -> tuple[list[Image.Image], str]:
    """Up to `count` images and where they came from: demo samples, then Fashion-MNIST, then drawn ones."""
    images: list[Image.Image] = []
    sources = []
    if SAMPLES.is_dir():
        for path in sorted(SAMPLES.glob("*.png"))[:count]:
            images.append(decode_image(path.read_bytes()))
        if images:
            sources.append(f"{len(images)} demo samples")
    test = fashion_mnist_test() if len(images) < count else None
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
