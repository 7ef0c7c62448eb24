"""Varied real JPEGs made deterministically from the photographs shipped inside installed packages (no download):
crops at many sizes and aspect ratios, every EXIF orientation, grey, progressive, several qualities and chroma
subsamplings. For tests that compare decoders on real photo content."""

from __future__ import annotations

import importlib.util
import io
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

# (package, path inside it): photographs, not drawings. Matplotlib's Grace Hopper portrait; scikit-learn's
# Chinese palace and flower. Both packages are among the dev extra's; the GPU machine's image has them too.
PHOTO_FILES = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)
LONG_SIDES = (64, 150, 256, 333, 500, 800, 1280, 2048)


@cache
def source_photos() -> tuple[Image.Image, ...]:
    """The photographs found among the installed packages, as RGB images (locating a package does not import it)."""
    photos = []
    for package, inside in PHOTO_FILES:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        path = Path(spec.origin).parent / inside
        if path.is_file():
            photos.append(Image.open(path).convert("RGB"))
    return tuple(photos)


def varied_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` JPEGs cut from the source photos: each a random crop, scaled to a long side from LONG_SIDES, saved
    with orientation (i % 8) + 1, grey every fifth, progressive every third, quality 50-95, subsampling 4:4:4,
    4:2:2 or 4:2:0. Empty when no source photo is installed."""
    photos = source_photos()
    if not photos:
        return []
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = photo.size
        w, h = (int(v) for v in rng.uniform(0.4, 1.0, 2) * (width, height))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = photo.crop((left, top, left + w, top + h))
        long_side = LONG_SIDES[int(rng.integers(len(LONG_SIDES)))]
        scale = long_side / max(w, h)
        crop = crop.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        if i % 5 == 0:
            crop = crop.convert("L")
        exif = Image.Exif()
        exif[0x0112] = i % 8 + 1
        buffer = io.BytesIO()
        crop.save(
            buffer,
            "JPEG",
            quality=int(rng.integers(50, 96)),
            progressive=i % 3 == 1,
            subsampling=int(rng.integers(0, 3)),
            exif=exif.tobytes(),
        )
        out.append(buffer.getvalue())
    return out
