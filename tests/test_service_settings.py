"""The service's settings: VITAE_ environment variables, defaults, refusals."""

from __future__ import annotations

import pytest

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
