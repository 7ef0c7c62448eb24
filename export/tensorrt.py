"""TensorRT engine: build (10.x weakly typed + precision constraints, 11.x strongly typed from an FP16 ONNX),
inspect, run (`PlanRunner`, also the service's TensorRT backend), and decide whether a plan fits the current
machine (`plan_fits`, behind `ArtifactsMetadata.plan_fits_here`; `gpu_identity` is the one GPU probe).

Nothing here is imported eagerly: `tensorrt` is an optional dependency, and without it (or without a GPU)
the export logs one line and moves on.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .artifacts import INPUT_NAME, LAYERS, PLAN, TIMING_CACHE
from .graph import PRMBlock

log = logging.getLogger(__name__)

# Kept in FP32 under FP16: normalisation and softmax (the usual overflow/accuracy spots), and the Performer's
# positive random features (exp, its einsums and sums), which the release itself computes in float32.
FP32_ONNX_OPS = ("LayerNormalization", "Softmax", "Exp", "Einsum", "ReduceSum")


def _import_tensorrt():
    import tensorrt as trt

    return trt


def gpu_identity() -> dict[str, str] | None:
    """Name and compute capability of GPU 0, from torch when it has CUDA, else nvidia-smi; None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu_name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:  # a broken CUDA install reads as "no GPU"
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, capability = (part.strip() for part in out.splitlines()[0].split(","))
    return {"gpu_name": name, "compute_capability": capability}


def tensorrt_version() -> str | None:
    try:
        return _import_tensorrt().__version__
    except ImportError:
        return None


def unavailable_reason() -> str | None:
    """Why no engine can be built here (one line), or None when TensorRT and a GPU are both present."""
    if tensorrt_version() is None:
        return "TensorRT step skipped: the tensorrt package is not installed (pip install '.[gpu]')"
    if gpu_identity() is None:
        return "TensorRT step skipped: no NVIDIA GPU is visible on this machine"
    return None


def this_machine() -> dict[str, str] | None:
    """What a plan built here would be tied to: GPU name, compute capability, TensorRT version."""
    gpu, version = gpu_identity(), tensorrt_version()
    if gpu is None or version is None:
        return None
    return {**gpu, "version": version}


def plan_matches_this_machine(metadata: dict[str, Any]) -> tuple[bool, str]:
    """`plan_fits` of a metadata dict's `tensorrt` entry (see `ArtifactsMetadata.plan_fits_here`)."""
    return plan_fits(metadata.get("tensorrt"))


def plan_fits(built: dict[str, Any] | None) -> tuple[bool, str]:
    """Whether a plan described by metadata's `tensorrt` entry may run here, and why (or why not).

    A plan is tied to the GPU model (compute capability and name) and the exact TensorRT version it was
    built with; on any difference the export stage rebuilds it (the artifacts count as stale here).
    """
    if not built:
        return False, "the artifacts contain no TensorRT plan"
    here = this_machine()
    if here is None:
        return False, unavailable_reason() or "no TensorRT here"
    for key, label in (
        ("version", "TensorRT version"),
        ("compute_capability", "compute capability"),
        ("gpu_name", "GPU"),
    ):
        if str(built.get(key)) != str(here[key]):
            return False, f"the plan was built for {label} {built.get(key)}, this machine has {here[key]}"
    return True, f"plan built for {here['gpu_name']} (sm {here['compute_capability']}), TensorRT {here['version']}"


def _major(version: str) -> int:
    return int(version.split(".")[0])


