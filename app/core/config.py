"""The service's one settings class: every knob, typed, read from ``CAMA_*`` environment variables.

Unsafe defaults are refused outside development: a production deployment must set a token.
In development with no token, a random one is generated at start-up and written next to the
model store (as TorchServe does with its key file), so management endpoints are never open.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, TypeAdapter, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cama.adapt import HOLDOUT_FRACTION, FinetuneConfig, GateConfig
from cama.novelty import DEFAULT_RULE, Rule
from cama.objectives import SCREEN_MARGIN

WEAK_TOKENS = frozenset({"changeme", "change-me", "secret", "token", "password", "test", "admin"})
MIN_TOKEN_BITS = 64.0


def token_bits(token: str) -> float:
    """An upper estimate of a token's entropy: its length times the Shannon entropy (bits) of its
    character frequencies. ``secrets.token_urlsafe(24)`` scores about 150; 16 spaces score 0."""
    if not token:
        return 0.0
    counts = Counter(token)
    n = len(token)
    return n * -sum(c / n * math.log2(c / n) for c in counts.values())


def token_problem(token: str) -> str | None:
    """Why ``token`` is unfit for production, or None: at least 16 characters, no whitespace, not
    a common word, at least 64 bits by :func:`token_bits`."""
    if len(token) < 16:
        return "shorter than 16 characters"
    if any(ch.isspace() for ch in token):
        return "contains whitespace"
    if token.lower() in WEAK_TOKENS:
        return "a common word"
    if token_bits(token) < MIN_TOKEN_BITS:
        return f"too predictable ({token_bits(token):.0f} bits, need {MIN_TOKEN_BITS:.0f})"
    return None


def operator_recipe(overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe settings an operator set (``CAMA_FINETUNE__<FIELD>``), typed by
    :class:`cama.adapt.FinetuneConfig`'s fields (environment strings are converted) and checked
    against its ranges; unknown names are refused."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(FinetuneConfig)})
    if unknown:
        raise ValueError(f"unknown finetune settings {unknown}")
    typed = _RECIPE.validate_python(overrides)  # lax: "0.01" -> 0.01, ranges checked
    return {name: getattr(typed, name) for name in overrides}


_RECIPE: TypeAdapter[FinetuneConfig] = TypeAdapter(FinetuneConfig)


class Settings(BaseSettings):
    """Service settings; ``CAMA_<FIELD>`` in the environment overrides each default."""

    model_config = SettingsConfigDict(
        env_prefix="CAMA_", extra="ignore", env_nested_delimiter="__", env_parse_none_str="null"
    )

    environment: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: str = "info"

    # models and their registry
    model_store: Path = Path("model_store")
    seed_dir: Path = Path("models")  # <seed_dir>/<name>_cama.pt + <name>_serving_data.npz seed an empty store
    models: list[str] = Field(default_factory=lambda: ["mnist", "cifar_binary", "measurement"])
    poll_interval_s: float = Field(default=1.0, gt=0)

    # jobs: Redis + Celery, or the embedded in-process worker when redis_url is unset
    redis_url: str | None = None
    redis_prefix: str = "cama:"
    queue: str = "cama"
    task_name: str = "cama.adapt"
    job_timeout_s: int = Field(default=3600, ge=10)
    # a worker's lease on its job: renewed every third of this; a job whose lease expired is
    # queued again (or failed after job_max_attempts starts)
    job_lease_s: float = Field(default=15.0, ge=1.0)
    job_max_attempts: int = Field(default=3, ge=1)
    reap_interval_s: float = Field(default=5.0, gt=0)
    token: SecretStr | None = None
    token_file: Path | None = None  # default <model_store>/.token

    # inference
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["onnx", "torch"] = "onnx"
    k: int = Field(default=10, ge=1)
    max_k: int = Field(default=100, ge=1)
    torch_threads: int | None = Field(default=None, ge=1)
    # the first-sample screen (nats): all K importance samples only where the first leaves the
    # label undecided (cama.objectives.screened_log_weights); null: all K for every input
    screen_margin: float | None = Field(default=SCREEN_MARGIN, ge=0.0)
    # how unusual each input is (cama.novelty) and drift on live traffic (cama.drift)
    evidence_inputs: int = Field(
        default=500, ge=0, description="canary inputs that calibrate the unusual score (0: no score)"
    )
    unusual_rule: Rule = Field(
        default=DEFAULT_RULE,
        description="evidence | m | m_class | max: what the unusual score reads (cama.novelty)",
    )
    drift_window: int = Field(default=100, ge=2, description="inputs in the drift test's window")
    drift_alarm_z: float = Field(default=5.0, gt=0)
    drift_clear_z: float = Field(default=2.0)
    # adaptation from live traffic (app.auto_adapt): opt-in per model, off by default
    auto_adapt: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="models that adapt from their own traffic while in drift"
    )
    auto_adapt_inputs: int = Field(
        default=500, ge=2, description="unusual inputs kept during a drift; a full buffer starts one job"
    )
    auto_adapt_min_unusual: float = Field(
        default=0.5, ge=0.0, le=1.0, description="inputs scoring below this are not kept"
    )
    auto_adapt_max_age_s: float = Field(default=900.0, gt=0, description="a kept input is dropped after this")
    auto_adapt_cooldown_s: float = Field(
        default=600.0, ge=0, description="no new drift job this long after one that published nothing"
    )
    # routing (cama.novelty.route): each input answered by the version that explains it best
    route_versions: int = Field(
        default=0,
        ge=0,
        le=8,
        description="other versions (most recent first) that answer beside the served one (0: no routing)",
    )
    batching: bool = True
    batch_max_inputs: int = Field(default=64, ge=1)
    batch_max_wait_ms: float = Field(default=5.0, ge=0)
    # the request cost model: a request asks for inputs x k x classes decoder passes (eq. 6)
    max_work: int = Field(default=64000, ge=1, description="most work one /predict may ask for")
    chunk_work: int = Field(
        default=1000, ge=1, description="most work (decoder passes) of one forward pass: bounds its memory"
    )
    decode_slots: int = Field(default=2, ge=1, description="request bodies decoded at once")
    malloc_arena_max: int | None = Field(default=2, ge=1, description="glibc malloc arenas (None: glibc's)")

    # input limits
    max_inputs: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=8 << 20, ge=1024)
    max_adapt_inputs: int = Field(default=20000, ge=1)
    max_adapt_body_bytes: int = Field(default=96 << 20, ge=1024)
    max_image_bytes: int = Field(default=1 << 20, ge=64)

    # adaptation and its promotion gate
    # recipe settings that override every model's own (``adapt_recipe``); empty: each model's recipe
    finetune: dict[str, Any] = Field(default_factory=dict)
    # the promotion gate: cama.adapt.GateConfig's fields, e.g. CAMA_GATE__MAX_CLEAN_DROP=0.01 or
    # CAMA_GATE='{"min_confidence": null}' (null switches a check off); its screen is screen_margin
    gate: GateConfig = Field(default_factory=GateConfig)
    holdout_fraction: float = Field(default=HOLDOUT_FRACTION, gt=0.0, lt=1.0)
    min_adapt_inputs: int = Field(default=10, ge=2)

    @field_validator("auto_adapt", mode="before")
    @classmethod
    def _model_list(cls, value: Any) -> Any:
        """``CAMA_AUTO_ADAPT=mnist,measurement`` as well as a JSON list."""
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("gate", mode="before")
    @classmethod
    def _known_gate_settings(cls, value: Any) -> Any:
        """Refuse a gate setting that :class:`cama.adapt.GateConfig` does not have (a typo)."""
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(GateConfig)})
            if unknown:
                raise ValueError(f"unknown gate settings {unknown}")
        return value

    @field_validator("finetune")
    @classmethod
    def _typed_recipe(cls, value: dict[str, Any]) -> dict[str, Any]:
        return operator_recipe(value)

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Self:
        if self.max_k < self.k:
            raise ValueError(f"k={self.k} exceeds max_k={self.max_k}")
        if self.drift_clear_z >= self.drift_alarm_z:
            raise ValueError(
                f"drift_clear_z={self.drift_clear_z} must be below drift_alarm_z={self.drift_alarm_z}"
            )
        unknown = sorted(set(self.auto_adapt) - set(self.models))
        if unknown:
            raise ValueError(f"auto_adapt names models that are not served: {unknown}")
        if self.environment != "development":
            token = self.token.get_secret_value() if self.token is not None else ""
            if not token:
                raise ValueError("CAMA_TOKEN must be set outside development (no default token)")
            problem = token_problem(token)
            if problem is not None:
                raise ValueError(
                    f"CAMA_TOKEN is too weak ({problem}): use e.g. python -c "
                    "'import secrets; print(secrets.token_urlsafe(32))'"
                )
        return self

    @property
    def embedded(self) -> bool:
        """Jobs run in a background thread of the API process (no Redis configured)."""
        return not self.redis_url

    @property
    def resolved_token_file(self) -> Path:
        return self.token_file or self.model_store / ".token"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
