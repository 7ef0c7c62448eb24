"""Pure functions from model outputs to answers: logits -> top-k, tokens -> CAM grid -> PNGs."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from model.preprocess import resample_rgb, to_model_mode


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


# jet at 256 levels: colouring a map is then one uint8 table look-up per pixel instead of float arithmetic.
JET_TABLE = jet(np.linspace(0.0, 1.0, 256, dtype=np.float32))  # (256, 3) uint8

CAM_MAX_SIDE = 256
JPEG_QUALITY = 90


def fit_within(size: tuple[float, float], max_side: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, so that the longer side is at most max_side; never up."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def levels(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 0..1 map (h, w) upsampled to size (width, height) as uint8 levels 0..255: (height, width)."""
    return (upsample(grid, size) * 255.0 + 0.5).astype(np.uint8)


def jet_image(map_levels: np.ndarray) -> Image.Image:
    """uint8 levels (H, W) -> a palette ("P") image whose palette is jet: one byte a pixel until drawn."""
    height, width = map_levels.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(map_levels).tobytes())
    image.putpalette(JET_TABLE.tobytes())
    return image


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def palette_png(indices: np.ndarray, palette: np.ndarray) -> bytes:
    """uint8 palette indices (H, W) and their (256, 3) uint8 colours -> a PNG file (colour type 3, 8 bits).

    Each row is stored with PNG's Up filter (its difference to the row above), which PIL does not use for palette
    images: a smooth heatmap's rows differ little, so zlib's fastest level packs them into ~2/3 of the bytes of
    PIL's unfiltered PNG in ~half its time. The file is standard PNG that any decoder reads.
    """
    height, width = indices.shape
    rows = np.empty((height, width + 1), np.uint8)  # (H, 1 + W): each row's filter type byte, then its bytes
    rows[:, 0] = 2  # Up
    rows[0, 1:] = indices[0]  # the first row's "row above" is zeros
    np.subtract(indices[1:], indices[:-1], out=rows[1:, 1:])  # modulo 256, as the filter is defined
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit palette, deflate, no interlace
    return b"".join(
        (
            PNG_SIGNATURE,
            png_chunk(b"IHDR", header),
            png_chunk(b"PLTE", np.ascontiguousarray(palette, np.uint8).tobytes()),
            png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)),  # fastest level: responses, not archives
            png_chunk(b"IEND", b""),
        )
    )


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC-32 of type and body."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def jpeg_base64(image: Image.Image, quality: int = JPEG_QUALITY) -> str:
    """PIL RGB image -> base64 JPEG: a photo with a heatmap on it encodes ~20x faster than as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class CamImages:
    grid: list[list[float]]
    width: int
    height: int
    heatmap_png: str
    overlay_jpeg: str


def render_cam(
    grid: np.ndarray, original: Image.Image, max_side: int = CAM_MAX_SIDE, extent: tuple[float, float] | None = None
) -> CamImages:
    """A normalised grid (h, w) -> the response's grid, a jet heatmap PNG and an overlay JPEG on the image.

    Both pictures are drawn at the image's size scaled down to at most `max_side` on the longer side
    (the client scales them up to the photo), so the cost does not grow with the upload. `extent` is the image's
    width and height in `original`'s pixels when it was box-reduced already (`box_reduce`, which the service runs
    with the decode); else `original` is reduced here, the same way. Every pixel step is one of PIL's C loops
    (box reduction, palette look-up, 50/50 blend), torch's (the bilinear scaling of an RGB picture) or numpy's
    (the heatmap PNG's row filter).
    """
    if extent is None:
        original, extent = box_reduce(original, max_side)
    size = fit_within(extent, max_side)
    base = scale_picture(original, size, extent)
    map_levels = levels(grid, size)  # (H, W) uint8
    heatmap = jet_image(map_levels)
    return CamImages(
        grid=grid.astype(float).tolist(),
        width=size[0],
        height=size[1],
        heatmap_png=base64.b64encode(palette_png(map_levels, JET_TABLE)).decode("ascii"),
        overlay_jpeg=jpeg_base64(Image.blend(base.convert("RGB"), heatmap.convert("RGB"), 0.5)),
    )


def box_reduce(image: Image.Image, max_side: int) -> tuple[Image.Image, tuple[float, float]]:
    """The picture a CAM overlay is drawn on, and the image's extent in its pixels: in L or RGB, box-reduced by the
    largest integer factor that keeps it at least the size `max_side` fits it to (so under twice that a side).
    The extent is exact: a side of 427 reduced by 2 is 213.5, its last pixel row half of one, and scaling that
    region keeps the picture unshifted. The service runs this cheap step with the decode, and render_cam's scaling
    on the CAM pool's threads, so that the decode pool's threads, which fill the batches, spend little on pictures.
    """
    if image.mode not in ("L", "RGB"):  # Image.reduce takes neither palette nor 16-bit images
        image = to_model_mode(image, 3)  # as the model sees it: 16-bit scaled, transparency on white
    width, height = fit_within(image.size, max_side)
    fx, fy = image.width // width, image.height // height
    extent = (image.width / fx, image.height / fy)
    return (image.reduce((fx, fy)) if (fx, fy) != (1, 1) else image), extent


def scale_picture(picture: Image.Image, size: tuple[int, int], extent: tuple[float, float]) -> Image.Image:
    """The `extent` region of a box-reduced picture (under twice `size` a side) scaled to `size`, bilinear and
    antialiased: torch's 8-bit kernel for RGB (0.26-0.41 ms for the benchmark's photos at 256 px, PIL's 0.55-1.17;
    within one level of PIL's), PIL's for grey pictures."""
    if picture.size == size:
        return picture
    if picture.mode == "RGB":
        return Image.fromarray(resample_rgb(np.array(picture), *size, "bilinear", extent))
    return picture.resize(size, Image.Resampling.BILINEAR, box=(0, 0, *extent))
