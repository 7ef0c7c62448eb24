"""One CUDA major for the whole GPU stack: the base image, torch's index, TensorRT, onnxruntime-gpu, the README.

Mixing majors fails only on a GPU, at load time (a CUDA 13 torch in a CUDA 12 image, an onnxruntime-gpu whose
CUDA provider cannot find its libraries and quietly runs on CPU), so the agreement is checked here, on text.
"""

from __future__ import annotations

import re
import tomllib

from support.checkpoints import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile.gpu").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
README = (ROOT / "README.md").read_text()
# The CUDA major each vetted onnxruntime-gpu release on PyPI is built for (its metadata: the `cuda` extra requires
# nvidia-cuda-runtime~=13.0). Add the release here when the pin moves, after reading its metadata.
ONNXRUNTIME_GPU_CUDA = {"1.31.1": 13}
# The oldest driver branch each CUDA major needs (CUDA toolkit release notes): CUDA 13.0 GA ships with 580.
DRIVER_FOR_CUDA = {12: 525, 13: 580}


def pins(requirements: list[str]) -> dict[str, str]:
    """{distribution: exact version} of `name==version` requirements."""
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;,]+)\s*", requirement)
        if match:
            found[match[1].lower()] = match[2]
    return found


def gpu_extra() -> list[str]:
    return PYPROJECT["project"]["optional-dependencies"]["gpu"]


def image_cuda_major() -> int:
    image = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime", DOCKERFILE, re.M)
    assert image, "docker/Dockerfile.gpu: ARG CUDA_IMAGE=nvidia/cuda:<major>.<minor>.<patch>-cudnn-runtime-..."
    return int(image[1])


def index_cuda_major(text: str) -> int:
    index = re.search(r"download\.pytorch\.org/whl/cu(\d+)(\d)\b", text)
    assert index, "no PyTorch CUDA index URL (https://download.pytorch.org/whl/cuXYZ)"
    return int(index[1])


def test_every_pin_is_exact_and_tensorrt_names_its_cuda_major():
    extra = pins(gpu_extra())
    assert len(extra) == len(gpu_extra()), f"every `gpu` requirement is pinned with ==: {gpu_extra()}"
    assert "tensorrt" not in extra, "bare `tensorrt` follows NVIDIA's default CUDA; pin tensorrt-cu12 or -cu13"
    assert any(re.fullmatch(r"tensorrt-cu\d+", name) for name in extra)


def test_image_torch_tensorrt_and_onnxruntime_gpu_share_one_cuda_major():
    major = image_cuda_major()
    extra = pins(gpu_extra())
    (tensorrt,) = [name for name in extra if name.startswith("tensorrt-cu")]
    assert int(tensorrt.removeprefix("tensorrt-cu")) == major, f"{tensorrt} in a CUDA {major} image"
    ort = extra["onnxruntime-gpu"]
    assert ort in ONNXRUNTIME_GPU_CUDA, f"onnxruntime-gpu {ort}: record its CUDA major in ONNXRUNTIME_GPU_CUDA"
    assert ONNXRUNTIME_GPU_CUDA[ort] == major
    assert index_cuda_major(DOCKERFILE) == major, "Dockerfile.gpu's TORCH_INDEX_URL"
    assert index_cuda_major(MAKEFILE) == major, "the Makefile's torch CUDA index"


def test_make_test_gpu_installs_the_gpu_extra_and_the_pinned_torch():
    torch_pin = pins(PYPROJECT["project"]["dependencies"])["torch"]
    recipe = MAKEFILE[MAKEFILE.index("\ngpu-setup:") : MAKEFILE.index("\ntest-gpu:")]
    # The local label is needed: `torch==2.13.0` is already met by the CPU build, so pip would keep it.
    cuda_build = f"'torch=={torch_pin}+cu{image_cuda_major()}0'"
    assert cuda_build in recipe, f"make gpu-setup must install {cuda_build}, the CUDA build of the pinned torch"
    assert "requirements.py --extra gpu" in recipe, "make gpu-setup must install the gpu extra's pins, as the image"
    assert re.search(r"^test-gpu: gpu-setup$", MAKEFILE, re.M)


def test_readme_states_the_cuda_major_and_the_driver_it_needs():
    major = image_cuda_major()
    assert f"CUDA {major}" in README
    assert re.search(rf"driver[^.\n]*(≥|>=)\s*{DRIVER_FOR_CUDA[major]}", README, re.I), (
        f"README: the NVIDIA driver needed for CUDA {major} (>= {DRIVER_FOR_CUDA[major]})"
    )


def image_cuda_version() -> str:
    image = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+\.\d+\.\d+)-", DOCKERFILE, re.M)
    assert image, "docker/Dockerfile.gpu: ARG CUDA_IMAGE=nvidia/cuda:<major>.<minor>.<patch>-..."
    return image[1]


# Full CUDA versions that the docs and manifests state for something other than this project's image, each with
# the thing it belongs to: such a line must not name docker/Dockerfile.gpu (a different version "like" it is wrong).
OTHER_STACKS = {"12.8.1": "NVIDIA Triton 25.03, the KServe Triton runtime's release"}


def texts_stating_cuda() -> dict[str, str]:
    paths = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "deploy").rglob("*.yaml")]
    paths += [ROOT / "docker-compose.yml", ROOT / "Makefile", ROOT / "pyproject.toml"]
    return {str(path.relative_to(ROOT)): path.read_text() for path in paths}


def test_every_cuda_version_stated_for_the_gpu_image_is_its_base_image_tag():
    version = image_cuda_version()
    for name, text in texts_stating_cuda().items():
        for number, line in enumerate(text.splitlines(), 1):
            for stated in re.findall(r"(?:CUDA |nvidia/cuda:)(\d+\.\d+\.\d+)", line):
                where = f"{name}:{number}: {line.strip()}"
                if stated == version:
                    continue
                assert stated in OTHER_STACKS, f"CUDA {stated}, but docker/Dockerfile.gpu is CUDA {version}: {where}"
                assert "Dockerfile.gpu" not in line, f"CUDA {stated} belongs to {OTHER_STACKS[stated]}: {where}"


def test_the_docs_state_the_image_cuda_version():
    gpu_page = (ROOT / "docs" / "gpu.md").read_text()
    assert f"nvidia/cuda:{image_cuda_version()}-" in gpu_page, "docs/gpu.md: the GPU image's base tag"
