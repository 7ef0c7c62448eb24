"""Keeping NaN and infinity out of answers.

1. Up front: preprocessed inputs (the v2 `images` tensor) must lie in the range the preprocessing can produce,
   with a margin (`accepted_range`); anything else is the client's error (400), never a model overflow.
2. After the backend: a batch's rows whose logits, or tokens where they were returned (the rows whose request
   wants them: `token_rows`), are not all finite never become answers (`NonFiniteGuard`). When the backend
   computes in reduced precision (OpenVINO bf16, fp16 on a GPU), those images are recomputed at fp32 by ONNX
   Runtime on the CPU; when they are still not finite, or the backend already computes in fp32, each gets a
   failure that the request answers as a 500 naming the cause.
   The first event of each kind is logged (a warning, once per process run); every image is counted in
   `vitae_nonfinite_images_total`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from model import Preprocessing

from .artifacts import ServedArtifacts
from .backends import Backend, OnnxRuntimeBackend, infer_rows, precision_of
from .metrics import Metrics

log = logging.getLogger(__name__)

# Raw pixels are 0..1; a client's own resize (bicubic overshoot) or normalisation may stray beyond that, so
# preprocessed inputs are accepted for raw pixels in -1..2: one whole range of margin on either side.
RAW_LOW, RAW_HIGH = -1.0, 2.0
FULL_PRECISION = ("fp32", "unreported")  # "unreported": a caller's backend (create_app(backend=...))


def accepted_range(prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the lowest and highest preprocessed value accepted: raw pixels RAW_LOW..RAW_HIGH normalised."""
    mean, std = np.asarray(prep.mean, np.float64), np.asarray(prep.std, np.float64)
    return (RAW_LOW - mean) / std, (RAW_HIGH - mean) / std


def range_problem(pixels: np.ndarray, prep: Preprocessing, name: str) -> str | None:
    """Why preprocessed `pixels` (B, C, S, S) are outside what the model takes, or None when they are fine."""
    if not np.isfinite(pixels).all():
        return f"input '{name}' holds NaN or infinite values"
    low, high = accepted_range(prep)
    below = pixels.min(axis=(2, 3)) < low  # (B, C)
    above = pixels.max(axis=(2, 3)) > high
    if not (below | above).any():
        return None
    image, channel = (int(i) for i in np.argwhere(below | above)[0])
    values = pixels[image, channel]
    bounds = ", ".join(f"{lo:.4g}..{hi:.4g}" for lo, hi in zip(low, high, strict=True))
    return (
        f"input '{name}' image {image} channel {channel} holds values {values.min():.4g}..{values.max():.4g}, "
        f"outside the model's range; accepted per channel: {bounds} (pixels {RAW_LOW:g}..{RAW_HIGH:g} normalised "
        f"with mean {list(prep.mean)} and std {list(prep.std)}; pixels 0..1 are the images the model was made for)"
    )


@dataclass(frozen=True)
class Guarded:
    logits: np.ndarray  # (B, K), finite in every row not in `failed`
    tokens: np.ndarray  # (R, N, D): the tokens of `token_rows`, in that order (every row's when it is None)
    failed: dict[int, str] = field(default_factory=dict)  # row -> why it has no answer
    token_rows: Sequence[int] | None = None

    def tokens_of(self, row: int) -> np.ndarray | None:
        """Batch row `row`'s (N, D) tokens, None when they were not returned."""
        if self.token_rows is None:
            return self.tokens[row]
        return self.tokens[list(self.token_rows).index(row)] if row in self.token_rows else None


def nonfinite_rows(logits: np.ndarray, tokens: np.ndarray, token_rows: Sequence[int] | None = None) -> list[int]:
    """Batch rows whose logits, or returned tokens (those of `token_rows`; every row's when None), are not finite."""
    bad = ~np.isfinite(logits).all(axis=1)  # (B,)
    finite_tokens = np.isfinite(tokens).all(axis=tuple(range(1, tokens.ndim)))  # (R,)
    rows = range(len(logits)) if token_rows is None else token_rows
    for row, finite in zip(rows, finite_tokens, strict=True):
        bad[row] |= not finite
    return [int(i) for i in np.flatnonzero(bad)]


def on_host(images: Any) -> np.ndarray:
    """A batch as a float32 numpy array (a device tensor from service.gpu_decode is copied to the host)."""
    if isinstance(images, np.ndarray):
        return images
    return images.detach().float().cpu().numpy()


