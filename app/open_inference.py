"""The Open Inference Protocol's wire format (KServe v2, Triton's HTTP/REST): an inference request's
tensors to :class:`store.data.Inputs`, and a :class:`app.prediction.Prediction` to output tensors.

Inputs are the model's own (``GET /v2/models/{name}``): an image model takes ``x``, an ``FP32``
tensor ``[N, C, H, W]`` in [0, 1] or a ``BYTES`` tensor ``[N]`` of PNG/JPEG files; a measurement
model takes ``x``, ``a`` and ``c``, ``FP32`` ``[N, D]`` each (children, parents, co-parents).
Tensor data comes in JSON (row-major, flat or nested; ``BYTES`` elements as base64 strings) or,
with the binary tensor data extension, as bytes after a JSON header of
``Inference-Header-Content-Length`` bytes (little-endian; ``BYTES`` elements each preceded by
their length as a 4-byte little-endian integer). Outputs are ``probabilities`` (``FP32 [N, C]``),
``label`` (``INT64 [N]``), ``log_px`` (``FP32 [N]``) and, where ``/predict`` gives it,
``unusual`` (``FP32 [N]``), each in JSON or as binary data as the request asks.

Every refusal is a :class:`store.errors.DomainError` with the same reason and status as
``/predict``'s for the same fault.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypeAliasType

from app.errors import validation_body
from app.inputs import check_values, files_to_inputs, images_to_inputs
from app.prediction import Prediction
from app.schemas_v2 import InferInputRequest, InferRequest, TensorMetadata
from store.data import INPUT_NAMES, Inputs
from store.errors import InvalidInputError, LimitExceededError

EXTENSIONS = ("binary_tensor_data",)
OUTPUTS = ("probabilities", "label", "log_px", "unusual")
PLATFORMS = {"onnx": "onnxruntime_onnx", "torch": "pytorch_libtorch"}

Numbers = TypeAliasType("Numbers", "list[float] | list[Numbers]")
Strings = TypeAliasType("Strings", "list[str] | list[Strings]")
_NUMBERS: TypeAdapter[Any] = TypeAdapter(Numbers)
_STRINGS: TypeAdapter[Any] = TypeAdapter(Strings)


@dataclass(frozen=True)
class InferCall:
    """A decoded inference request: the inputs, k and seed (None: the defaults), the request id,
    and the outputs to return as ``(name, binary)`` (``binary`` None: ``binary_default``)."""

    inputs: Inputs
    k: int | None
    seed: int | None
    request_id: str | None
    outputs: tuple[tuple[str, bool | None], ...]
    binary_default: bool


def input_metadata(kind: str, shapes: dict[str, list[int]]) -> list[TensorMetadata]:
    """The model's input tensors, batch first (-1: any size)."""
    return [TensorMetadata(name=n, datatype="FP32", shape=[-1, *shapes[n]]) for n in INPUT_NAMES[kind]]


def output_metadata(num_classes: int, unusual: bool) -> list[TensorMetadata]:
    """The output tensors; ``unusual`` only for a version with a clean reference for the score."""
    out = [
        TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, num_classes]),
        TensorMetadata(name="label", datatype="INT64", shape=[-1]),
        TensorMetadata(name="log_px", datatype="FP32", shape=[-1]),
    ]
    if unusual:
        out.append(TensorMetadata(name="unusual", datatype="FP32", shape=[-1]))
    return out


