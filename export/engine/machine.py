"""What this machine offers a TensorRT plan: GPU identity, TensorRT version, a guarded builder probe, and
whether a plan described by metadata's `tensorrt` entry fits here (`plan_fits`) or is due for a rebuild
(`plan_outdated`). `gpu_identity` is the one GPU probe.

`tensorrt` is an optional dependency, imported only when asked for: without it (or without a GPU) every
function here answers "no" with a one-line reason.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Any


def import_tensorrt():
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
        return import_tensorrt().__version__
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
        trt = import_tensorrt()
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
    """`plan_fits` of a metadata dict's `tensorrt` entry (e.g. metadata.json read as a dict)."""
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


def plan_outdated(built: dict[str, Any] | None) -> str | None:
    """Why the plan must be rebuilt on this machine, or None: TensorRT can build here and the plan is absent
    or was built for another GPU or TensorRT version. Without TensorRT and a GPU a plan is never wanted."""
    if unavailable_reason() is not None:
        return None
    fits, why = plan_fits(built)
    return None if fits else f"TensorRT is available here but {why}"
