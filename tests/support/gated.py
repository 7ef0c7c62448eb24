"""Waiting on events, not on timing windows: a backend held at a gate, and a poll with a deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from service.artifacts import read_artifacts
from service.backends import OnnxRuntimeBackend


class GatedBackend:
    """The real ONNX Runtime backend; while the gate is closed, batches wait in `infer` (the device is 'busy')."""

    def __init__(self, artifacts) -> None:
        self.real = OnnxRuntimeBackend(read_artifacts(artifacts), gpu=False, threads=1)
        self.name, self.device = self.real.name, self.real.device
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = 0  # images held at the gate right now
        self.batches: list = []  # every batch it was asked to compute, warm-up included, in order

    def infer(self, images):
        self.batches.append(images.copy())
        self.waiting += len(images)
        try:
            assert self.gate.wait(120), "the test never opened the gate"
        finally:
            self.waiting -= len(images)
        return self.real.infer(images)

    def close(self) -> None:
        self.real.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; fail, naming `what`, after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
