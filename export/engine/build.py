"""Building `model.plan`: TensorRT 10.x weakly typed with precision constraints, 11.x strongly typed from the
FP16 ONNX copy (`engine.fp16_graph`); the timing cache carried from one build to the next; `layers.json`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..artifacts import INPUT_NAME, LAYERS, PLAN, TIMING_CACHE
from .fp16_graph import PERFORMER_KERNEL, fp16_onnx
from .machine import import_tensorrt, this_machine

log = logging.getLogger(__name__)


def _major(version: str) -> int:
    return int(version.split(".")[0])


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
    trt = import_tensorrt()
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
