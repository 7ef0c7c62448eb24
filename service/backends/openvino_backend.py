"""The OpenVINO CPU backend and the choice of its precision (bf16 or fp32).

bf16 roughly doubles the throughput of a CPU with native bf16 (AVX512_BF16 or AMX). It is used only
where the export measured it as safe for this model (metadata.json, `cpu_bf16`), and only on such a CPU.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import ServedArtifacts
from .base import BackendUnavailable

log = logging.getLogger(__name__)

CPU_PRECISION_CHOICES = ("auto", "bf16", "fp32")
CACHE_FOLDER = "openvino_cache"


class PrecisionRefused(RuntimeError):
    """bf16 was asked for but cannot be served safely here; the message says why and what to do."""


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "bf16" or "fp32"
    reason: str


def choose_cpu_precision(
    requested: str, native_bf16: bool, export_report: dict[str, Any] | None, cpu_kind: str | None = None
) -> PrecisionChoice:
    """The CPU precision to serve, from the setting, the CPU's bf16 support and kind, and the export's measurement.

    auto -> bf16 when the CPU has native bf16 and the export measured bf16 as safe on a CPU of the same kind
    (export.precision.cpu_kind: AMX and AVX-512 bf16 run different kernels), else fp32;
    bf16 -> bf16 under the same conditions, else PrecisionRefused; fp32 -> fp32.
    """
    if requested not in CPU_PRECISION_CHOICES:
        raise ValueError(f"VITAE_CPU_PRECISION must be one of {', '.join(CPU_PRECISION_CHOICES)}, got {requested!r}")
    if requested == "fp32":
        return PrecisionChoice("fp32", "VITAE_CPU_PRECISION=fp32")
    report = export_report or {}
    safe = report.get("safe")
    if not native_bf16:
        why = "this CPU has no native bf16 (AVX512_BF16 or AMX)"
    elif safe is None:
        why = "the export did not measure bf16 for this model (" + (report.get("reason") or "no cpu_bf16 record") + ")"
    elif not safe:
        why = f"the export measured bf16 as unsafe for this model ({report.get('reason')})"
    elif cpu_kind and report.get("cpu_kind") and report["cpu_kind"] != cpu_kind:
        why = (
            f"the export measured bf16 on a CPU of another kind ({report['cpu_kind']}, this one is {cpu_kind}); "
            "export again on this machine to measure it here"
        )
    else:
        figures = f"top-1 agreement {report.get('top1_agreement')} %, max logit diff {report.get('max_logit_diff')}"
        return PrecisionChoice("bf16", f"VITAE_CPU_PRECISION={requested}: native bf16, measured safe ({figures})")
    if requested == "bf16":
        raise PrecisionRefused(f"VITAE_CPU_PRECISION=bf16 refused: {why}; use auto or fp32")
    return PrecisionChoice("fp32", f"VITAE_CPU_PRECISION=auto: fp32 because {why}")


class OpenVINOBackend:
    """model.onnx compiled once by OpenVINO's CPU plugin, in bf16 or fp32 (see choose_cpu_precision).

    The compiled model is cached in `cache_dir` (default: openvino_cache/ in the artifacts folder), so
    a restart loads it instead of compiling again.

    `streams` (0: the plugin's choice under its THROUGHPUT hint; 1: one stream on every core, LATENCY)
    is how many batches run at once, each on its own infer request and its share of the cores: on a
    CPU, a few single-threaded streams keep every core busy where one batch spread over all the cores
    waits at each layer for its slowest thread. `infer` may be called from up to `streams` threads.
    """

    name = "openvino"
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
        from export.precision import compile_cpu, cpu_flags, cpu_kind, this_cpu_has_native_bf16

        path = served.file("onnx")
        if path is None:
            raise BackendUnavailable(f"no ONNX model (files.onnx) in {served.folder}")
        choice = choose_cpu_precision(
            precision, this_cpu_has_native_bf16(), served.metadata.cpu_bf16, cpu_kind(cpu_flags())
        )
        self.precision, self.precision_reason = choice.precision, choice.reason
        self.cache_dir = cache_dir or served.folder / CACHE_FOLDER
        try:
            self.compiled = compile_cpu(
                path, choice.precision, threads=threads, streams=streams, cache_dir=self.cache_dir
            )
        except PermissionError:  # a read-only artifacts folder: compile every start rather than not serve
            log.warning("cannot write the OpenVINO cache in %s; compiling without it", self.cache_dir)
            self.compiled = compile_cpu(path, choice.precision, threads=threads, streams=streams)
        self.streams = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests: queue.SimpleQueue | None = queue.SimpleQueue()  # the idle infer requests, one per stream
        for _ in range(self.streams):
            self._requests.put(self.compiled.create_infer_request())
        outputs = {name for output in self.compiled.outputs for name in output.get_names()}
        if not {"logits", "tokens"} <= outputs:
            raise BackendUnavailable(f"{path.name} lacks the outputs logits and tokens (has {sorted(outputs)})")
        log.info("OpenVINO %s on CPU, %d stream(s): %s", choice.precision, self.streams, choice.reason)

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request = self._requests.get()  # never waits while callers are at most `streams`
        try:
            request.infer({"images": np.ascontiguousarray(images, np.float32)})
            # Copies: the request's output tensors are overwritten by its next call.
            logits = np.array(request.get_tensor("logits").data, dtype=np.float32)  # (B, K)
            tokens = np.array(request.get_tensor("tokens").data, dtype=np.float32)  # (B, N, D)
        finally:
            self._requests.put(request)
        return logits, tokens

    def close(self) -> None:
        # Dropped, not emptied: a call after close fails at once instead of waiting for a request forever.
        self._requests = None
        self.compiled = None
