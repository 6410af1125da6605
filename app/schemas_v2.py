"""Bodies of the Open Inference Protocol (KServe v2, Triton's HTTP/REST), split by direction.

The protocol's ``$parameters`` are free-form; here each object takes exactly the parameters the
service reads (anything else is a 422), with strict types as in the native API.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Dim = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InferParameters(_Strict):
    """Request parameters: eq. 6's ``k`` importance samples (default from settings), the noise
    ``seed`` for replay, and the binary tensor data extension's ``binary_data_output``."""

    k: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    binary_data_output: bool = Field(default=False, description="every output as binary data")


class InputParameters(_Strict):
    binary_data_size: int | None = Field(
        default=None, ge=0, description="the tensor's bytes follow the JSON header (binary tensor data)"
    )


class OutputParameters(_Strict):
    binary_data: bool | None = Field(default=None, description="this output as binary data")


class InferInputRequest(_Strict):
    """One input tensor: its data in JSON (row-major, flat or nested) or as binary data."""

    name: str = Field(min_length=1, max_length=64, examples=["x"])
    shape: list[Dim] = Field(max_length=8, examples=[[1, 1, 28, 28]])
    datatype: str = Field(max_length=16, examples=["FP32"])
    parameters: InputParameters | None = None
    data: list[Any] | None = Field(
        default=None,
        description="FP32: numbers; BYTES: base64 PNG/JPEG strings. Absent with binary_data_size.",
    )


class InferOutputRequest(_Strict):
    name: str = Field(min_length=1, max_length=64, examples=["probabilities"])
    parameters: OutputParameters | None = None


class InferRequest(_Strict):
    """``POST /v2/models/{name}[/versions/{version}]/infer``."""

    id: str | None = Field(default=None, max_length=256)
    parameters: InferParameters | None = None
    inputs: list[InferInputRequest] = Field(min_length=1, max_length=8)
    outputs: list[InferOutputRequest] | None = Field(
        default=None, max_length=8, description="the outputs to return (default: all)"
    )


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class InferOutputPublic(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, int] | None = Field(default=None, description="binary_data_size of binary data")
    data: list[float | int | str | None] | None = Field(
        default=None, description="row-major, flat; null for a non-finite number"
    )


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(default=None, description="the request's id")
    parameters: dict[str, int] = Field(description="k and seed of this answer")
    outputs: list[InferOutputPublic]


class ServerMetadataPublic(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadataPublic(BaseModel):
    name: str
    versions: list[str] = Field(description="the version this process serves")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class LivePublic(BaseModel):
    live: bool


class ReadyPublic(BaseModel):
    ready: bool


class ModelReadyPublic(BaseModel):
    name: str
    ready: bool


class ErrorPublic(BaseModel):
    """Every error under ``/v2``: the protocol's ``error`` and the service's machine-readable ``reason``."""

    error: str
    reason: str
