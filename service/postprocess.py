"""Pure functions from model outputs to answers: logits -> top-k, tokens -> CAM grid -> PNGs."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, in float64 for scores that sum to 1."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, class_names: list[str], k: int) -> list[Prediction]:
    """The k most probable classes of one image's logits (K,), most probable first."""
    probs = softmax(logits)
    # Stable sort on -p keeps the lower index first among ties, so answers are deterministic.
    order = np.argsort(-probs, kind="stable")[:k]
    return [Prediction(int(i), class_names[i], float(probs[i])) for i in order]


def last_cell_cam(
    tokens: np.ndarray, head_weight: np.ndarray, targets: np.ndarray, grid: tuple[int, int]
) -> np.ndarray:
    """Raw (pre-ReLU) Grad-CAM at the last cell of a mean-pooled model, with no backward pass.

    logits = mean_n(W x_n) + b, so d logit_c / d x_n = W_c / N for every token and Grad-CAM's
    channel weights are W_c / N: the map is (W_c . x_n) / N. Its sum over n is logit_c - b_c.
    tokens (B, N, D), head_weight (K, D), targets (B,) -> maps (B, h, w), float64.
    """
    B, N, D = tokens.shape
    h, w = grid
    if N != h * w:
        raise ValueError(f"{N} tokens do not form the {h}x{w} grid of the metadata")
    class_weights = head_weight[targets].astype(np.float64)  # (B, D)
    raw = np.einsum("bnd,bd->bn", tokens.astype(np.float64), class_weights) / N  # (B, N)
    return raw.reshape(B, h, w)


def normalize_cam(raw: np.ndarray) -> np.ndarray:
    """ReLU then per-image min-max to 0..1; a flat map becomes all zeros. (..., h, w) -> same shape."""
    cam = np.maximum(raw, 0.0)
    flat = cam.reshape(*cam.shape[:-2], -1)
    low = flat.min(axis=-1)[..., None, None]
    span = (flat.max(axis=-1) - flat.min(axis=-1))[..., None, None]
    return np.where(span > 0, (cam - low) / np.where(span > 0, span, 1.0), 0.0)


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling (PIL) of a 0..1 map (h, w) to size (width, height); float32 (height, width)."""
    image = Image.fromarray(grid.astype(np.float32), mode="F")
    return np.clip(np.asarray(image.resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)


def jet(values: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map, blue (0) -> red (1): float map (H, W) -> uint8 RGB (H, W, 3)."""
    v = np.clip(values, 0.0, 1.0)[..., None]  # (H, W, 1)
    centres = np.array([0.75, 0.5, 0.25], dtype=np.float32)  # where red, green and blue peak
    rgb = np.clip(1.5 - np.abs(4.0 * (v - centres)), 0.0, 1.0)  # (H, W, 3)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a uint8 RGB heatmap over the image (any mode), both at the image's size."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return (base * (1 - alpha) + heatmap.astype(np.float32) * alpha + 0.5).astype(np.uint8)


def png_base64(pixels: np.ndarray) -> str:
    """uint8 RGB array -> base64 PNG (fast compression: these are responses, not archives)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class CamImages:
    grid: list[list[float]]
    width: int
    height: int
    heatmap_png: str
    overlay_png: str


def render_cam(grid: np.ndarray, original: Image.Image) -> CamImages:
    """A normalised grid (h, w) -> the response's grid plus heatmap and overlay PNGs at the original size."""
    width, height = original.size
    heatmap = jet(upsample(grid, (width, height)))
    return CamImages(
        grid=grid.astype(float).tolist(),
        width=width,
        height=height,
        heatmap_png=png_base64(heatmap),
        overlay_png=png_base64(overlay(original, heatmap)),
    )