class NonFiniteGuard:
    """Calls the backend and keeps non-finite rows out of the answers (see the module's docstring).

    `fallback` builds the fp32 backend on first need (an ONNX Runtime CPU session of the same model.onnx);
    it is called from the batcher's workers, so building it is locked. Being where the classify path calls the
    backend, it also counts the calling thread's CPU time inside those calls (`vitae_inference_thread_cpu_seconds`
    for `model`): runtimes such as OpenVINO and ONNX Runtime compute on the calling thread too, and that work is
    theirs, not the batch worker's.
    """

    def __init__(
        self, backend: Backend, fallback: Callable[[], Backend], metrics: Metrics, model: str = "classify"
    ) -> None:
        self.backend = backend
        self.precision = precision_of(backend)
        self._make_fallback = fallback
        self._fallback: Backend | None = None
        self._fallback_error: str | None = None
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        self._counter = metrics.nonfinite
        self._inference_cpu = metrics.inference_thread_cpu.labels(model)

    @classmethod
    def with_onnxruntime_fp32(
        cls, backend: Backend, served: ServedArtifacts, threads: int, metrics: Metrics, model: str = "classify"
    ):
        """The guard whose fp32 twin is an ONNX Runtime CPU session of the served model.onnx."""
        fallback = partial(OnnxRuntimeBackend, served, gpu=False, threads=threads, streams=1)
        return cls(backend, fallback, metrics, model)

    def _timed(self, infer: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """infer(*args, **kwargs), its CPU time on this thread counted as the inference runtime's."""
        started = time.thread_time()
        try:
            return infer(*args, **kwargs)
        finally:
            self._inference_cpu.inc(time.thread_time() - started)

    def __call__(self, images: Any, token_rows: Sequence[int] | None = None) -> Guarded:
        """The backend's outputs for `images` (B, C, S, S), tokens of `token_rows` only (every row's when None)."""
        logits, tokens = self._timed(infer_rows, self.backend, images, token_rows)  # (B, K), (R, N, D)
        rows = nonfinite_rows(logits, tokens, token_rows)
        if not rows:
            return Guarded(logits, tokens, {}, token_rows)
        if self.precision in FULL_PRECISION:
            return Guarded(logits, tokens, self._refuse(rows, len(images), f"computed in {self.precision}"), token_rows)
        fallback = self._get_fallback()
        if fallback is None:
            why = f"computed in {self.precision}; {self._fallback_error}"
            return Guarded(logits, tokens, self._refuse(rows, len(images), why), token_rows)
        again_logits, again_tokens = self._timed(fallback.infer, on_host(images)[rows])  # every recomputed row's tokens
        logits, tokens = self._replace(logits, tokens, token_rows, rows, again_logits, again_tokens)
        returned = [token_rows is None or row in token_rows for row in rows]  # whose tokens are answered
        still = [
            row
            for i, row in enumerate(rows)
            if not np.isfinite(again_logits[i]).all() or (returned[i] and not np.isfinite(again_tokens[i]).all())
        ]
        fixed = len(rows) - len(still)
        if fixed:
            self._counter.labels("recomputed_fp32").inc(fixed)
            self._log_once(
                "recomputed",
                "%s in %s gave non-finite outputs for %d of %d images; recomputed them at fp32 with ONNX Runtime "
                "(logged once; vitae_nonfinite_images_total counts every image)",
                self.backend.name,
                self.precision,
                len(rows),
                len(images),
            )
        failed = self._refuse(still, len(images), f"computed in {self.precision} and again in fp32") if still else {}
        return Guarded(logits, tokens, failed, token_rows)

    @staticmethod
    def _replace(logits, tokens, token_rows, rows, again_logits, again_tokens) -> tuple[np.ndarray, np.ndarray]:
        """The batch's outputs with `rows` recomputed: their logits, and their tokens where tokens were returned."""
        logits, tokens = logits.copy(), tokens.copy()  # a backend may hand out views of its own buffers
        logits[rows] = again_logits
        positions = range(len(logits)) if token_rows is None else token_rows
        for at, row in enumerate(positions):
            if row in rows:
                tokens[at] = again_tokens[rows.index(row)]
        return logits, tokens

    def _refuse(self, rows: list[int], batch: int, why: str | None) -> dict[int, str]:
        self._counter.labels("refused").inc(len(rows))
        reason = f"the model's outputs for this image are not finite (NaN or infinity): {why}"
        self._log_once(
            "refused",
            "%s gave non-finite outputs for %d of %d images, answered 500 (%s; logged once, "
            "vitae_nonfinite_images_total counts every image)",
            self.backend.name,
            len(rows),
            batch,
            why,
        )
        return dict.fromkeys(rows, reason)

    def _get_fallback(self) -> Backend | None:
        with self._lock:
            if self._fallback is None and self._fallback_error is None:
                try:
                    self._fallback = self._make_fallback()
                except Exception as exc:  # reported with every refused image, logged once
                    self._fallback_error = f"no fp32 backend to recompute them ({type(exc).__name__}: {exc})"
            return self._fallback

    def _log_once(self, kind: str, message: str, *args: object) -> None:
        with self._lock:
            first = kind not in self._logged
            self._logged.add(kind)
        if first:
            log.warning(message, *args)

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
