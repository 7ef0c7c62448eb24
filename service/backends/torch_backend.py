"""The PyTorch backend: the model rebuilt from the export's state dict, run by the one serving forward."""

from __future__ import annotations

import numpy as np

from export.artifacts import LOGITS, TOKENS

from ..artifacts import ServedModel
from .base import BackendUnavailable


class TorchBackend:
    """The PyTorch model rebuilt from the export's state dict (eager, inference mode)."""

    name = "torch"
    streams = 1  # one batch at a time
    precision = "fp32"

    def __init__(self, served: ServedModel, device: str = "cpu", threads: int = 0) -> None:
        import torch

        from export.serving import ServingModel, rebuild_model

        weights = served.file("weights")
        if weights is None:
            raise BackendUnavailable(f"no PyTorch weights (files.weights) in {served.folder}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("PyTorch sees no CUDA device")
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.model = rebuild_model(served.metadata, weights).eval()
        self.model.requires_grad_(False)
        self.model.to(device)
        self._serving = ServingModel(self.model)

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from export.serving import serving_outputs

        outputs = serving_outputs(self._serving, images, self.device)
        return outputs[LOGITS], outputs[TOKENS]

    def close(self) -> None:
        self.model = self._serving = None
