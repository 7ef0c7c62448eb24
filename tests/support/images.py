"""Test images: drawn deterministic pictures in any PIL mode, the demo's real samples, encoding."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from .checkpoints import ROOT

SAMPLES = ROOT / "demo" / "samples"


def drawn_image(seed: int, size: tuple[int, int] = (28, 28), mode: str = "L") -> Image.Image:
    """A deterministic picture with shapes (so the CAM has something to find), in any PIL mode."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 80, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        x1, y1 = x0 + rng.integers(size[0] // 4, size[0] // 2), y0 + rng.integers(size[1] // 4, size[1] // 2)
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(100, 256, 3)))
    return image.convert(mode)


def sample_images(count: int) -> list[bytes]:
    """PNG bytes: the demo's real Fashion-MNIST samples when present, else drawn ones."""
    samples = sorted(SAMPLES.glob("*.png")) if SAMPLES.is_dir() else []
    out = [path.read_bytes() for path in samples[:count]]
    seed = 0
    while len(out) < count:
        out.append(encode(drawn_image(seed), "PNG"))
        seed += 1
    return out


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    """The image's bytes in a PIL format ("PNG", "JPEG", ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()
