"""The TensorRT backend: model.plan, when it was built for this GPU and TensorRT version."""

from __future__ import annotations

import numpy as np

from export.artifacts import INPUT_NAME, LOGITS, OUTPUT_NAMES, TOKENS
from export.engine.machine import plan_fits

from ..artifacts import ServedArtifacts
from .base import BackendUnavailable, gpu_index


class TensorRTBackend:
    """model.plan through `export.engine.runner.PlanRunner` (name-based I/O, CUDA memory from PyTorch).

    Written against the documented API (deserialize_cuda_engine, set_input_shape, set_tensor_address,
    execute_async_v3); not run on this project's CPU machines.
    """

    name = "tensorrt"
    selects_tokens = False  # infer returns every row's tokens
    streams = 1  # one batch at a time

    def __init__(self, served: ServedArtifacts, device: str = "cuda") -> None:
        try:
            import tensorrt  # noqa: F401  (only to say clearly when it is missing)
            import torch
        except ImportError as exc:
            raise BackendUnavailable(f"the tensorrt package is not installed ({exc})") from exc
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device for TensorRT")
        plan = served.file("plan")
        if plan is None:
            raise BackendUnavailable(f"no TensorRT engine (files.plan) in {served.folder}")
        matches, why = plan_fits(served.metadata.tensorrt)
        if not matches:
            raise BackendUnavailable(f"model.plan was built elsewhere: {why}")
        from export.engine.runner import PlanRunner

        self.device = f"cuda:{gpu_index(device)}"
        self.precision = str(served.metadata.settings.get("precision", "fp16"))
        try:
            self.runner = PlanRunner(plan.read_bytes(), self.device)
        except Exception as exc:  # CUDA that cannot start raises here (e.g. TypeError, CUDA error 35)
            raise BackendUnavailable(f"TensorRT cannot start: {type(exc).__name__}: {exc} ({plan})") from exc
        missing = {INPUT_NAME, *OUTPUT_NAMES} - set(self.runner.dtypes)
        if missing:
            raise BackendUnavailable(f"model.plan lacks the tensors {sorted(missing)}")

    def infer(self, images: np.ndarray, token_rows: object = None) -> tuple[np.ndarray, np.ndarray]:
        """Every row's tokens: `token_rows` is ignored (selects_tokens is False)."""
        outputs = self.runner(images)
        return outputs[LOGITS], outputs[TOKENS]

    def close(self) -> None:
        self.runner.close()
