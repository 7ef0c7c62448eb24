"""The PyTorch backend: the model rebuilt from the export's state dict, run by the one serving forward.

On CPU it runs eager fp32. On a CUDA device it takes the fast path (torch_cuda.py), which needs nothing but PyTorch:
  1. precision  fp16 and bf16 twins (Performer kernels in fp32, in the export's stable form) are measured against
                fp32 on real images at load; the passing one closest to fp32 is served, else fp32 with one log line
                (the gate: finite outputs, every top-1 the same, max logit difference within GATE_TOLERANCE)
  2. graphs     a CUDA graph per batch bucket (powers of two up to GRAPH_MAX_BATCH), captured at load
  3. copies     pinned host buffers and non-blocking copies on the backend's own stream
  4. tokens     `infer(images, token_rows)` copies the last-cell tokens to the host only for those rows
`precision_reason` and `precision_gate` say what was measured and why; /readyz and /model report them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from export.artifacts import LOGITS, TOKENS

from ..artifacts import ServedArtifacts
from .base import BackendUnavailable

log = logging.getLogger(__name__)

GRAPH_MAX_BATCH = 256  # larger batches run in chunks of this size


class TorchBackend:
    """The PyTorch model rebuilt from the export's state dict: eager fp32 on CPU, the fast path on CUDA."""

    name = "torch"
    streams = 1  # one batch at a time
    selects_tokens = True  # infer(images, token_rows) returns those rows' tokens only

    def __init__(
        self,
        served: ServedArtifacts,
        device: str = "cpu",
        threads: int = 0,
        precision: str = "auto",
        graphs: bool = True,
        max_batch: int = GRAPH_MAX_BATCH,
    ) -> None:
        import torch

        from export.serving import ServingModel, rebuild_model

        weights = served.file("weights")
        if weights is None:
            raise BackendUnavailable(f"no PyTorch weights (files.weights) in {served.folder}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("PyTorch sees no CUDA device")
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda:0" if device == "cuda" else device
        self.model = rebuild_model(served.metadata, weights).eval()
        self.model.requires_grad_(False)
        self.precision, self.precision_gate = "fp32", []  # the gate's figures per candidate
        self.precision_reason = None if self.device == "cpu" else "fp32, as asked for"  # None: nothing was chosen
        self._module = ServingModel(self.model).to(self.device)
        self._graphs = None
        if self.device.startswith("cuda"):
            self._cuda_fast_path(served, precision, graphs, max_batch)

    def _cuda_fast_path(self, served: ServedArtifacts, precision: str, graphs: bool, max_batch: int) -> None:
        from export.inputs import model_inputs

        from .torch_cuda import GATE_IMAGES, GraphRunner, choose_precision

        if precision != "fp32":
            images, origin = model_inputs(served.preprocessing, GATE_IMAGES)
            candidates = ("fp16", "bf16") if precision == "auto" else (precision,)
            self.precision, self._module, self.precision_gate = choose_precision(
                self.model, images, self.device, candidates
            )
            self.precision_reason = _reason(self.precision, self.precision_gate, origin)
            if self.precision == "fp32":
                log.warning("torch on %s serves fp32: %s", self.device, self.precision_reason)
        if graphs:
            prep = served.preprocessing
            shape = (prep.in_chans, prep.img_size, prep.img_size)
            self._graphs = GraphRunner(self._module, shape, max_batch, self.device)
            self.precision_reason += f"; CUDA graphs for batches {self._graphs.sizes}"

    def infer(self, images: Any, token_rows: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """images (B, C, S, S) -> logits (B, K), tokens (B, N, D); with `token_rows`, tokens of those rows only.

        `images` is a float32 numpy array, or a tensor already on the device (uploads decoded by service.gpu_decode).
        """
        if self._graphs is None:
            return self._eager(images, token_rows)
        chunk = self._graphs.sizes[-1]
        if len(images) <= chunk:
            return self._graphs(images, token_rows)
        wanted = range(len(images)) if token_rows is None else token_rows
        parts = [
            self._graphs(images[s : s + chunk], [r - s for r in wanted if s <= r < s + chunk])
            for s in range(0, len(images), chunk)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _eager(self, images: Any, token_rows: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from export.serving import serving_outputs

        if isinstance(images, torch.Tensor):
            with torch.inference_mode():
                logits, tokens = self._module(images.to(self.device, torch.float32))  # (B, K), (B, N, D)
            picked = tokens if token_rows is None else tokens[list(token_rows)]
            return logits.float().cpu().numpy(), picked.float().cpu().numpy()
        outputs = serving_outputs(self._module, images, self.device)
        tokens = outputs[TOKENS] if token_rows is None else outputs[TOKENS][list(token_rows)]
        return outputs[LOGITS], tokens

    def close(self) -> None:
        self.model = self._module = self._graphs = None


def _reason(precision: str, figures: list[dict], origin: str) -> str:
    """One line: what each candidate measured against fp32, and what is served."""
    measured = "; ".join(
        f"{f['precision']} top-1 {f['top1_agree']}/{f['images']}, max |logits diff| {f['max_abs_logit_diff']:.3g} "
        f"(allowed {f['tolerance']:g} x {f['logit_scale']:.3g}), {'passed' if f['passed'] else 'refused'}"
        for f in figures
    )
    chosen = f"{precision}: the passing half precision closest to fp32" if precision != "fp32" else "fp32: none passed"
    return f"{chosen} ({measured}; on {origin})"