def fp16_onnx(onnx_path: Path, out_path: Path) -> Path:
    """An FP16 copy of the model for strongly typed builds: FP32 I/O, FP32 kept for `FP32_ONNX_OPS`."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True, op_block_list=list(FP32_ONNX_OPS))
    onnx.save(model, str(out_path))
    return out_path


def _keep_fp32(trt, network) -> int:
    """Pin the layers that must stay FP32 under the FP16 builder flag (TensorRT 10.x); returns how many."""
    kinds = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.EINSUM, trt.LayerType.REDUCE}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        is_exp = layer.type == trt.LayerType.UNARY and "Exp" in layer.name
        if layer.type in kinds or is_exp:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(
    onnx_path: Path,
    out_dir: Path,
    *,
    input_shape: tuple[int, int, int],
    max_batch: int,
    precision: str,
    previous_cache: Path | None = None,
) -> dict[str, Any]:
    """Build `model.plan`, `layers.json` and `timing.cache` in `out_dir`; returns the metadata's `tensorrt`."""
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = _major(trt.__version__) >= 11
    source = onnx_path
    if strongly_typed and precision == "fp16":
        # TensorRT 11 has no FP16 builder flag: the precision lives in the graph.
        source = fp16_onnx(onnx_path, out_dir / "model_fp16.onnx.tmp")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {source.name}: {errors}")
    if source != onnx_path:
        source.unlink()

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names, types and tactics in layers.json
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log.info("TensorRT %s: FP16 with %d layers pinned to FP32", trt.__version__, _keep_fp32(trt, network))

    profile = builder.create_optimization_profile()
    c, h, w = input_shape
    opt = max(1, max_batch // 2)
    profile.set_shape(INPUT_NAME, (1, c, h, w), (opt, c, h, w), (max_batch, c, h, w))
    config.add_optimization_profile(profile)

    cache_bytes = previous_cache.read_bytes() if previous_cache and previous_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    _write_engine(trt, logger, plan, config, out_dir)

    machine = this_machine() or {}
    return {
        "version": trt.__version__,
        "gpu_name": machine.get("gpu_name"),
        "compute_capability": machine.get("compute_capability"),
        "precision": precision,
        "strongly_typed": strongly_typed,
        "profile": {"min": 1, "opt": opt, "max": max_batch},
    }


def _write_engine(trt, logger, plan, config, out_dir: Path) -> None:
    """model.plan, the timing cache for the next build, and layers.json (the engine inspector's layer list)."""
    (out_dir / PLAN).write_bytes(bytes(plan))
    (out_dir / TIMING_CACHE).write_bytes(bytes(config.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    inspector = engine.create_engine_inspector()
    layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    (out_dir / LAYERS).write_text(json.dumps(layers, indent=1) + "\n")


def layer_names(layers: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, type) of every engine layer in an inspector JSON (DETAILED gives dicts, otherwise names)."""
    out = []
    for layer in layers.get("Layers", []):
        if isinstance(layer, dict):
            out.append((str(layer.get("Name", "")), str(layer.get("LayerType", ""))))
        else:
            out.append((str(layer), ""))
    return out


def prm_fusion_problems(layers: dict[str, Any], blocks: list[PRMBlock]) -> list[str]:
    """What keeps the engine from the fused PRM: a conv not sharing a layer with its Gelu, a standalone Concat."""
    named = layer_names(layers)
    problems = []
    for block in blocks:
        for conv, gelu in zip(block.convs, block.gelus, strict=True):
            if not any(conv in name and gelu in name for name, _ in named):
                problems.append(f"conv {conv} is not fused with {gelu}")
        standalone = [
            name for name, kind in named if name == block.concat or (block.concat in name and "Concat" in kind)
        ]
        if standalone:
            problems.append(f"PRM concat {block.concat} survives as layer(s) {standalone}")
    return problems


def _torch_dtype(torch, trt, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


class PlanRunner:
    """A deserialized plan on one CUDA device, run by tensor name (TensorRT 10.x/11.x I/O API).

    float32 images (B, C, S, S) in numpy -> {output name: float32 numpy}, e.g. logits (B, K) and tokens
    (B, N, D). CUDA memory comes from PyTorch; the input is cast to the dtype the engine declares. Not
    thread-safe: one caller (the service's worker thread) at a time.
    """

    def __init__(self, plan: bytes, device: str | None = None) -> None:
        import torch

        trt = _import_tensorrt()
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
    """Run a plan file once on a float32 numpy batch on the current CUDA device; {output name: numpy array}."""
    return PlanRunner(plan.read_bytes())(images)
