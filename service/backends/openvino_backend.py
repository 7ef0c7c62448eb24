"""The OpenVINO CPU backend: model.onnx (fp32, bf16) or the export's int8 model, compiled once.

The precision comes from `cpu_precision.choose_cpu_precision`: a reduced one only where the CPU computes it
natively and the export measured it as safe for this model on a CPU of this kind.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import ServedArtifacts
from .base import BackendUnavailable
from .cpu_precision import PrecisionChoice, PrecisionRefused, choose_cpu_precision

__all__ = ["OpenVINOBackend", "PrecisionChoice", "PrecisionRefused", "choose_cpu_precision", "cpu_facts"]

log = logging.getLogger(__name__)

CACHE_FOLDER = "openvino_cache"


def cpu_facts(served: ServedArtifacts) -> dict[str, Any]:
    """choose_cpu_precision's arguments about this CPU and what the export measured for `served`."""
    from export.int8 import native_int8
    from export.precision import cpu_flags, cpu_kind, this_cpu_has_native_bf16

    flags = cpu_flags()
    return dict(
        native_bf16=this_cpu_has_native_bf16(),
        export_report=served.metadata.cpu_bf16,
        cpu_kind=cpu_kind(flags),
        native_int8=native_int8(flags),
        int8_report=served.metadata.cpu_int8,
    )


class OpenVINOBackend:
    """model.onnx (fp32, bf16) or the int8 model, compiled once by OpenVINO's CPU plugin (choose_cpu_precision).

    The compiled model is cached in `cache_dir` (default: openvino_cache/ in the artifacts folder), so
    a restart loads it instead of compiling again.

    `streams` (0: the plugin's choice under its THROUGHPUT hint; 1: one stream on every core, LATENCY)
    is how many batches run at once, each on its own infer request and its share of the cores: on a
    CPU, a few single-threaded streams keep every core busy where one batch spread over all the cores
    waits at each layer for its slowest thread. `infer` may be called from up to `streams` threads.

    With several streams, the model is also compiled once more with one stream on every core (the LATENCY
    hint): a batch that finds no other batch running takes that one, so a lone request is not computed on
    one core's share while the others idle. Batches that run beside another take the throughput streams.
    """

    name = "openvino"
    selects_tokens = False  # infer returns every row's tokens
    device = "cpu"

    def __init__(
        self,
        served: ServedArtifacts,
        *,
        precision: str = "auto",
        threads: int = 0,
        streams: int = 0,
        cache_dir: Path | None = None,
    ) -> None:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(f"the openvino package is not installed ({exc})") from exc
        from export.precision import compile_cpu

        choice = choose_cpu_precision(precision, **cpu_facts(served))
        self.precision, self.precision_reason = choice.precision, choice.reason
        # int8: the export's quantized model, its other layers in the precision it measured (int8_compute);
        # else model.onnx.
        role = "int8" if choice.precision == "int8" else "onnx"
        path = served.file(role)
        if path is None:
            raise BackendUnavailable(f"no {role} model (files.{role}) in {served.folder}")
        compute = int8_compute(served.metadata.cpu_int8) if choice.precision == "int8" else choice.precision
        self.cache_dir = cache_dir or served.folder / CACHE_FOLDER
        cache: Path | None = self.cache_dir
        try:
            try:
                self.compiled = compile_cpu(path, compute, threads=threads, streams=streams, cache_dir=cache)
            except OSError as exc:  # a read-only artifacts folder: compile every start rather than not serve
                log.warning("cannot write the OpenVINO cache in %s (%s); compiling without it", self.cache_dir, exc)
                cache = None
                self.compiled = compile_cpu(path, compute, threads=threads, streams=streams)
        except RuntimeError as exc:  # OpenVINO's own, many lines from core.cpp down: the line that says why
            raise BackendUnavailable(
                f"OpenVINO cannot compile {path} ({openvino_reason(exc)}); it is not a model the export writes: "
                f"export the checkpoint again into {served.folder} (python -m export), or remove the folder and "
                "start with VITAE_AUTO_EXPORT=true"
            ) from exc
        self.streams = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests: queue.SimpleQueue | None = queue.SimpleQueue()  # the idle infer requests, one per stream
        for _ in range(self.streams):
            self._requests.put(self.compiled.create_infer_request())
        # For a batch computed alone: every core on it (None with one stream, which is that already).
        self._alone = None
        if self.streams > 1:
            alone = compile_cpu(path, compute, threads=threads, streams=1, cache_dir=cache)
            self._alone = alone.create_infer_request()
        self._running = 0  # infer calls in progress
        self._running_lock = threading.Lock()
        outputs = {name for output in self.compiled.outputs for name in output.get_names()}
        if not {"logits", "tokens"} <= outputs:
            raise BackendUnavailable(f"{path.name} lacks the outputs logits and tokens (has {sorted(outputs)})")
        served_as = choice.precision + (f" (unquantized layers in {compute})" if choice.precision == "int8" else "")
        log.info("OpenVINO %s on CPU, %d stream(s): %s", served_as, self.streams, choice.reason)

    @property
    def runs_alone_on_every_core(self) -> bool:
        """Whether a batch that finds no other running takes every core (what the batcher's urgent window needs)."""
        return self._alone is not None

    def infer(self, images: np.ndarray, token_rows: object = None) -> tuple[np.ndarray, np.ndarray]:
        """Every row's tokens: `token_rows` is ignored (selects_tokens is False)."""
        with self._running_lock:
            alone = self._running == 0 and self._alone is not None
            self._running += 1
        # Alone: the every-core request; else a stream's, which never waits while callers are at most `streams`.
        request = self._alone if alone else self._requests.get()
        try:
            request.infer({"images": np.ascontiguousarray(images, np.float32)})
            # Copies: the request's output tensors are overwritten by its next call.
            logits = np.array(request.get_tensor("logits").data, dtype=np.float32)  # (B, K)
            tokens = np.array(request.get_tensor("tokens").data, dtype=np.float32)  # (B, N, D)
        finally:
            if not alone:
                self._requests.put(request)
            with self._running_lock:
                self._running -= 1
        return logits, tokens

    def close(self) -> None:
        # Dropped, not emptied: a call after close fails at once instead of waiting for a request forever.
        self._requests = None
        self._alone = None
        self.compiled = None


def int8_compute(report: dict[str, Any] | None) -> str:
    """The precision of the int8 model's unquantized layers: what the export measured as served (export.int8),
    fp32 for a record from before it measured more than one."""
    compute = (report or {}).get("compute") or "fp32"
    if compute not in ("fp32", "bf16"):
        raise BackendUnavailable(f"metadata.json cpu_int8.compute is {compute!r}; the export writes fp32 or bf16")
    return compute


def openvino_reason(exc: Exception) -> str:
    """The telling lines of an OpenVINO exception, on one line (its 'Exception from <file>:<line>' chain left out)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    telling = [line for line in lines if line and not line.startswith(("Exception from", "Check '"))]
    return " ".join(telling)[:300] or type(exc).__name__
