"""A new user's machine: no Fashion-MNIST, no artifacts, no earlier `make test` — the service still starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from support.optional import DEV_ONLY

from benchmarks.harness import free_port, wait_ready
from export.inputs import SAMPLES, drawn_images, real_images
from model.data import FASHION_MNIST_DIR, FASHION_MNIST_ENV, fashion_mnist_dir

ROOT = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = ROOT / "demo" / "model" / "vitae_fmnist.safetensors"


def test_drawn_images_are_valid_for_every_seed_count_and_size():
    hypothesis = pytest.importorskip("hypothesis", reason=f"hypothesis is {DEV_ONLY}")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(seed=st.integers(0, 2**32 - 1), count=st.integers(0, 6), size=st.integers(2, 96))
    def check(seed, count, size):
        images = drawn_images(count, size=size, seed=seed)
        assert len(images) == count
        assert all(image.size == (size, size) and image.mode == "RGB" for image in images)

    check()


@pytest.mark.parametrize("count", [1, 20, 21, 64, 256])
@pytest.mark.parametrize("with_samples", [True, False], ids=["samples", "no-samples"])
def test_real_images_fill_any_count_without_the_dataset(count, with_samples, tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "absent"))
    images, origin = real_images(count, samples=SAMPLES if with_samples else None)
    assert len(images) == count
    assert ("demo samples" in origin) == with_samples
    assert "Fashion-MNIST" not in origin
    assert np.asarray(images[-1]).size > 0


def test_the_dataset_location_is_read_from_the_environment_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    assert fashion_mnist_dir() == FASHION_MNIST_DIR
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    assert fashion_mnist_dir() == tmp_path


def _hidden_dataset_command(empty: Path) -> list[str]:
    """Run in a private mount namespace with an empty folder over Debian's dataset location, where possible.

    The environment override alone hides the dataset from code that honours it; the bind mount also hides it
    from code that would look at the fixed path, which is what a machine without the package is like.
    """
    command = [sys.executable, "-m", "service"]
    if os.geteuid() == 0 and shutil.which("unshare") and FASHION_MNIST_DIR.is_dir():
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
        if probe.returncode == 0:
            mount = f'mount --bind {empty} {FASHION_MNIST_DIR} && exec "$@"'
            return ["unshare", "-m", "sh", "-c", mount, "sh", *command]
    return command


def test_the_serve_command_becomes_ready_and_classifies_with_no_dataset_and_no_artifacts(tmp_path):
    empty = tmp_path / "no-dataset"
    empty.mkdir()
    port = free_port()
    env = os.environ | {
        FASHION_MNIST_ENV: str(empty),
        "VITAE_ARTIFACTS": str(tmp_path / "artifacts"),
        "VITAE_CHECKPOINT": str(DEMO_CHECKPOINT),
        "VITAE_HOST": "127.0.0.1",
        "VITAE_PORT": str(port),
        "VITAE_LOG_LEVEL": "warning",
    }
    log = (tmp_path / "service.log").open("w")
    process = subprocess.Popen(_hidden_dataset_command(empty), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, timeout=240, exited=lambda: process.poll() is not None)
        except RuntimeError as exc:
            pytest.fail(f"the service did not become ready: {exc}\n{(tmp_path / 'service.log').read_text()}")
        sample = sorted(SAMPLES.glob("*.png"))[0]
        response = httpx.post(
            f"{url}/classify",
            params={"cam": "true", "top_k": 3},
            files={"file": (sample.name, sample.read_bytes(), "image/png")},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        result = response.json()
        assert len(result["predictions"]) == 3
        assert result["cam"]["overlay_jpeg"]
        meta = json.loads((tmp_path / "artifacts" / "metadata.json").read_text())
        assert "Fashion-MNIST" not in json.dumps(meta["parity"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
