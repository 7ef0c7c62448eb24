"""TensorRT engine: build (10.x weakly typed + precision constraints, 11.x strongly typed from an FP16 ONNX),
inspect, run (`PlanRunner`, also the service's TensorRT backend; `run_plan` and `engine_parity` use it), and
decide whether a plan fits the current machine (`plan_fits`, behind `ArtifactsMetadata.plan_fits_here`;
`gpu_identity` is the one GPU probe, `builder_probe` the guarded proof that CUDA starts).

Nothing here is imported eagerly: `tensorrt` is an optional dependency, and without it (or without a GPU)
the export logs one line and moves on.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .artifacts import INPUT_NAME, LAYERS, LOGITS, OUTPUT_NAMES, PLAN, TIMING_CACHE, TOKENS

log = logging.getLogger(__name__)

# Kept in FP32 under FP16: normalisation and softmax (the usual accuracy spots), and the Performer's kernel
# arithmetic, which the release computes in float32. Its exported form keeps every value inside FP16's range
# (export/performer.py), but its log-domain features (w.x - |x|^2/2, up to a few hundred) lose ~0.1 absolute in
# FP16, i.e. ~10 % in the features after exp. The kernel is every op a reduction cell runs itself, outside its
# submodules (PRM, PCM, norms, projections, MLP): node and layer names "/RC/<Op>", "/RC_1/<Op>_3", ...
FP32_ONNX_OPS = ("LayerNormalization", "Softmax")
PERFORMER_KERNEL = re.compile(r"^/RC(?:_\d+)?/[^/]+$")


def fp32_node_names(model: onnx.ModelProto) -> list[str]:
    """The nodes an FP16 build keeps in FP32: `FP32_ONNX_OPS` and the Performer kernel."""
    return [n.name for n in model.graph.node if n.op_type in FP32_ONNX_OPS or PERFORMER_KERNEL.match(n.name)]


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


@functools.cache
def builder_probe() -> str | None:
    """Create a TensorRT builder once, guarded: None when it works, else why not (one line, no traceback).

    A GPU that `nvidia-smi` lists is not proof that CUDA starts in this process (driver too old for the CUDA
    runtime, no device nodes in the container): `trt.Builder` then raises (TypeError, CUDA error 35) or
    returns None. Cached: creating the builder initialises CUDA, which is worth doing once per process.
    """
    try:
        trt = _import_tensorrt()
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        if builder is None:
            return "TensorRT could not create a builder (no usable CUDA device)"
        del builder
    except Exception as exc:  # whatever the CUDA failure looks like, it means "no TensorRT here"
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"TensorRT cannot start CUDA here ({type(exc).__name__}: {first_line})"
    return None


def unavailable_reason() -> str | None:
    """Why no engine can be built here (one line), or None when TensorRT and a usable GPU are both present."""
    if tensorrt_version() is None:
        return "TensorRT step skipped: the tensorrt package is not installed (pip install '.[gpu]')"
    if gpu_identity() is None:
        return "TensorRT step skipped: no NVIDIA GPU is visible on this machine"
    probe = builder_probe()
    if probe is not None:
        return f"TensorRT step skipped: {probe}"
    return None


def this_machine() -> dict[str, str] | None:
    """What a plan built here would be tied to: GPU name, compute capability, TensorRT version.

    None where no plan can run (no TensorRT, no GPU, or a GPU that CUDA cannot start).
    """
    gpu, version = gpu_identity(), tensorrt_version()
    if gpu is None or version is None or builder_probe() is not None:
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

    model = onnx.load(str(onnx_path))
    model = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=list(FP32_ONNX_OPS), node_block_list=fp32_node_names(model)
    )
    onnx.save(drop_fp16_round_trips(model), str(out_path))
    return out_path


def drop_fp16_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Let FP32 nodes feed FP32 nodes directly: remove every Cast(fp16) -> Cast(fp32) pair on an FP32 value.

    The converter casts each kept node's outputs to FP16 and back for the next kept node, so the Performer
    kernel would still round (and flush to zero: exp(-20) is below FP16's smallest subnormal) between its
    FP32 ops, and 0/0 turns into NaN at its final division. Changed in place and returned.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    elem_type = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    elem_type.update({t.name: t.data_type for t in graph.initializer})
    nodes = list(model.graph.node)
    to = [next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None for n in nodes]
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    outputs = {o.name for o in model.graph.output}
    renamed: dict[str, str] = {}
    dropped: set[int] = set()
    for i, down in enumerate(nodes):
        if to[i] != fp16 or elem_type.get(down.input[0]) != fp32:
            continue
        users = consumers.get(down.output[0], [])
        for j in users:
            if to[j] == fp32 and nodes[j].output[0] not in outputs:
                renamed[nodes[j].output[0]] = down.input[0]
                dropped.add(j)
        if down.output[0] not in outputs and all(j in dropped for j in users):
            dropped.add(i)
    kept = [onnx.NodeProto.FromString(n.SerializeToString()) for i, n in enumerate(nodes) if i not in dropped]
    for node in kept:
        for k, name in enumerate(node.input):
            node.input[k] = renamed.get(name, name)
    gone = {out for i in dropped for out in nodes[i].output}
    value_info = [v for v in model.graph.value_info if v.name not in gone]
    del model.graph.node[:], model.graph.value_info[:]
    model.graph.node.extend(kept)
    model.graph.value_info.extend(value_info)
    return model


def _keep_fp32(trt, network) -> int:
    """Pin the layers that must stay FP32 under the FP16 builder flag (TensorRT 10.x); returns how many."""
    kinds = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not (layer.type in kinds or PERFORMER_KERNEL.match(layer.name)):
            continue
        # Only floating outputs: the kernel's shape arithmetic and TopK's indices are integers and stay so.
        floating = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in (trt.float32, trt.float16)]
        if not floating:
            continue
        layer.precision = trt.float32
        for j in floating:
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

    cache = attach_timing_cache(config, previous_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    _write_engine(trt, logger, plan, config, cache, out_dir)

    machine = this_machine() or {}
    return {
        "version": trt.__version__,
        "gpu_name": machine.get("gpu_name"),
        "compute_capability": machine.get("compute_capability"),
        "precision": precision,
        "strongly_typed": strongly_typed,
        "profile": {"min": 1, "opt": opt, "max": max_batch},
    }


def _write_engine(trt, logger, plan, config, cache, out_dir: Path) -> None:
    """model.plan, the timing cache for the next build, and layers.json (the engine inspector's layer list)."""
    (out_dir / PLAN).write_bytes(bytes(plan))
    save_timing_cache(config, cache, out_dir / TIMING_CACHE)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    inspector = engine.create_engine_inspector()
    layers = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    (out_dir / LAYERS).write_text(json.dumps(layers, indent=1) + "\n")


def attach_timing_cache(config, previous: Path | None):
    """Give the builder config a timing cache: `previous` when it was made by this GPU and TensorRT, else a new one.

    A cache from another GPU or TensorRT version is refused by `set_timing_cache(..., ignore_mismatch=False)`
    (it returns False); it is then discarded and replaced by an empty cache, which this build fills and
    `save_timing_cache` writes over the stale file, so the next start reuses it instead of failing again.
    """
    data = previous.read_bytes() if previous is not None and previous.is_file() else b""
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception as exc:  # unreadable bytes: TensorRT raises or returns None, depending on the version
            log.info("timing cache %s is unreadable (%s); starting a new one", previous, exc)
            cache = None
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            log.info("reusing the timing cache %s (%d bytes)", previous, len(data))
            return cache
        log.info("timing cache %s was made by another GPU or TensorRT version; discarded, starting a new one", previous)
    cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError("TensorRT refused a new, empty timing cache")
    return cache


def save_timing_cache(config, attached, path: Path) -> bool:
    """Write the timing cache after a build; False (logged, no file) when TensorRT has none to give."""
    cache = config.get_timing_cache() or attached
    try:
        data = bytes(cache.serialize()) if cache is not None else b""
    except Exception as exc:
        log.info("the timing cache could not be serialized (%s); the next build starts without one", exc)
        data = b""
    if not data:
        path.unlink(missing_ok=True)
        return False
    path.write_bytes(data)
    return True


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


# The engine must reproduce the fp32 model: max |logits - fp32 logits| <= tolerance x max(1, max |fp32 logits|).
# FP16 keeps 11 significant bits (relative step 4.9e-4); over a dozen cells the rounding adds up to ~1e-3 of
# the logit scale, so 2e-2 is loose enough for any sound FP16 engine and far below what an overflow or a wrong
# layer does. FP32 engines may use TF32 tensor cores (10 bits), hence 5e-3 rather than the ONNX parity's 1e-4.
ENGINE_TOLERANCE = {"fp16": 2e-2, "fp32": 5e-3}


class EngineParityError(RuntimeError):
    """The built engine does not compute what the fp32 model computes; the plan is refused."""


def compare_to_fp32(
    got: dict[str, np.ndarray], expected: dict[str, np.ndarray], precision: str
) -> tuple[dict[str, Any], list[str]]:
    """The agreement figures of reduced-precision outputs with fp32 ones, and what fails the engine rule."""
    finite = bool(all(np.isfinite(got[name]).all() for name in expected))
    agree = int((got[LOGITS].argmax(axis=1) == expected[LOGITS].argmax(axis=1)).sum())
    count = len(expected[LOGITS])
    scale = max(1.0, float(np.abs(expected[LOGITS]).max()))
    with np.errstate(invalid="ignore"):
        diff = {name: float(np.abs(got[name] - expected[name]).max()) for name in expected}
    tolerance = ENGINE_TOLERANCE[precision]
    figures = {
        "images": count,
        "finite": finite,
        "top1_agree": agree,
        "max_abs_diff": diff,
        "logit_scale": scale,
        "tolerance": tolerance,
        "tolerance_rule": "max |logits - fp32| <= tolerance * max(1, max |fp32 logits|)",
    }
    problems = []
    if not finite:
        problems.append("non-finite outputs (inf/NaN)")
    if agree != count:
        problems.append(f"top-1 agrees with fp32 on {agree}/{count} images only")
    if not diff[LOGITS] <= tolerance * scale:  # also catches NaN
        problems.append(f"max |logits - fp32| {diff['logits']:.3g} > {tolerance:g} x logit scale {scale:.3g}")
    return figures, problems


def engine_parity(plan: Path, onnx_path: Path, images: np.ndarray, *, precision: str, origin: str) -> dict[str, Any]:
    """Run the plan and fp32 ONNX Runtime (CPU) on the same real images; the figures, or EngineParityError.

    Refused unless every output is finite, top-1 agrees with fp32 on every image, and the max logit difference
    is within `ENGINE_TOLERANCE[precision]` of the logit scale.
    """
    from .parity import cpu_session

    images = np.ascontiguousarray(images, np.float32)
    names = list(OUTPUT_NAMES)
    expected = dict(zip(names, cpu_session(onnx_path).run(names, {INPUT_NAME: images}), strict=True))
    figures, problems = compare_to_fp32(run_plan(plan, images), expected, precision)
    if problems:
        raise EngineParityError(f"the {precision} TensorRT engine is refused on {origin}: " + "; ".join(problems))
    log.info(
        "TensorRT %s vs fp32 on %s: top-1 %d/%d, max |logits diff| %.3g (scale %.3g), max |tokens diff| %.3g",
        precision,
        origin,
        figures["top1_agree"],
        figures["images"],
        figures["max_abs_diff"][LOGITS],
        figures["logit_scale"],
        figures["max_abs_diff"][TOKENS],
    )
    return {"inputs": origin, **figures}