# --- requests -------------------------------------------------------------------------------------
def read_infer(
    body: bytes,
    header_length: str | None,
    kind: str,
    shapes: dict[str, list[int]],
    max_inputs: int,
    max_image_bytes: int,
) -> InferCall:
    """An inference request body (JSON, or a JSON header of ``header_length`` bytes and binary
    tensor data) for a model of ``kind`` with per-input ``shapes`` -> :class:`InferCall`.
    Names, datatypes and shapes are checked, and the input count against ``max_inputs``,
    before any tensor data is decoded."""
    header, binary = _split(body, header_length)
    try:
        req = InferRequest.model_validate_json(header)
    except ValidationError as exc:
        raise InvalidInputError(
            validation_body(exc.errors())["detail"]["message"], reason="invalid_request"
        ) from exc
    outputs = _requested_outputs(req)
    tensors = _named_inputs(req.inputs, kind)
    n = _batch_size(req.inputs, max_inputs)
    blobs = _binary_parts(req.inputs, binary)
    arrays = {
        name: _tensor(tensors[name], blobs.get(name), n, shapes[name], max_image_bytes) for name in tensors
    }
    names = INPUT_NAMES[kind]
    inputs = Inputs(arrays[names[0]], tuple(arrays[name] for name in names[1:]))
    params = req.parameters
    return InferCall(
        inputs=inputs,
        k=params.k if params else None,
        seed=params.seed if params else None,
        request_id=req.id,
        outputs=outputs,
        binary_default=params.binary_data_output if params else False,
    )


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tensor data) by the ``Inference-Header-Content-Length`` header."""
    if header_length is None:
        return body, memoryview(b"")
    size = header_length.strip()
    if not (size.isascii() and size.isdigit()) or int(size) > len(body):
        raise InvalidInputError(
            f"Inference-Header-Content-Length {header_length!r} is not a length within the "
            f"{len(body)}-byte body",
            reason="invalid_request",
        )
    return body[: int(size)], memoryview(body)[int(size) :]


def _requested_outputs(req: InferRequest) -> tuple[tuple[str, bool | None], ...]:
    if req.outputs is None:
        return ()
    names = [o.name for o in req.outputs]
    unknown = sorted(set(names) - set(OUTPUTS))
    if unknown:
        raise InvalidInputError(
            f"unknown outputs {unknown}; the outputs are {list(OUTPUTS)}", reason="unknown_output"
        )
    if len(set(names)) != len(names):
        raise InvalidInputError(f"an output is requested twice: {names}", reason="invalid_request")
    return tuple((o.name, o.parameters.binary_data if o.parameters else None) for o in req.outputs)


def _named_inputs(inputs: list[InferInputRequest], kind: str) -> dict[str, InferInputRequest]:
    """The input tensors by name: exactly the model's inputs, each once."""
    wanted = INPUT_NAMES[kind]
    given = [t.name for t in inputs]
    if sorted(given) != sorted(wanted):
        raise InvalidInputError(
            f"inputs {given}; this model takes {list(wanted)} (GET /v2/models/{{name}})",
            reason="wrong_input_kind",
        )
    return {t.name: t for t in inputs}


def _batch_size(inputs: list[InferInputRequest], max_inputs: int) -> int:
    """N, the first dimension every input shares; more than ``max_inputs`` is a 413."""
    sizes = {t.shape[0] if t.shape else None for t in inputs}
    if None in sizes or len(sizes) != 1:
        shapes = {t.name: t.shape for t in inputs}
        raise InvalidInputError(
            f"inputs need one batch size as their first dimension: {shapes}", reason="bad_shape"
        )
    (n,) = sizes
    assert n is not None
    if n > max_inputs:
        raise LimitExceededError(f"{n} inputs (limit {max_inputs})", reason="too_many_inputs")
    if n == 0:
        raise InvalidInputError("no inputs given (batch size 0)", reason="no_inputs")
    return n


def _binary_parts(inputs: list[InferInputRequest], binary: memoryview) -> dict[str, memoryview]:
    """Each binary input's bytes, in request order; every byte after the header must belong to one."""
    parts: dict[str, memoryview] = {}
    offset = 0
    for t in inputs:
        size = t.parameters.binary_data_size if t.parameters else None
        if size is None:
            if t.data is None:
                raise InvalidInputError(f"input {t.name!r} has no data", reason="invalid_request")
            continue
        if t.data is not None:
            raise InvalidInputError(
                f"input {t.name!r} has both data and binary_data_size", reason="invalid_request"
            )
        if offset + size > len(binary):
            raise InvalidInputError(
                f"input {t.name!r}: binary_data_size {size} runs past the body's end",
                reason="invalid_request",
            )
        parts[t.name] = binary[offset : offset + size]
        offset += size
    if offset != len(binary):
        raise InvalidInputError(
            f"{len(binary) - offset} bytes after the header belong to no input", reason="invalid_request"
        )
    return parts


def _tensor(
    t: InferInputRequest, blob: memoryview | None, n: int, shape: list[int], max_image_bytes: int
) -> np.ndarray:
    """One input tensor as float32 ``(N, *shape)``: FP32 data, or for an image input BYTES files."""
    image = len(shape) == 3
    if t.datatype == "BYTES" and image:
        if t.shape not in ([n], [n, 1]):
            raise InvalidInputError(
                f"input {t.name!r}: BYTES shape {t.shape}, expected [{n}]", reason="bad_shape"
            )
        if blob is not None:
            return files_to_inputs(_byte_elements(blob, n, t.name), max_image_bytes, _chw(shape)).x
        return images_to_inputs(_strings(t, n), max_image_bytes, _chw(shape)).x
    if t.datatype != "FP32":
        takes = "FP32 or BYTES (PNG/JPEG)" if image else "FP32"
        raise InvalidInputError(
            f"input {t.name!r}: datatype {t.datatype!r}; it takes {takes}", reason="bad_datatype"
        )
    if t.shape != [n, *shape]:
        raise InvalidInputError(
            f"input {t.name!r}: shape {t.shape}, expected {[n, *shape]}", reason="bad_shape"
        )
    count = math.prod(t.shape)
    if blob is not None:
        if len(blob) != 4 * count:
            raise InvalidInputError(
                f"input {t.name!r}: {len(blob)} bytes of FP32 data for shape {t.shape} ({4 * count} bytes)",
                reason="bad_shape",
            )
        arr = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    else:
        arr = _numbers(t, count)
    arr = arr.reshape(t.shape)
    check_values(arr, f"input {t.name!r}", unit_range=image)
    return arr


