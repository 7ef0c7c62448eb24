"""What the batchers run: image bytes -> model input (thread pool), batches -> outputs (worker thread)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from model import Preprocessing
from model.preprocess import decode_image, preprocess, resize_size, stored_size

from .artifacts import ServedArtifacts
from .backends import Backend, infer_rows
from .gradcam import AutogradGradCAM
from .numerics import Guarded, NonFiniteGuard
from .postprocess import box_reduce, last_cell_cam

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class PreparedImage:
    pixels: Any  # float32 (C, S, S), normalised: numpy, or a torch tensor on the GPU (service.gpu_decode)
    original: Image.Image | None  # kept only when a CAM overlay will be drawn on it: box_reduce
    extent: tuple[float, float] | None = None  # the upload's width and height in `original`'s pixels


def prepare_image(data: bytes, prep: Preprocessing, *, max_pixels: int, cam_max_side: int | None) -> PreparedImage:
    """Bytes -> model input through model.preprocess, the functions the trainer's evaluation uses.

    Large JPEGs decode in draft mode at about the model's size. When a CAM overlay is wanted (`cam_max_side` given), the
    image is kept for it too, reduced to under twice cam_max_side a side (`postprocess.box_reduce`; render_cam draws at
    most cam_max_side): drawing PNGs costs time and memory in proportion to their pixels, so that bounds the work of a
    CAM whatever the upload's size. The picture decoded for the model is reused when it is at least cam_max_side; a JPEG
    drafted smaller than that (a small model input) is decoded again, in draft mode at about cam_max_side, for a sharp
    overlay (one decoded at its stored size is not: it would come out the same). The model input, and so the logits,
    never depend on whether a CAM was asked for.
    Raises model.preprocess.ImageDecodeError / ImageTooLargeError.
    """
    image = decode_image(data, max_pixels=max_pixels, target_size=resize_size(prep))
    pixels = preprocess(image, prep)
    if cam_max_side is None:
        return PreparedImage(pixels, None)
    if data.startswith(JPEG_MAGIC) and max(image.size) < cam_max_side and image.size != stored_size(data):
        image = decode_image(data, max_pixels=max_pixels, target_size=cam_max_side)
    return PreparedImage(pixels, *box_reduce(image, cam_max_side))


@dataclass(frozen=True)
class ClassifyInput:
    pixels: Any  # (C, S, S): numpy, or a torch tensor on the backend's device
    cam: bool  # compute the last-cell CAM from the backend's tokens
    cam_class: int | None  # None: the image's top-1 class
    tokens: bool = False  # answer the last-cell tokens (v2's `tokens` output)


@dataclass(frozen=True)
class ClassifyOutput:
    logits: np.ndarray  # (K,)
    cam_class: int | None
    cam_raw: np.ndarray | None  # (h, w), before ReLU
    tokens: np.ndarray | None = None  # (N, D) last-cell tokens when asked for (cam or tokens), a view into the batch's
    failure: str | None = None  # why this image has no answer (outputs not finite); its request answers 500


def stack(pixels: Sequence[Any]) -> Any:
    """(C, S, S) images -> one (B, C, S, S) batch: numpy, or a tensor on the device of the first device tensor."""
    if all(isinstance(p, np.ndarray) for p in pixels):
        return np.stack(pixels)
    import torch

    device = next(p.device for p in pixels if isinstance(p, torch.Tensor))
    return torch.stack([torch.as_tensor(p).to(device) for p in pixels])


def classify_batch(
    backend: Backend, served: ServedArtifacts, inputs: Sequence[ClassifyInput], guard: NonFiniteGuard | None = None
) -> list[ClassifyOutput]:
    """One backend call for the batch (through `guard`, when given); last-cell CAMs for the images that asked.

    Tokens come back (from the device, with PyTorch on CUDA) only for the images whose request wants them.
    """
    images = stack([item.pixels for item in inputs])  # (B, C, S, S)
    token_rows = [i for i, item in enumerate(inputs) if item.cam or item.tokens]
    if guard is not None:
        out = guard(images, token_rows)
    else:
        out = Guarded(*infer_rows(backend, images, token_rows), {}, token_rows)
    logits, failed = out.logits, out.failed  # (B, K)
    want = [i for i, item in enumerate(inputs) if item.cam and i not in failed]
    targets = {i: inputs[i].cam_class if inputs[i].cam_class is not None else int(np.argmax(logits[i])) for i in want}
    maps = {}
    if want:
        tokens = np.stack([out.tokens_of(i) for i in want])  # (W, N, D)
        raw = last_cell_cam(tokens, served.head_weight, np.array([targets[i] for i in want]), served.grid)
        maps = dict(zip(want, raw, strict=True))
    return [
        ClassifyOutput(logits[i], targets.get(i), maps.get(i), out.tokens_of(i), failed.get(i))
        for i in range(len(inputs))
    ]


@dataclass(frozen=True)
class GradCAMInput:
    pixels: np.ndarray  # (C, S, S)
    cam_class: int
    layer: int  # index into gradcam.cells(model)


def gradcam_batch(explainer: AutogradGradCAM, inputs: Sequence[GradCAMInput]) -> list[np.ndarray]:
    """Raw autograd Grad-CAM maps, one backward per distinct layer in the batch (usually one)."""
    out: list[np.ndarray | None] = [None] * len(inputs)
    for layer in sorted({item.layer for item in inputs}):
        rows = [i for i, item in enumerate(inputs) if item.layer == layer]
        images = np.stack([inputs[i].pixels for i in rows])
        _, raw = explainer(images, [inputs[i].cam_class for i in rows], layer)
        for i, grid in zip(rows, raw, strict=True):
            out[i] = grid
    return out
