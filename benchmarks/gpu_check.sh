#!/usr/bin/env bash
# Everything to run the day an NVIDIA GPU is lent, in one command (aimed at < 8 min on an H100/H200):
#   bash benchmarks/gpu_check.sh
# 1. installs the CUDA 13 stack (make gpu-setup: torch 2.13.0 from the PyTorch cu130 index + the `gpu` extra),
# 2. runs the GPU tests (pytest -m gpu, -s so the per-PRM fusion evidence is printed),
# 3. exports ViTAE-T at 224 with a TensorRT FP16 engine and prints engine-vs-fp32 agreement, the fused layer of
#    each PRM branch, and raw TensorRT and service images/s at batch 1/8/64/256 beside the goals
#    (benchmarks/bench_gpu.py).
# Exits non-zero when the tests fail; the benchmark still runs, so one lent GPU gives every figure.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
step() { printf '\n=== %s (%ds)\n' "$1" "$(($(date +%s) - started))"; }

step "GPU and driver"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader || exit 1

step "install the CUDA 13 stack (make gpu-setup)"
make --no-print-directory gpu-setup || exit 1
.venv/bin/python - <<'PY'
import onnxruntime, tensorrt, torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, device {torch.cuda.get_device_name(0)}), "
      f"TensorRT {tensorrt.__version__}, onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}")
PY

step "GPU tests (pytest -m gpu)"
.venv/bin/python -m pytest -q -rs -s -m gpu
tests=$?

step "ViTAE-T: TensorRT FP16 export, agreement, fusion, images/s"
.venv/bin/python benchmarks/bench_gpu.py --batches 1,8,64,256
bench=$?

step "done: pytest exit ${tests}, benchmark exit ${bench}"
exit $((tests != 0 || bench != 0))
