"""A backend other than the one the artifacts were made for is said in one log line and in /readyz's reason."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from support.server import settings_for

from service.artifacts import read_artifacts
from service.backends import OnnxRuntimeBackend
from service.runtime import artifacts_mismatch, choose_backend


def with_metadata(served, **changes):
    return dataclasses.replace(served, metadata=dataclasses.replace(served.metadata, **changes))


def test_a_tensorrt_plan_served_by_onnxruntime_is_said_in_one_log_line_and_the_reason(artifacts, caplog):
    served = read_artifacts(artifacts)
    planned = with_metadata(
        served, files={**served.metadata.files, "plan": "model.plan"}, tensorrt={"gpu_name": "NVIDIA H100"}
    )
    with caplog.at_level(logging.INFO):
        backend, reason = asyncio.run(choose_backend(settings_for(artifacts), planned, None))
    try:
        lines = [r.getMessage() for r in caplog.records if "TensorRT plan" in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0], lines
        assert "NVIDIA H100" in lines[0] and "onnxruntime on cpu" in lines[0] and lines[0] in reason
    finally:
        backend.close()


def test_the_backend_the_artifacts_were_made_for_says_nothing(artifacts):
    served = read_artifacts(artifacts)
    backend = OnnxRuntimeBackend(served, gpu=False, threads=1)
    try:
        assert artifacts_mismatch(served, backend) is None  # a CPU export on the CPU
        int8 = with_metadata(served, settings={**served.metadata.settings, "cpu_int8": True})
        assert "OpenVINO int8" in artifacts_mismatch(int8, backend)
    finally:
        backend.close()


def test_a_cpu_export_served_on_a_gpu_is_named(artifacts):
    class OnGpu:  # what a CUDA backend reports; only its name and device are read
        name, device = "onnxruntime", "cuda:0"

    message = artifacts_mismatch(read_artifacts(artifacts), OnGpu())
    assert "without a TensorRT plan" in message and "onnxruntime on cuda:0" in message