def _chw(shape: list[int]) -> tuple[int, int, int]:
    c, h, w = shape
    return c, h, w


def _numbers(t: InferInputRequest, count: int) -> np.ndarray:
    """JSON FP32 data: numbers (never strings or booleans), flat or nested as the shape."""
    try:
        values = _NUMBERS.validate_python(t.data, strict=True)
        arr = np.asarray(values, dtype=np.float32)
    except ValidationError as exc:
        raise InvalidInputError(
            f"input {t.name!r}: FP32 data must be numbers", reason="invalid_request"
        ) from exc
    except ValueError as exc:  # ragged nesting
        raise InvalidInputError(f"input {t.name!r}: ragged data", reason="bad_shape") from exc
    if arr.size != count or (arr.ndim > 1 and list(arr.shape) != t.shape):
        raise InvalidInputError(
            f"input {t.name!r}: data of shape {list(arr.shape)} for shape {t.shape}", reason="bad_shape"
        )
    return arr


def _strings(t: InferInputRequest, n: int) -> list[str]:
    """JSON BYTES data: base64 strings, flat or nested ``[N, 1]``."""
    try:
        values = _STRINGS.validate_python(t.data, strict=True)
    except ValidationError as exc:
        raise InvalidInputError(
            f"input {t.name!r}: BYTES data must be base64 strings", reason="invalid_request"
        ) from exc
    flat = [v for row in values for v in (row if isinstance(row, list) else [row])]
    if len(flat) != n or any(isinstance(v, list) for v in flat):
        raise InvalidInputError(
            f"input {t.name!r}: {len(flat)} elements for shape {t.shape}", reason="bad_shape"
        )
    return flat


def _byte_elements(blob: memoryview, n: int, name: str) -> list[bytes]:
    """Binary BYTES data: each element's 4-byte little-endian length, then its bytes."""
    out: list[bytes] = []
    offset = 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise InvalidInputError(
                f"input {name!r}: truncated BYTES element length", reason="invalid_request"
            )
        (size,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + size > len(blob):
            raise InvalidInputError(
                f"input {name!r}: BYTES element {len(out)} runs past its data", reason="invalid_request"
            )
        out.append(bytes(blob[offset : offset + size]))
        offset += size
    if len(out) != n:
        raise InvalidInputError(
            f"input {name!r}: {len(out)} BYTES elements for {n} inputs", reason="bad_shape"
        )
    return out


# --- answers --------------------------------------------------------------------------------------
def output_tensors(answer: Prediction) -> dict[str, tuple[str, np.ndarray]]:
    """The answer's output tensors by name: (datatype, array)."""
    tensors: dict[str, tuple[str, np.ndarray]] = {
        "probabilities": ("FP32", answer.probabilities.astype(np.float32)),
        "label": ("INT64", answer.labels.astype(np.int64)),
        "log_px": ("FP32", answer.log_px.astype(np.float32)),
    }
    if answer.unusual is not None:
        tensors["unusual"] = ("FP32", answer.unusual.astype(np.float32))
    return tensors


def encode_answer(answer: Prediction, call: InferCall) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length where binary tensor data follows it.
    An output that ``/predict`` would give as null (``unusual`` at another k than the
    calibrated one) is a 422 ``output_unavailable`` when asked for by name, else left out."""
    tensors = output_tensors(answer)
    wanted = call.outputs or tuple((name, None) for name in OUTPUTS if name in tensors)
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in wanted:
        if name not in tensors:
            raise InvalidInputError(
                f"output {name!r} is given only at the service's default k (this answer: k={answer.k})",
                reason="output_unavailable",
            )
        datatype, arr = tensors[name]
        out: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype}
        if call.binary_default if binary is None else binary:
            raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = _json_values(arr)
        outputs.append(out)
    body: dict[str, Any] = {"model_name": answer.model, "model_version": str(answer.version)}
    if call.request_id is not None:
        body["id"] = call.request_id
    body["parameters"] = {"k": answer.k, "seed": answer.seed}
    body["outputs"] = outputs
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _json_values(arr: np.ndarray) -> list[Any]:
    """Row-major values for JSON; a non-finite number (not JSON) becomes null."""
    values: list[Any] = arr.reshape(-1).tolist()
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return [v if math.isfinite(v) else None for v in values]
    return values
