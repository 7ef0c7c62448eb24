"""Dev-only packages that a few tests need: imported inside those tests, which skip with the reason where the
package is absent (a GPU machine's own Python, a runtime-only install), so that every module still collects."""

from __future__ import annotations

from types import ModuleType

import pytest

DEV_ONLY = "a dev-only package (pip install -e '.[dev]')"


def triton_model_config() -> ModuleType:
    """tritonclient's ModelConfig protobuf module (config.pbtxt's schema), or a skip."""
    return pytest.importorskip("tritonclient.grpc.model_config_pb2", reason=f"tritonclient is {DEV_ONLY}")
