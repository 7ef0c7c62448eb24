"""Running a plan: `PlanRunner` (the service's TensorRT backend and the export's checks) and `run_plan`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifacts import INPUT_NAME
from .machine import import_tensorrt


def _torch_dtype(torch, trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class PlanRunner:
    """A deserialized plan on one CUDA device, run by tensor name (TensorRT 10.x/11.x I/O API).

    float32 images (B, C, S, S) in numpy -> {output name: float32 numpy}, e.g. logits (B, K) and tokens
    (B, N, D); B at most `max_batch` (the profile's largest). CUDA memory comes from PyTorch; the input is cast to
    the dtype the engine declares. Not thread-safe: one caller (the service's worker thread) at a time.
    """

    def __init__(self, plan: bytes, device: str | None = None) -> None:
        import torch

        trt = import_tensorrt()
        self._torch = torch
        self.device = device or f"cuda:{torch.cuda.current_device()}"  # "cuda:N": set_device needs the index
        torch.cuda.set_device(self.device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the plan")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {name: _torch_dtype(torch, trt, self.engine.get_tensor_dtype(name)) for name in names}
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.max_batch = int(self.engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0])  # profile 0's max

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        torch.cuda.set_device(self.device)  # the current device is per thread
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device, non_blocking=True)
            x = x.to(self.dtypes[INPUT_NAME]).contiguous()  # (B, C, S, S)
            self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
            self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
            outputs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            host = {name: tensor.float().cpu() for name, tensor in outputs.items()}
        self.stream.synchronize()
        return {name: tensor.numpy() for name, tensor in host.items()}

    def close(self) -> None:
        self.context = None
        self.engine = None


def run_plan(plan: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run a plan file on a float32 numpy batch of any size (chunks of the profile's max) on the current CUDA
    device; {output name: float32 numpy array}, the chunks joined in order."""
    runner = PlanRunner(plan.read_bytes())
    try:
        chunks = [runner(images[i : i + runner.max_batch]) for i in range(0, len(images), runner.max_batch)]
    finally:
        runner.close()
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in runner.outputs}
