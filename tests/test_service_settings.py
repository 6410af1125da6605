"""Settings: one class, typed, from CAMA_* variables; unsafe defaults refused outside development."""

from __future__ import annotations

from dataclasses import replace

import pytest
from pydantic import ValidationError

from app.core.config import Settings
from app.schemas import JobPublic
from cama.adapt import MEASUREMENT_RECIPE, FinetuneConfig, GateConfig
from store.adaptation import finetune_config


def test_development_defaults_are_the_embedded_mode(monkeypatch):
    for key in ("CAMA_REDIS_URL", "CAMA_TOKEN", "CAMA_ENVIRONMENT"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert s.embedded
    assert s.token is None
    assert s.models == ["mnist", "cifar_binary", "measurement"]
    assert s.gate == GateConfig()  # the core's defaults
    assert s.k == 10
    assert s.batching


def test_production_requires_a_strong_token():
    with pytest.raises(ValidationError, match="CAMA_TOKEN must be set"):
        Settings(environment="production")
    with pytest.raises(ValidationError, match="too weak"):
        Settings(environment="production", token="changeme")
    assert Settings(environment="production", token="Vq3xL9-wPz2mK7rT_hY4nB8s").token is not None
    for weak in (" " * 16, "k" * 32, "abababababababab", "password"):  # no entropy, or a word
        with pytest.raises(ValidationError, match="too weak"):
            Settings(environment="production", token=weak)


def test_environment_variables_including_nested_recipe(monkeypatch):
    monkeypatch.setenv("CAMA_MODELS", '["mnist"]')
    monkeypatch.setenv("CAMA_REDIS_URL", "redis://localhost:6379/0")
    monkeypatch.setenv("CAMA_FINETUNE", '{"lr": 0.003, "epochs": 5}')
    monkeypatch.setenv("CAMA_GATE__MAX_CLEAN_DROP", "0.01")
    s = Settings()
    assert s.models == ["mnist"]
    assert not s.embedded
    assert s.finetune == {"lr": 0.003, "epochs": 5}  # only what the operator set
    assert s.gate.max_clean_drop == 0.01
    monkeypatch.delenv("CAMA_FINETUNE")
    monkeypatch.setenv("CAMA_FINETUNE__LR", "0.002")
    monkeypatch.setenv("CAMA_FINETUNE__BF16", "false")
    assert Settings().finetune == {"lr": 0.002, "bf16": False}  # typed from the environment's strings
    monkeypatch.setenv("CAMA_FINETUNE__LR", "7")
    with pytest.raises(ValidationError, match="lr must be"):
        Settings()
    monkeypatch.delenv("CAMA_FINETUNE__LR")
    monkeypatch.setenv("CAMA_FINETUNE__LEARNING_RATE", "0.1")
    with pytest.raises(ValidationError, match="unknown finetune settings"):
        Settings()


def test_auto_adapt_and_routing_settings(monkeypatch):
    s = Settings()
    assert s.auto_adapt == []
    assert s.route_versions == 0
    assert s.unusual_rule == "m_class"
    monkeypatch.setenv("CAMA_AUTO_ADAPT", "mnist, measurement")
    assert Settings().auto_adapt == ["mnist", "measurement"]
    monkeypatch.setenv("CAMA_AUTO_ADAPT", '["mnist"]')
    assert Settings().auto_adapt == ["mnist"]
    monkeypatch.setenv("CAMA_AUTO_ADAPT", "cifar")
    with pytest.raises(ValidationError, match="not served"):
        Settings()
    monkeypatch.delenv("CAMA_AUTO_ADAPT")
    for bad in ({"route_versions": 9}, {"auto_adapt_inputs": 1}, {"unusual_rule": "both"}):
        with pytest.raises(ValidationError):
            Settings(**bad)


def test_invalid_values_are_refused():
    with pytest.raises(ValidationError):
        Settings(k=20, max_k=10)
    with pytest.raises(ValidationError):
        Settings(batch_max_inputs=0)
    with pytest.raises(ValidationError, match="drift_clear_z"):
        Settings(drift_alarm_z=3.0, drift_clear_z=3.0)


def test_gate_settings_are_the_core_gate_config_and_switch_off_with_null(monkeypatch):
    assert Settings().gate.max_label_kl_rise == GateConfig().max_label_kl_rise
    monkeypatch.setenv("CAMA_GATE__MAX_LABEL_KL_RISE", "null")
    monkeypatch.setenv("CAMA_GATE__MAX_CONFIDENCE_DROP", "null")
    monkeypatch.setenv("CAMA_GATE__K", "3")
    s = Settings()
    assert s.gate == replace(GateConfig(), max_label_kl_rise=None, max_confidence_drop=None, k=3)
    monkeypatch.setenv("CAMA_GATE__MAX_CONFIDENCE_DROP", "-1")
    with pytest.raises(ValidationError, match="max_confidence_drop must be"):  # the core's ranges
        Settings()
    monkeypatch.delenv("CAMA_GATE__MAX_CONFIDENCE_DROP")
    monkeypatch.setenv("CAMA_GATE", '{"min_confidence": null}')
    assert Settings().gate.min_confidence is None
    monkeypatch.setenv("CAMA_GATE", '{"max_clean_dorp": 0.1}')
    with pytest.raises(ValidationError, match="unknown gate settings"):
        Settings()


def _job(**finetune: object) -> JobPublic:
    return JobPublic(
        id="j",
        model="m",
        state="queued",
        progress=0.0,
        n_inputs=1,
        data_hash="h",
        created=0.0,
        finetune=dict(finetune),
    )


def test_recipe_precedence_defaults_model_operator_job(monkeypatch):
    shipped = MEASUREMENT_RECIPE.as_dict()
    s = Settings()
    assert finetune_config(s, _job(), None) == FinetuneConfig()  # the core's recipe
    assert finetune_config(s, _job(), shipped) == MEASUREMENT_RECIPE  # the model's recipe
    cfg = finetune_config(s, _job(), {"alpha": 0.9})  # an older, partial recipe: the rest from the core
    assert cfg == replace(FinetuneConfig(), alpha=0.9)
    monkeypatch.setenv("CAMA_FINETUNE__EPOCHS", "7")
    cfg = finetune_config(Settings(), _job(), shipped)
    assert (cfg.alpha, cfg.epochs) == (0.9, 7)  # a setting the operator set beats the model's
    cfg = finetune_config(Settings(), _job(epochs=2, alpha=0.3), shipped)
    assert (cfg.alpha, cfg.epochs, cfg.batch_size) == (0.3, 2, 50)  # the job's overrides beat everything
    cfg = finetune_config(Settings(), _job(lr_schedule="cosine", decay_fraction=0.5), shipped)
    assert (cfg.lr_schedule, cfg.decay_fraction) == ("cosine", 0.5)
    with pytest.raises(ValueError, match="unknown recipe settings"):
        finetune_config(Settings(), _job(), {**shipped, "unknown_field": 1})
