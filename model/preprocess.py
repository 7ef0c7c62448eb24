"""The one implementation of image preprocessing, shared by training, evaluation and serving.

PIL decodes and converts; the resize of RGB images is torch's vectorized 8-bit kernel (PIL's filters in PIL's
fixed-point arithmetic, a level or so off PIL's own resize); normalisation is numpy.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import Preprocessing

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# The filters torch's 8-bit kernel computes as PIL does (resample_rgb). It is vectorized for 3 or 4 channels only:
# single-channel images stay with PIL, whose whole-image resize is the release's transform exactly (torch's generic
# path is slower on small images: 16 against 9 us at 28 px).
VECTOR_FILTERS = ("bicubic", "bilinear")
# Larger RGB images than this stay with PIL too: torch needs the pixels as a writable array, two copies of the
# image (PIL's bytes, then the array) beside PIL's own, 240 MB more for a 40-megapixel PNG. Photos decoded in
# draft mode are far below it.
VECTOR_MAX_PIXELS = 4_000_000
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Formats read as one of the accepted ones: a JPEG with a multi-picture (MPF) segment, as phones and cameras
# write them, is opened by Pillow as MPO; its first frame is the JPEG picture.
READ_AS = {"MPO": "JPEG"}


class ImageDecodeError(ValueError):
    """The bytes are not an image this project accepts; the message says what is accepted."""


class ImageTooLargeError(ValueError):
    """The image has more pixels than allowed (decompression-bomb guard)."""


def decode_image(data: bytes, *, max_pixels: int | None = None, target_size: int | None = None) -> Image.Image:
    """Decode bytes to a PIL image: first frame, EXIF orientation applied, pixels bounded.

    `target_size` lets large JPEGs decode at a reduced scale (PIL draft mode) when the model only
    needs a side of that many pixels; the result still has at least that size.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(str(exc)) from exc
        except Image.DecompressionBombWarning as exc:
            raise ImageTooLargeError(str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise ImageDecodeError(
                f"not an image in a known format; accepted formats: {', '.join(ACCEPTED_FORMATS)}"
            ) from exc
        except Exception as exc:
            raise ImageDecodeError(
                f"not a decodable image ({type(exc).__name__}: {exc}); accepted formats: {', '.join(ACCEPTED_FORMATS)}"
            ) from exc
    if READ_AS.get(image.format, image.format) not in ACCEPTED_FORMATS:
        raise ImageDecodeError(f"image format {image.format} is not accepted; use one of {', '.join(ACCEPTED_FORMATS)}")
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        if READ_AS.get(image.format, image.format) == "JPEG" and target_size:
            # Draft picks the largest 1/2, 1/4, 1/8 scale that keeps both sides >= the request.
            image.draft(image.mode, (target_size, target_size))
        image.seek(0)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright picture
    except Exception as exc:
        raise ImageDecodeError(f"the image data is truncated or corrupt ({exc})") from exc
    return image


def stored_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image as stored, from its header alone (before any reduced-size decoding)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def to_model_mode(image: Image.Image, in_chans: int) -> Image.Image:
    """Convert any PIL mode (L, RGB, RGBA, P, CMYK, I;16, ...) to 8-bit L or RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        scale = 1 / 256 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 1
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels on white, as a viewer would show them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    target = "L" if in_chans == 1 else "RGB"
    if in_chans not in (1, 3):
        raise ValueError(f"only 1- or 3-channel models are supported, got in_chans={in_chans}")
    if image.mode == target:
        return image
    try:
        return image.convert(target)
    except ValueError:  # no direct conversion (LAB to L, say): through RGB, Pillow's hub for colour spaces
        pass
    try:
        return image.convert("RGB").convert(target)
    except ValueError as exc:
        raise ImageDecodeError(
            f"image mode {image.mode} cannot be converted to {target}; send an RGB or grayscale image"
        ) from exc


def resize_size(prep: Preprocessing) -> int:
    """Shorter side after resizing, before the center crop (timm's crop_pct rule)."""
    return math.floor(prep.img_size / prep.crop_pct)


def crop_geometry(width: int, height: int, prep: Preprocessing) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): the size the shorter side is resized to img_size / crop_pct at, and the corner
    of the centred img_size x img_size crop. Shared by the PIL path and the tensor path (service.gpu_decode)."""
    short = resize_size(prep)
    if width <= height:
        new_w, new_h = short, max(1, round(height * short / width))
    else:
        new_w, new_h = max(1, round(width * short / height)), short
    return new_w, new_h, (new_w - prep.img_size) // 2, (new_h - prep.img_size) // 2


def resize_and_crop(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """uint8 (S, S) or (S, S, C): the shorter side resized to img_size / crop_pct, then the centred S x S crop
    (timm's evaluation transform: Resize, then CenterCrop)."""
    width, height = image.size
    new_w, new_h, left, top = crop_geometry(width, height, prep)
    if (new_w, new_h) == (width, height):
        resized = np.asarray(image)
    elif image.mode == "RGB" and prep.interpolation in VECTOR_FILTERS and width * height <= VECTOR_MAX_PIXELS:
        resized = resample_rgb(np.array(image), new_w, new_h, prep.interpolation)
    else:
        # PIL resizes the whole image: resampling only the crop's source box lets it take the vertical pass
        # first, and its 8-bit rounding between the passes then moves values by up to 11 levels.
        resized = np.asarray(image.resize((new_w, new_h), RESAMPLE[prep.interpolation]))
    return resized[top : top + prep.img_size, left : left + prep.img_size]


def resample_rgb(
    pixels: np.ndarray, width: int, height: int, interpolation: str, extent: tuple[float, float] | None = None
) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3) by torch's antialiased 8-bit kernel: PIL's filters (the cubic's
    a = -0.5), two passes rounded to 8 bits as PIL's are, its weights rounded otherwise: on 200 photos within 3
    levels of PIL's resize, mean 0.007 levels (tests/model/test_resize.py). On the benchmark's photos 0.44 ms
    against PIL's 1.9 ms; it runs on the calling thread only. `pixels` must be writable (torch warns on a read-only
    array).

    `extent`: the (width, height) of the region scaled, from the top-left corner, which may end within the last
    column or row (a box-reduced picture's remainder: 427 rows reduced by 2 are 213.5); default all of `pixels`.
    """
    import torch

    # The ops F.interpolate calls, which alone take both an output size and the scales mapping it to the source.
    op = {"bicubic": torch.ops.aten._upsample_bicubic2d_aa, "bilinear": torch.ops.aten._upsample_bilinear2d_aa}
    scales = (None, None) if extent is None else (height / extent[1], width / extent[0])
    planes = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (1, 3, H, W), channels-last in memory
    resized = op[interpolation](planes, [height, width], False, *scales)  # (1, 3, height, width)
    return resized[0].permute(1, 2, 0).numpy()  # (height, width, 3)


def normalize(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> float32 (C, H, W), C-contiguous: (pixels / 255 - mean) / std.

    Computed as pixels * (1 / (255 std)) - mean / std in place on one contiguous array (within 5e-7 of the
    formula above): about a tenth of the time of the formula's temporaries on a strided (C, H, W) view.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]  # (H, W, 1)
    std = np.asarray(prep.std, dtype=np.float64)
    scale = (1 / (255 * std)).astype(np.float32)[:, None, None]  # (C, 1, 1)
    shift = (np.asarray(prep.mean, dtype=np.float64) / std).astype(np.float32)[:, None, None]  # (C, 1, 1)
    x = np.empty((pixels.shape[2], *pixels.shape[:2]), dtype=np.float32)  # (C, H, W)
    np.copyto(x, pixels.transpose(2, 0, 1), casting="unsafe")
    x *= scale
    x -= shift
    return x


def preprocess(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """The evaluation transform: PIL image of any mode -> float32 (C, S, S) model input."""
    image = to_model_mode(image, prep.in_chans)
    return normalize(resize_and_crop(image, prep), prep)
