"""The PyTorch-CUDA fast path's parts: the half-precision twin of the model, its precision gate, and the CUDA-graph
runner with pinned host buffers. Used by `torch_backend.TorchBackend` on a CUDA device; the model and the gate
also run on CPU (that is how they are tested), the graph runner needs CUDA.

Written against the documented APIs (torch.cuda.CUDAGraph / torch.cuda.graph with a shared pool, warm-up on a side
stream before capture, pinned memory and non_blocking copies); not yet run on a GPU by this project.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from export.engine.parity import ENGINE_TOLERANCE
from export.performer import StableTokenPerformer, stable_performers
from export.serving import ServingModel

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# max |logits - fp32| <= tolerance x max(1, max |fp32 logits|), the rule a TensorRT plan passes (export.engine.parity).
# bf16 keeps 8 significant bits to FP16's 11 (a relative step 8x larger), so its bound is 4x FP16's.
GATE_TOLERANCE = {"fp16": ENGINE_TOLERANCE["fp16"], "bf16": 4 * ENGINE_TOLERANCE["fp16"]}
GATE_IMAGES = 64


class Fp32KernelPerformer(StableTokenPerformer):
    """A stable Performer inside a half-precision model: its norms and MLP compute in half like the rest, its
    kernel (kqv, the random features, proj) in fp32. `ReductionCell` calls `attention` directly."""

    @classmethod
    def within(cls, performer: StableTokenPerformer) -> Fp32KernelPerformer:
        performer.__class__ = cls  # same parameters and buffers: only the kernel's are cast back
        performer.kqv.float()
        performer.proj.float()
        performer.w.data = performer.w.data.float()
        return performer

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return super().attention(x.float()).to(x.dtype)  # (B, T, E)


class HalfServing(nn.Module):
    """float32 images -> (float32 logits, half tokens) of a half-precision twin of the model.

    The twin computes in `dtype` except the reduction cells' Performer kernels, which run in fp32 in the stable
    form the export uses (export.performer): their log-domain features span hundreds, beyond what half keeps.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        twin = copy.deepcopy(model).eval()
        stable_performers(twin)
        twin.to(dtype)
        for module in list(twin.modules()):
            if isinstance(module, StableTokenPerformer):
                Fp32KernelPerformer.within(module)
        self.serving = ServingModel(twin)
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, tokens = self.serving(images.to(self.dtype))  # (B, K), (B, N, C)
        return logits.float(), tokens


def run(module: nn.Module, images: np.ndarray, device: str) -> dict[str, np.ndarray]:
    """One eager pass in inference mode -> float32 numpy logits and tokens."""
    with torch.inference_mode():
        logits, tokens = module(torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(device))
    return {"logits": logits.float().cpu().numpy(), "tokens": tokens.float().cpu().numpy()}


def gate(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], precision: str) -> dict:
    """The figures of `got` against fp32 on the same images, and `passed`: finite, every top-1 the same, max logit
    difference within GATE_TOLERANCE[precision] of the logit scale."""
    finite = bool(np.isfinite(got["logits"]).all() and np.isfinite(got["tokens"]).all())
    agree = int((got["logits"].argmax(axis=1) == expected["logits"].argmax(axis=1)).sum())
    count = len(expected["logits"])
    scale = max(1.0, float(np.abs(expected["logits"]).max()))
    with np.errstate(invalid="ignore"):
        diff = float(np.abs(got["logits"] - expected["logits"]).max())
    tolerance = GATE_TOLERANCE[precision]
    passed = finite and agree == count and diff <= tolerance * scale  # NaN diff fails too
    return {
        "precision": precision,
        "images": count,
        "finite": finite,
        "top1_agree": agree,
        "max_abs_logit_diff": round(diff, 6),
        "logit_scale": round(scale, 4),
        "tolerance": tolerance,
        "passed": bool(passed),
    }


def choose_precision(
    model: nn.Module, images: np.ndarray, device: str, candidates: Sequence[str] = ("fp16", "bf16")
) -> tuple[str, nn.Module, list[dict]]:
    """Measure each half precision against fp32 on `images`; keep the passing one closest to fp32, else fp32.

    Returns (precision, the module to serve, every candidate's gate figures).
    """
    fp32 = ServingModel(model).to(device).eval()
    expected = run(fp32, images, device)
    passed, figures = [], []
    for precision in candidates:
        half = HalfServing(model, HALF_DTYPES[precision]).to(device).eval()
        result = gate(run(half, images, device), expected, precision)
        figures.append(result)
        if result["passed"]:
            passed.append((result["max_abs_logit_diff"], precision, half))
    if not passed:
        return "fp32", fp32, figures
    _, precision, half = min(passed, key=lambda p: p[0])
    return precision, half, figures


def buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: powers of two below max_batch, and max_batch itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


class GraphRunner:
    """One CUDA graph per batch bucket around `module`, with pinned host buffers and non-blocking copies.

    A batch of n images runs the smallest bucket >= n (rows past n hold stale inputs; every row is computed on
    its own, so they change nothing). One call at a time (the backend has one stream).
    """

    def __init__(self, module: nn.Module, shape: tuple[int, int, int], max_batch: int, device: str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.sizes = buckets(max_batch)
        pool = torch.cuda.graph_pool_handle()
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        with torch.no_grad():
            for size in sorted(self.sizes, reverse=True):  # the largest first: the smaller reuse its pool
                static = torch.zeros((size, *shape), device=self.device)  # (B, C, S, S)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm-up before capture, as torch.cuda.graph's docs require
                    for _ in range(2):
                        module(static)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = module(static)  # (B, K) float32, (B, N, D) half
                self.inputs[size], self.graphs[size] = static, graph
        logits, tokens = self.outputs[max_batch]
        self.host_in = torch.empty((max_batch, *shape), dtype=torch.float32, pin_memory=True)
        self.host_logits = torch.empty(tuple(logits.shape), dtype=torch.float32, pin_memory=True)
        self.host_tokens = torch.empty(tuple(tokens.shape), dtype=torch.float32, pin_memory=True)
        torch.cuda.synchronize(self.device)

    def __call__(self, images: np.ndarray | torch.Tensor, token_rows: Sequence[int] | None) -> tuple:
        """images (n, C, S, S) -> logits (n, K), tokens (len(token_rows) or n, N, D), float32 numpy copies."""
        n = len(images)
        size = next(s for s in self.sizes if s >= n)
        rows = list(range(n)) if token_rows is None else list(token_rows)
        # A device batch was stacked on the caller's stream: the copy below waits for it.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            if isinstance(images, torch.Tensor):  # already on the device (GPU-decoded uploads)
                self.inputs[size][:n].copy_(images, non_blocking=True)
            else:
                np.copyto(self.host_in[:n].numpy(), images)
                self.inputs[size][:n].copy_(self.host_in[:n], non_blocking=True)
            self.graphs[size].replay()
            logits, tokens = self.outputs[size]
            self.host_logits[:n].copy_(logits[:n], non_blocking=True)
            if rows:
                picked = tokens[torch.tensor(rows, device=self.device)].float()  # (R, N, D), only the rows asked for
                self.host_tokens[: len(rows)].copy_(picked, non_blocking=True)
            self.stream.synchronize()
        # Copies: the pinned buffers are overwritten by the next batch while the batcher still holds these.
        return self.host_logits[:n].numpy().copy(), self.host_tokens[: len(rows)].numpy().copy()
