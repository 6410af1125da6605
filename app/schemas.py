"""Request and response bodies, split by direction (``...Request`` in, ``...Public`` out)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from cama.adapt import FinetuneConfig

JobState = Literal["queued", "running", "succeeded", "rejected", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "rejected", "failed", "cancelled"})

ImageItem = str | list[list[float]]


class MeasurementRecord(BaseModel):
    """One measurement data point: parents ``a``, co-parents ``c`` and children ``x``."""

    model_config = ConfigDict(extra="forbid")

    a: list[float]
    c: list[float]
    x: list[float]


class InputsRequest(BaseModel):
    """The inputs of a request: ``images`` (base64 PNG/JPEG or 28x28 arrays in [0, 1]) or ``records``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=64, examples=["mnist"])
    images: list[ImageItem] | None = Field(
        default=None, description="base64 PNG/JPEG, or 28x28 arrays in [0, 1]"
    )
    records: list[MeasurementRecord] | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> Self:
        if (self.images is None) == (self.records is None):
            raise ValueError("give exactly one of 'images' or 'records'")
        return self

    @property
    def count(self) -> int:
        return len(self.images if self.images is not None else self.records or [])


class PredictRequest(InputsRequest):
    """``POST /predict`` (JSON). ``k`` importance samples (default from settings), ``seed`` for replay."""

    k: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class PredictionPublic(BaseModel):
    label: int
    probabilities: list[float]


class PredictResponse(BaseModel):
    """Every prediction of one response comes from the same model version."""

    model: str
    version: int
    k: int
    seed: int
    predictions: list[PredictionPublic]


def recipe_overrides(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A job's recipe overrides, checked by :meth:`cama.adapt.FinetuneConfig.from_dict`: known
    names, exact types (no strings or booleans as numbers), values in range."""
    if value is not None:
        FinetuneConfig.from_dict(value)
    return value


RECIPE_SCHEMA = TypeAdapter(FinetuneConfig).json_schema()
FinetuneOverrides = Annotated[
    dict[str, Any] | None,
    AfterValidator(recipe_overrides),
    Field(
        description="per-job overrides of the model's adaptation recipe (cama.adapt.FinetuneConfig)",
        json_schema_extra={"properties": RECIPE_SCHEMA["properties"], "additionalProperties": False},
    ),
]


class AdaptRequest(InputsRequest):
    """``POST /adapt`` (JSON): an unlabelled batch, and optional recipe overrides."""

    finetune: FinetuneOverrides = None


class AdaptAccepted(BaseModel):
    job_id: str
    state: JobState
    status_url: str


class JobPublic(BaseModel):
    """An adaptation job as ``GET /jobs/{id}`` reports it."""

    id: str
    model: str
    state: JobState
    progress: float = Field(ge=0.0, le=1.0)
    n_inputs: int
    data_hash: str
    base_version: int | None = None
    version: int | None = None
    created: float
    started: float | None = None
    finished: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    gate: dict[str, Any] | None = None
    reasons: list[str] = Field(default_factory=list)
    error: str | None = None
    cancel_requested: bool = False
    finetune: dict[str, Any] = Field(default_factory=dict)


class VersionPublic(BaseModel):
    """One version's lineage."""

    version: int
    parent: int | None
    created: str
    data_hash: str | None
    job_id: str | None
    metrics: dict[str, float]
    gate: dict[str, Any] | None
    files: dict[str, str]


class ModelSummary(BaseModel):
    name: str
    kind: str | None
    active_version: int | None
    served_version: int | None
    versions: list[int]


class ModelPublic(ModelSummary):
    inputs: dict[str, list[int]] | None
    lineage: list[VersionPublic]


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)


class HealthPublic(BaseModel):
    status: Literal["ok", "unavailable"]
    models: dict[str, int | None] = Field(default_factory=dict)
    problems: dict[str, str] = Field(default_factory=dict)
