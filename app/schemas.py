"""Request and response bodies, split by direction (``...Request`` in, ``...Public`` out)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from cama.adapt import FinetuneConfig
from store.jobs import JobRecord, JobState

JobPublic = JobRecord  # GET /jobs/{id} answers the job record as it is


ImageItem = str | list[list[float]] | list[list[list[float]]]  # base64, H x W or C x H x W


class MeasurementRecord(BaseModel):
    """One measurement data point in model space: parents ``a``, co-parents ``c`` and children ``x``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    a: list[float]
    c: list[float]
    x: list[float]


INPUT_FORMS = ("images", "records", "rows")


def _no_default(schema: dict[str, Any]) -> None:
    """An input form is left out when unused; its schema shows no ``null`` default."""
    schema.pop("default", None)


class InputsRequest(BaseModel):
    """The inputs of a request: ``images`` (base64 PNG/JPEG or C x H x W arrays in [0, 1]), ``records``
    (model space) or ``rows`` (a table model's columns in the table's own units). Types are strict:
    a string or a boolean is never taken for a number."""

    # the schema says what the validator checks: exactly one input form, and never null
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"oneOf": [{"required": [form]} for form in INPUT_FORMS]},
    )

    model: str = Field(min_length=1, max_length=64, examples=["mnist"])
    images: list[ImageItem] | SkipJsonSchema[None] = Field(
        default=None,
        description="base64 PNG/JPEG, or arrays in [0, 1]: C x H x W (H x W for a one-channel model); "
        "GET /models/{name} -> inputs.x gives the shape",
        json_schema_extra=_no_default,
    )
    records: list[MeasurementRecord] | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default
    )
    rows: list[dict[str, Any]] | SkipJsonSchema[None] = Field(
        default=None,
        description="rows keyed by the model's column names, in the table's own units (GET /models/{name} "
        "-> schema)",
        json_schema_extra=_no_default,
    )

    @model_validator(mode="before")
    @classmethod
    def _no_null_form(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for form in INPUT_FORMS:
                if form in data and data[form] is None:
                    raise ValueError(f"'{form}' must be a list, not null (leave it out)")
        return data

    @model_validator(mode="after")
    def _one_input_form(self) -> Self:
        if sum(form is not None for form in (self.images, self.records, self.rows)) != 1:
            raise ValueError("give exactly one of 'images', 'records' or 'rows'")
        return self


class PredictRequest(InputsRequest):
    """``POST /predict`` (JSON). ``k`` importance samples (default from settings), ``seed`` for replay."""

    k: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class PredictionPublic(BaseModel):
    label: int
    class_name: str | None = Field(
        default=None,
        description="the label's class name (table models, models trained on named image classes)",
    )
    probabilities: list[float]
    log_px: float | None = Field(
        default=None, description="log p(x): the log-sum-exp over classes of eq. 6's log-weights (nats)"
    )
    unusual: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="the share of the version's clean canary inputs with a higher log p(x); "
        "given at the service's default k only",
    )
    route: int | None = Field(
        default=None,
        description="with routing on (CAMA_ROUTE_VERSIONS): the version that answered this input, "
        "the one whose log p(x) is highest",
    )


class DriftPublic(BaseModel):
    """The drift test of a model's served version over its last window of unusual scores."""

    model: str
    version: int | None
    state: Literal["warming", "normal", "drift"]
    statistic: float | None = Field(description="z = (mean unusual - 1/2) * sqrt(12 window)")
    window: int
    alarm_z: float
    clear_z: float
    since: datetime | None = Field(description="when the state last changed")
    seen: int = Field(description="inputs tested since this version was served")
    alarms: int
    reference_k: int | None = Field(description="the k the unusual score is calibrated at")
    auto_adapt: bool = Field(
        default=False, description="the model adapts from its own traffic (CAMA_AUTO_ADAPT)"
    )
    buffered: int = Field(default=0, description="unusual inputs this process keeps for a drift-started job")
    auto_job: str | None = Field(default=None, description="the drift-started job running now")
    routes: list[int] = Field(
        default_factory=list, description="versions answering beside the served one (CAMA_ROUTE_VERSIONS)"
    )


class PredictResponse(BaseModel):
    """Every prediction of one response comes from the same model version, or with routing on
    from the version each prediction's ``route`` names."""

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


class TableSchemaPublic(BaseModel):
    """The table a model was trained from: column roles, class names, standardisation."""

    target: str
    parents: list[str]
    coparents: list[str]
    children: list[str]
    classes: list[str]
    mean: dict[str, float]
    std: dict[str, float]


class ModelPublic(ModelSummary):
    inputs: dict[str, list[int]] | None
    table_schema: TableSchemaPublic | None = Field(
        default=None, serialization_alias="schema", description="present for models trained from a table"
    )
    lineage: list[VersionPublic]


class ErrorDetail(BaseModel):
    reason: str = Field(description="machine-readable")
    message: str
    errors: list[dict[str, Any]] | None = Field(default=None, description="schema errors (invalid_request)")


class ErrorBody(BaseModel):
    """Every error response."""

    detail: ErrorDetail


def whole_number(value: Any) -> Any:
    """A JSON integer: an int, or a float with no fractional part (``3.0``, as JSON Schema's
    "integer" allows); never a boolean or a string."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


class ActivateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: Annotated[int, BeforeValidator(whole_number)] = Field(ge=1)


class HealthPublic(BaseModel):
    status: Literal["ok", "unavailable"]
    models: dict[str, int | None] = Field(default_factory=dict)
    problems: dict[str, str] = Field(default_factory=dict)
