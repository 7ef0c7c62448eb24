"""The service's settings: VITAE_ environment variables, defaults, refusals."""

from __future__ import annotations

import pytest
from support.checkpoints import exported

from service.artifacts import read_artifacts
from service.runtime import CPU_STREAM_MAX_BATCH, classify_max_batch
from service.settings import Settings, get_settings


def test_settings_come_from_vitae_environment_variables(monkeypatch):
    monkeypatch.setenv("VITAE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("VITAE_BACKEND", "torch")
    monkeypatch.setenv("VITAE_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("VITAE_API_KEY", "k")
    settings = get_settings()
    assert settings.max_batch_size == 7 and settings.backend == "torch"
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.api_key.get_secret_value() == "k"
    assert get_settings(max_batch_size=3).max_batch_size == 3  # explicit values win


def test_settings_defaults_serve_the_demo_model_on_port_8000(monkeypatch):
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"VITAE_{name.upper()}", raising=False)
    settings = get_settings()
    assert (settings.host, settings.port, settings.backend) == ("0.0.0.0", 8000, "auto")
    assert str(settings.artifacts) == "artifacts"
    assert str(settings.checkpoint) == "demo/model/vitae_fmnist.safetensors"
    assert settings.api_key is None and settings.cors_origins == []


def test_an_invalid_setting_is_refused(monkeypatch):
    monkeypatch.setenv("VITAE_BACKEND", "tensorflow")
    with pytest.raises(ValueError, match="backend"):
        get_settings()


# ------------------------------------------------------------------ the classify batcher's largest batch


class Engine:
    """What classify_max_batch reads of a backend: its name and how many streams it runs."""

    def __init__(self, name: str, streams: int) -> None:
        self.name, self.streams = name, streams


def test_a_cpu_backend_with_several_streams_batches_a_few_images_unless_told_otherwise(tiny_checkpoint):
    served = read_artifacts(exported(tiny_checkpoint))
    default = get_settings()
    assert classify_max_batch(default, Engine("openvino", 2), served) == CPU_STREAM_MAX_BATCH
    assert classify_max_batch(default, Engine("openvino", 1), served) == default.max_batch_size
    assert classify_max_batch(get_settings(max_batch_size=16), Engine("openvino", 2), served) == 16  # set: obeyed
    assert classify_max_batch(get_settings(max_batch_size=4096), Engine("tensorrt", 1), served) == (
        served.metadata.max_batch
    )
