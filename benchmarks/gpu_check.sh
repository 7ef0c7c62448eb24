#!/usr/bin/env bash
# Everything to run the day an NVIDIA GPU is lent, in one command, offline (aimed at < 7 min on an H100/H200):
#   bash benchmarks/gpu_check.sh            (PYTHON=... to name the interpreter; default python3)
# The machine's own python3 must already import a CUDA build of PyTorch (2.11 or later). Nothing is downloaded:
# the service's small runtime packages that such an image lacks come from .whl/, prepared on a connected machine
# by `make wheels` and carried with the working tree; they are installed into a temporary folder, not the system.
# 1. says which GPU, torch and optional parts are here, and which parts it skips and why (TensorRT, onnxruntime-gpu),
# 2. runs the GPU tests and the GPU-path tests (pytest -m gpu, tests/service/test_gpu_decode.py, tests/service/backends/test_torch_cuda.py),
# 3. runs benchmarks/bench_gpu.py: agreement with fp32 per precision, raw engine images/s at batch 1/8/64/256 for
#    PyTorch fp32, PyTorch half + CUDA graphs and TensorRT where it imports, GPU-decode images/s, and the service
#    over HTTP with JPEG uploads (GPU decode and PIL decode) at 64 clients, beside the goals.
# Exits 2 without a CUDA device, non-zero when a step fails; the benchmark runs even when a test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
started=$(date +%s)
step() { printf '\n=== %s (%ds)\n' "$1" "$(($(date +%s) - started))"; }

step "GPU, driver and PyTorch"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "no CUDA device: $PY does not import a PyTorch that sees a GPU (torch.cuda.is_available() is False or"
    echo "torch is missing). Nothing to check on this machine; run this script on a GPU machine."
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader

step "runtime packages from .whl/ (no network)"
site=$(mktemp -d /tmp/vitae-site.XXXXXX)
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
    echo "installed $(ls .whl/*.whl | wc -l) wheels into $site"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PY' || { echo "the service's runtime packages are missing: run 'make wheels' on a connected machine and carry .whl"; exit 1; }
import fastapi, httptools, multipart, pydantic_settings, uvicorn  # noqa: F401  (what the service imports)
import torch

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name(0)}; fastapi {fastapi.__version__}")
try:
    import torchvision
    from torchvision.io import decode_jpeg  # noqa: F401
    print(f"torchvision {torchvision.__version__}: JPEG uploads decode on the GPU (nvJPEG)")
except Exception as exc:
    print(f"skipped: GPU JPEG decoding (torchvision's image ops do not import: {exc})")
try:
    import tensorrt
    print(f"TensorRT {tensorrt.__version__}: its export and engine steps run")
except ImportError:
    print("skipped: TensorRT (not installed here; its wheels download the libraries from NVIDIA's index at install)")
try:
    import onnxruntime as ort
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        print(f"onnxruntime {ort.__version__} with the CUDA execution provider")
    else:
        print(f"skipped: ONNX Runtime on CUDA (onnxruntime {ort.__version__} is the CPU build; onnxruntime-gpu is ~256 MB)")
except ImportError:
    print("skipped: ONNX Runtime (not installed)")
PY

step "GPU tests (pytest -m gpu) and the GPU path's own tests"
"$PY" -m pytest -q -rs -s -p no:cacheprovider -m gpu
gpu_tests=$?
"$PY" -m pytest -q -rs -s -p no:cacheprovider tests/service/test_gpu_decode.py tests/service/backends/test_torch_cuda.py
path_tests=$?
[ "$gpu_tests" = 5 ] && gpu_tests=0  # 5: no test selected (every GPU module skipped), reported above

step "ViTAE-T and the demo model: agreement, raw and service images/s (benchmarks/bench_gpu.py)"
"$PY" benchmarks/bench_gpu.py --batches 1,8,64,256
bench=$?

step "done: GPU tests exit ${gpu_tests}, GPU-path tests exit ${path_tests}, benchmark exit ${bench}"
rm -rf "$site"
exit $((gpu_tests != 0 || path_tests != 0 || bench != 0))
