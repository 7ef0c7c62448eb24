"""JPEG uploads decoded in one batch on the GPU (nvJPEG, through torchvision), then oriented, resized, cropped and
normalised there with model.preprocess's semantics. Whatever this path cannot take goes to the PIL path, per image.

The path of one request's uploads:
  1. probe      PIL reads each header only (no pixels): a whole JPEG (ending in EOI) in L or RGB (YCbCr) within
                the pixel limit goes on; PNG and the other formats, CMYK/YCCK, MPO, truncated, oversized and
                unreadable uploads go to the PIL path,
                which answers them exactly as before (including their errors)
  2. decode     torchvision.io.decode_jpeg on the list, in one call (nvJPEG's batched decoder on CUDA). It returns
                nothing when one image fails, so a failed batch is retried image by image, and an image nvJPEG
                refuses goes to the PIL path. Without torchvision (the CPU test machines) PIL decodes the
                full-size pixels instead, so that every later step is the one the GPU runs
  3. orient     the EXIF orientation as flips and transposes (decode_jpeg on CUDA does not apply it)
  4. resize     model.preprocess.crop_geometry's sizes; an antialiased interpolation (PIL's filters, with PIL's
                a = -0.5 cubic), rounded and clamped to 0..255 as PIL's 8-bit resize is; then the centre crop
  5. normalise  / 255, then (x - mean) / std of the served Preprocessing

Known differences from the PIL path: PIL decodes large JPEGs at a reduced DCT scale (draft mode), the CPU's resize
rounds to 8 bits between its two passes (this path rounds once), nvJPEG's IDCT and chroma upsampling differ from
libjpeg's by a level or two, and a grey model gets nvJPEG's luma plane rather than PIL's RGB -> L conversion.
tests/service/test_gpu_decode.py measures the effect.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model import Preprocessing
from model.preprocess import crop_geometry

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
EXIF_ORIENTATION = 0x0112
# torch's antialiased modes follow PIL's filters; nearest-exact is PIL's NEAREST. PIL's LANCZOS has no torch twin.
INTERPOLATION = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}


def _torchvision_io():
    """torchvision.io where it imports with its C++ image ops (the GPU image has it); None elsewhere."""
    try:
        from torchvision import io as tv_io

        tv_io.decode_jpeg  # noqa: B018  (the attribute lookup fails on a build without image ops)
    except (ImportError, AttributeError, RuntimeError, OSError):
        return None
    return tv_io


def supports(prep: Preprocessing) -> bool:
    """Whether this path can reproduce the model's preprocessing (every interpolation but lanczos)."""
    return prep.interpolation in INTERPOLATION and prep.in_chans in (1, 3)


def probe(data: bytes, max_pixels: int | None) -> int | None:
    """The EXIF orientation (1..8) of a JPEG this path takes, or None for the PIL path. Reads the header only."""
    if not data.startswith(JPEG_MAGIC) or not data.endswith(JPEG_END):  # truncated: the PIL path's error
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("L", "RGB"):
                return None
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                return None
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # unreadable header: the PIL path says what is wrong with it
        return None
    return orientation if orientation in range(1, 9) else 1


def _pil_pixels(data: bytes, grey: bool) -> torch.Tensor | None:
    """Full-size uint8 (C, H, W) pixels decoded by PIL, unrotated: what decode_jpeg gives, for machines without it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("L" if grey else "RGB"))  # (H, W) or (H, W, 3)
    except Exception:
        return None
    pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels  # (H, W, C)
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())  # (C, H, W)


def decode(uploads: Sequence[bytes], grey: bool, device: str) -> list[torch.Tensor | None]:
    """uint8 (C, H, W) pixels on `device` per upload, before orientation; None where the decoder refused it."""
    tv_io = _torchvision_io()
    if tv_io is None:
        pixels = [_pil_pixels(data, grey) for data in uploads]
        return [p.to(device) if p is not None else None for p in pixels]
    mode = tv_io.ImageReadMode.GRAY if grey else tv_io.ImageReadMode.RGB
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in uploads]  # each (nbytes,)
    try:
        return list(tv_io.decode_jpeg(encoded, mode=mode, device=device))
    except RuntimeError:  # one bad image fails the whole batch: find which, keep the others
        out: list[torch.Tensor | None] = []
        for one in encoded:
            try:
                out.append(tv_io.decode_jpeg([one], mode=mode, device=device)[0])
            except RuntimeError:
                out.append(None)
        return out


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as PIL.ImageOps.exif_transpose turns it for EXIF orientation 1..8."""
    if orientation == 2:
        return pixels.flip(-1)  # mirrored left-right
    if orientation == 3:
        return pixels.flip(-2, -1)  # rotated 180
    if orientation == 4:
        return pixels.flip(-2)  # mirrored top-bottom
    if orientation == 5:
        return pixels.transpose(-2, -1)  # (C, W, H), transposed
    if orientation == 6:
        return pixels.rot90(-1, dims=(-2, -1))  # (C, W, H), turned clockwise
    if orientation == 7:
        return pixels.transpose(-2, -1).flip(-2, -1)  # (C, W, H), transversed
    if orientation == 8:
        return pixels.rot90(1, dims=(-2, -1))  # (C, W, H), turned anticlockwise
    return pixels


def resize_crop_normalise(pixels: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (C, H, W) -> float32 (C, S, S) model input, as model.preprocess's resize_and_crop + normalize."""
    _, height, width = pixels.shape
    new_w, new_h, left, top = crop_geometry(width, height, prep)
    x = pixels.unsqueeze(0).float()  # (1, C, H, W)
    if (new_w, new_h) != (width, height):
        mode = INTERPOLATION[prep.interpolation]
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=mode != "nearest-exact")  # (1, C, h, w)
        x = x.round().clamp(0, 255)  # PIL resamples to 8 bits
    size = prep.img_size
    x = x[0, :, top : top + size, left : left + size]  # (C, S, S)
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)  # (C, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)  # (C, 1, 1)
    return (x / 255.0 - mean) / std


@dataclass(frozen=True)
class GpuDecoder:
    """A request's uploads -> model inputs on `device`, None for each upload the PIL path must take."""

    prep: Preprocessing
    device: str
    max_pixels: int | None = None

    def __call__(self, uploads: Sequence[bytes]) -> list[torch.Tensor | None]:
        if not supports(self.prep):
            return [None] * len(uploads)
        orientations = [probe(data, self.max_pixels) for data in uploads]
        taken = [i for i, o in enumerate(orientations) if o is not None]
        out: list[torch.Tensor | None] = [None] * len(uploads)
        if not taken:
            return out
        decoded = decode([uploads[i] for i in taken], self.prep.in_chans == 1, self.device)
        with torch.inference_mode():
            for i, pixels in zip(taken, decoded, strict=True):
                if pixels is not None:
                    out[i] = resize_crop_normalise(orient(pixels, orientations[i]), self.prep)
        if self.device.startswith("cuda"):  # done before the batcher's thread reads them on its own stream
            torch.cuda.current_stream(self.device).synchronize()
        return out


def decoder_available(device: str) -> bool:
    """Whether nvJPEG decoding can run on `device`: a CUDA device and torchvision's image ops."""
    return device.startswith("cuda") and torch.cuda.is_available() and _torchvision_io() is not None
