"""Failed starts say in one line which file or setting is wrong, what is wrong with it and what to do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from service.artifacts import read_artifacts
from service.backends import BackendUnavailable, select_backend


def test_a_device_that_is_not_cuda_n_is_one_line_naming_vitae_device_and_the_accepted_values():
    env = {**os.environ, "VITAE_DEVICE": "cuda:x"}
    done = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "VITAE_DEVICE" in lines[0] and "cuda:N" in lines[0] and "'cuda:x'" in lines[0]


def test_select_backend_refuses_a_gpu_index_that_is_not_a_number(artifacts):
    with pytest.raises(ValueError, match="VITAE_DEVICE must be auto, cpu, cuda or cuda:N"):
        select_backend("auto", read_artifacts(artifacts), "cuda:x")


def test_a_model_onnx_openvino_cannot_compile_is_one_line_naming_the_file_the_reason_and_what_to_do(
    artifacts, tmp_path
):
    pytest.importorskip("openvino")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from service.backends import OpenVINOBackend

    folder = tmp_path / "artifacts"
    shutil.copytree(artifacts, folder)
    served = read_artifacts(folder)
    # Valid protobuf, a valid ONNX graph even, but with an operator OpenVINO has no conversion for.
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["images"], ["logits"])],
        "not-vitae",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
    )
    onnx.save(helper.make_model(graph), served.file("onnx"))
    with pytest.raises(BackendUnavailable) as refused:
        OpenVINOBackend(served, precision="fp32", threads=1, cache_dir=tmp_path / "cache")
    message = str(refused.value)
    assert "\n" not in message and str(served.file("onnx")) in message
    assert "NoSuchOp" in message and "python -m export" in message and "core.cpp" not in message
