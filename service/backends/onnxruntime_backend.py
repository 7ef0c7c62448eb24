"""The ONNX Runtime backend: model.onnx on the CPU or CUDA execution provider."""

from __future__ import annotations

import logging
import os

import numpy as np

from export.artifacts import INPUT_NAME, OUTPUT_NAMES

from ..artifacts import ServedArtifacts
from .base import BackendUnavailable, gpu_index

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    """model.onnx in ONNX Runtime: CUDA EP when asked and present.

    On CPU, `streams` runs at once (0: one per core, up to 4), each with its share of the intra-op
    threads; ORT sessions allow concurrent `run` calls. On CUDA, one.
    """

    name = "onnxruntime"
    selects_tokens = False  # infer returns every row's tokens
    precision = "fp32"

    def __init__(self, served: ServedArtifacts, *, gpu: bool, device: str = "cpu", threads: int = 0, streams: int = 0):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if gpu and "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(f"ONNX Runtime has no CUDAExecutionProvider (providers: {', '.join(available)})")
        path = served.file("onnx")
        if path is None:
            raise BackendUnavailable(f"no ONNX model (files.onnx) in {served.folder}")
        cores = threads or os.cpu_count() or 1
        self.streams = 1 if gpu else (streams or min(4, cores))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads or self.streams > 1:
            options.intra_op_num_threads = max(1, cores // self.streams)
        # Spinning intra-op threads would only steal the CPU of the other streams and of the event loop.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if gpu:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu_index(device)}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.path = path
        self.device = session_device(self.session, f"cuda:{gpu_index(device)}" if gpu else "cpu")
        self._outputs = [o.name for o in self.session.get_outputs()]
        if not set(OUTPUT_NAMES) <= set(self._outputs):
            raise BackendUnavailable(f"{path.name} lacks the outputs {', '.join(OUTPUT_NAMES)} (has {self._outputs})")

    def infer(self, images: np.ndarray, token_rows: object = None) -> tuple[np.ndarray, np.ndarray]:
        """Every row's tokens: `token_rows` is ignored (selects_tokens is False)."""
        feed = {INPUT_NAME: np.ascontiguousarray(images, np.float32)}
        logits, tokens = self.session.run(list(OUTPUT_NAMES), feed)
        return logits.astype(np.float32, copy=False), tokens.astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


def session_device(session, requested: str) -> str:
    """The device an ONNX Runtime session really runs on, from `get_providers()` (not from what was asked).

    ORT falls back to CPU with only a warning when the CUDA provider fails to load (CUDA or cuDNN libraries
    missing or of another major version); the backend then reports "cpu" and says why in one log line.
    """
    active = session.get_providers()
    if requested.startswith("cuda") and "CUDAExecutionProvider" not in active:
        log.warning(
            "ONNX Runtime's CUDA execution provider did not load (session providers: %s); running on cpu",
            ", ".join(active),
        )
        return "cpu"
    return requested
