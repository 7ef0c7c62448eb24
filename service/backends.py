"""Inference backends behind one small interface: normalised images in, logits and last-cell tokens out.

Every backend is called from one dedicated worker thread only (see batcher.py), so none of them
needs its own locking.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .artifacts import ServedModel

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "onnxruntime", "torch")


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (missing package, no GPU, no artifact); the message says which."""


class Backend(Protocol):
    """An inference engine for one served model. The lifecycle of a request around it:

    1. setup        `create_backend` / `select_backend` build it from the artifacts (session, engine,
                    module); the lifespan warms it up at batch 1 and at the max batch
    2. preprocess   bytes -> normalised (C, S, S) float32 by `model.preprocess`, in the decode pool
                    (`service.inference.prepare_image`); backends never see bytes
    3. batch        the classify batcher stacks queued images into (B, C, S, S) on its worker thread
    4. infer        `infer(images)` -> (logits, tokens); the one method each backend implements
    5. postprocess  logits -> top-k and tokens -> CAM (`service.postprocess`), outside the backend
    `close()` frees the engine when the lifespan ends.
    """

    name: str
    device: str

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images float32 (B, C, S, S), normalised -> logits float32 (B, K), tokens float32 (B, N, D)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Selection:
    backend: Backend
    reason: str


def cuda_device_count() -> int:
    """GPUs visible to PyTorch, 0 without CUDA (imports torch lazily: the ORT-only path does not need it)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def wants_gpu(device: str) -> bool | None:
    """'cpu' -> False, 'cuda[:N]' -> True, 'auto' -> None (decide by what is present)."""
    device = device.lower()
    if device == "auto":
        return None
    if device == "cpu":
        return False
    if device == "cuda" or device.startswith("cuda:"):
        return True
    raise ValueError(f"VITAE_DEVICE must be auto, cpu, cuda or cuda:N, got {device!r}")


def gpu_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


class TorchBackend:
    """The PyTorch model rebuilt from the export's state dict (eager, inference mode)."""

    name = "torch"

    def __init__(self, served: ServedModel, device: str = "cpu", threads: int = 0) -> None:
        import torch

        from model import ViTAE, ViTAEConfig, load_weights

        weights = served.file("weights")
        if weights is None:
            raise BackendUnavailable(f"no PyTorch weights (files.weights) in {served.folder}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("PyTorch sees no CUDA device")
        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.device = device
        self.model = load_weights(ViTAE(ViTAEConfig.from_dict(served.metadata["config"])), weights).eval()
        self.model.requires_grad_(False)
        self.model.to(device)

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
            tokens = self.model.forward_features(x)  # (B, N, D)
            logits = self.model.forward_head(tokens)  # (B, K)
            return logits.float().cpu().numpy(), tokens.float().cpu().numpy()

    def close(self) -> None:
        self.model = None


class OnnxRuntimeBackend:
    """model.onnx (or the vetted int8 model on CPU) in ONNX Runtime: CUDA EP when asked and present."""

    name = "onnxruntime"

    def __init__(self, served: ServedModel, *, gpu: bool, device: str = "cpu", threads: int = 0, int8: bool = True):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if gpu and "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(f"ONNX Runtime has no CUDAExecutionProvider (providers: {', '.join(available)})")
        path = served.file("onnx")
        int8_path = served.file("onnx_int8")
        if not gpu and int8 and int8_path is not None:
            # The export keeps an int8 model only when it is faster here and within 0.5 points of top-1.
            path = int8_path
        if path is None:
            raise BackendUnavailable(f"no ONNX model (files.onnx) in {served.folder}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # One worker thread calls run() at a time; spinning threads would only steal the event loop's CPU.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if gpu:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu_index(device)}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.path = path
        self.device = session_device(self.session, f"cuda:{gpu_index(device)}" if gpu else "cpu")
        self._outputs = [o.name for o in self.session.get_outputs()]
        if "logits" not in self._outputs or "tokens" not in self._outputs:
            raise BackendUnavailable(f"{path.name} lacks the outputs logits and tokens (has {self._outputs})")

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, tokens = self.session.run(["logits", "tokens"], {"images": np.ascontiguousarray(images, np.float32)})
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


class TensorRTBackend:
    """model.plan through the TensorRT Python API (10.x/11.x name-based I/O), CUDA memory from PyTorch.

    Written against the documented API (deserialize_cuda_engine, set_input_shape, set_tensor_address,
    execute_async_v3); not run on this project's CPU machines.
    """

    name = "tensorrt"

    def __init__(self, served: ServedModel, device: str = "cuda") -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:
            raise BackendUnavailable(f"the tensorrt package is not installed ({exc})") from exc
        if not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device for TensorRT")
        plan = served.file("plan")
        if plan is None:
            raise BackendUnavailable(f"no TensorRT engine (files.plan) in {served.folder}")
        from export.tensorrt import plan_matches_this_machine

        matches, why = plan_matches_this_machine(served.metadata)
        if not matches:
            raise BackendUnavailable(f"model.plan was built elsewhere: {why}")
        self._torch = torch
        self.device = f"cuda:{gpu_index(device)}"
        torch.cuda.set_device(self.device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        try:
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        except Exception as exc:  # CUDA that cannot start raises here (e.g. TypeError, CUDA error 35)
            raise BackendUnavailable(f"TensorRT cannot start: {type(exc).__name__}: {exc}") from exc
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT could not deserialize {plan}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        self._dtypes = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self._dtypes[name] = _torch_dtype(torch, trt, self.engine.get_tensor_dtype(name))
        missing = {"images", "logits", "tokens"} - set(self._dtypes)
        if missing:
            raise BackendUnavailable(f"model.plan lacks the tensors {sorted(missing)}")

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        torch.cuda.set_device(self.device)  # the current device is per thread; this runs on the worker thread
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device, non_blocking=True)
            x = x.to(self._dtypes["images"]).contiguous()
            self.context.set_input_shape("images", tuple(x.shape))
            self.context.set_tensor_address("images", x.data_ptr())
            outputs = {}
            for name in ("logits", "tokens"):
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            logits = outputs["logits"].float().cpu()
            tokens = outputs["tokens"].float().cpu()
        self.stream.synchronize()
        return logits.numpy(), tokens.numpy()

    def close(self) -> None:
        self.context = None
        self.engine = None


def _torch_dtype(torch, trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


def create_backend(name: str, served: ServedModel, device: str, threads: int = 0, int8: bool = True) -> Backend:
    """Build one named backend on `device` ('auto', 'cpu', 'cuda[:N]'); BackendUnavailable when it cannot run."""
    gpu = wants_gpu(device)
    if gpu is None:
        gpu = cuda_device_count() > 0 or name == "tensorrt"
        device = "cuda" if gpu else "cpu"
    if name == "tensorrt":
        if not gpu:
            raise BackendUnavailable("TensorRT needs VITAE_DEVICE=cuda (or auto with a GPU)")
        return TensorRTBackend(served, device)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(served, gpu=gpu, device=device, threads=threads, int8=int8)
    if name == "torch":
        return TorchBackend(served, device=device if gpu else "cpu", threads=threads)
    raise ValueError(f"unknown backend {name!r}; use auto or one of {', '.join(BACKENDS)}")


def select_backend(
    requested: str, served: ServedModel, device: str = "auto", threads: int = 0, int8: bool = True
) -> Selection:
    """Build the requested backend, or for 'auto' the fastest one that can run here, and say why.

    The order for auto is fixed by what is fastest for this model: a TensorRT engine (fused kernels,
    FP16) beats ONNX Runtime's CUDA EP, which beats PyTorch eager on GPU; on CPU ONNX Runtime's
    optimised graph (folded BatchNorm, fused GELU) beats PyTorch eager.
    """
    if requested != "auto":
        backend = create_backend(requested, served, device, threads, int8)
        reason = f"VITAE_BACKEND={requested}"
        if wants_gpu(device) and not backend.device.startswith("cuda"):
            reason += f"; VITAE_DEVICE={device} was asked for, but it runs on {backend.device} (CUDA did not load)"
        return Selection(backend, reason)
    gpu = wants_gpu(device)
    gpus = cuda_device_count()
    if gpu is None:
        gpu = gpus > 0
    if gpu:
        device = device if device != "auto" else "cuda"
        order = [("tensorrt", device), ("onnxruntime", device), ("torch", device)]
    else:
        order = [("onnxruntime", "cpu"), ("torch", "cpu")]
    skipped = []
    for name, dev in order:
        try:
            backend = create_backend(name, served, dev, threads, int8)
        except BackendUnavailable as exc:
            skipped.append(f"{name}: {exc}")
            continue
        if gpu and not backend.device.startswith("cuda"):
            skipped.append(f"{name}: asked for {dev} but runs on {backend.device}")
            backend.close()
            continue
        where = f"{gpus} GPU(s) visible" if gpu else f"CPU only ({os.cpu_count()} cores, no GPU requested or visible)"
        reason = f"auto: {name} on {backend.device} is the fastest available ({where})"
        if skipped:
            reason += "; skipped " + "; ".join(skipped)
        return Selection(backend, reason)
    raise BackendUnavailable("no backend can run here: " + "; ".join(skipped))
