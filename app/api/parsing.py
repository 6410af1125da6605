"""Reading ``/predict`` and ``/adapt`` bodies: JSON (images, records or named rows) or multipart uploads.

A JSON body is checked *while it streams in*, before it is decoded: an incremental parser
(``ijson``) counts the inputs and reads ``model`` and ``k`` as the bytes arrive, so a request
with too many inputs, an unknown model or more work than :func:`check_work` allows is refused
(413/404/422) without building the request in memory, and a malformed body is refused at the
first bad byte. Only then is the body validated (strict types: no strings or booleans as
numbers) and decoded, at most ``decode_slots`` bodies at a time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import ijson
from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ServiceError, validation_body
from app.inputs import files_to_inputs, image_shape, images_to_inputs, records_to_inputs
from app.schemas import AdaptRequest, InputsRequest, PredictRequest
from app.serving import ServedModel
from store.data import Inputs
from store.errors import InvalidInputError, LimitExceededError

R = TypeVar("R", bound=InputsRequest)
T = TypeVar("T")

INPUT_FIELDS = ("images", "records", "rows")


class RequestValidationFailedError(ServiceError):
    """A body that does not match its schema (422, ``invalid_request``, with the pydantic errors)."""

    status_code = 422
    reason = "invalid_request"


@dataclass(frozen=True)
class ParsedInputs:
    """A request's target model, options and decoded inputs."""

    model: str
    inputs: Inputs
    k: int | None = None
    seed: int | None = None
    finetune: dict[str, Any] | None = None
    rows: bool = False  # the inputs came as named rows (answers carry class names)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_inputs: int
    max_image_bytes: int
    default_k: int = 1
    max_work: int | None = None  # inputs x k x classes; None: not checked (adaptation)


def check_work(n_inputs: int, k: int, num_classes: int, max_work: int | None) -> None:
    """The request cost model: eq. 6 runs ``inputs x k x classes`` decoder passes; refuse more
    than ``max_work`` (413 ``too_much_work``) before any of it is done."""
    work = n_inputs * k * num_classes
    if max_work is not None and work > max_work:
        raise LimitExceededError(
            f"{n_inputs} inputs x k={k} x {num_classes} classes = {work} decoder passes "
            f"(limit {max_work}); send fewer inputs or a smaller k",
            reason="too_much_work",
        )


MAX_DEPTH = 8  # a body nests at most: object > images > image > row > value (records: 4)


class _Prescan:
    """Counts the inputs and reads ``model`` and ``k`` from JSON events as the body arrives;
    refuses nesting deeper than any valid body (``MAX_DEPTH``) at the first bracket too many."""

    def __init__(self, limits: Limits, check_model: Callable[[str], ServedModel]) -> None:
        self.limits, self.check_model = limits, check_model
        self.count = 0
        self.model: str | None = None
        self.k: object = None
        self.served: ServedModel | None = None
        self._events = ijson.sendable_list()
        self._parser = ijson.basic_parse_coro(self._events, use_float=True)
        self._stack: list[list[str | None]] = []  # per open container: [kind, current key]

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.send(chunk)
        except ijson.JSONError as exc:
            self._consume()  # what came before the bad byte is judged first (too many inputs)
            raise RequestValidationFailedError(f"malformed JSON: {exc}") from exc
        self._consume()

    def _consume(self) -> None:
        stack = self._stack
        for event, value in self._events:
            if event == "map_key":
                stack[-1][1] = str(value)
                continue
            if event in ("end_map", "end_array"):
                stack.pop()
                continue
            top = stack[0][1] if stack and stack[0][0] == "map" else None
            if len(stack) == 2 and stack[1][0] == "array" and top in INPUT_FIELDS:
                self.count += 1
                if self.count > self.limits.max_inputs:
                    raise LimitExceededError(
                        f"more than {self.limits.max_inputs} inputs", reason="too_many_inputs"
                    )
            elif len(stack) == 1 and top == "model" and event == "string" and self.model is None:
                self.model = str(value)
                self.served = self.check_model(self.model)  # an unknown model is reported first
            elif len(stack) == 1 and top == "k":
                self.k = value
            if event in ("start_map", "start_array"):
                if len(stack) >= MAX_DEPTH:
                    raise RequestValidationFailedError(f"JSON nested deeper than {MAX_DEPTH} levels")
                stack.append(["map" if event == "start_map" else "array", None])
        del self._events[:]

    def close(self) -> None:
        try:
            self._parser.close()
        except ijson.JSONError as exc:
            raise RequestValidationFailedError(f"malformed JSON: {exc}") from exc
        if self.served is not None and type(self.k) in (int, type(None)):
            k = self.k if isinstance(self.k, int) else self.limits.default_k
            check_work(self.count, k, self.served.num_classes, self.limits.max_work)


def _validated(model_cls: type[R], payload: bytes | dict[str, object]) -> R:
    try:
        if isinstance(payload, bytes):
            return model_cls.model_validate_json(payload, strict=True)
        return model_cls.model_validate(payload, strict=True)
    except ValidationError as exc:
        body = validation_body(exc.errors())
        raise RequestValidationFailedError(body["detail"]["message"]) from exc


class Decoder:
    """Reads request bodies; at most ``slots`` bodies are validated and decoded at once."""

    def __init__(self, slots: int) -> None:
        self._slots = asyncio.Semaphore(slots)

    async def run(self, decode: Callable[..., T], *args: Any) -> T:
        """``decode(*args)`` in a worker thread, in one of the decoding slots (a body read by
        another wire format, such as the Open Inference Protocol's)."""
        async with self._slots:
            return await run_in_threadpool(decode, *args)

    async def _json(
        self, request: Request, model_cls: type[R], limits: Limits, check_model: Callable[[str], ServedModel]
    ) -> tuple[R, Inputs, bool]:
        scan = _Prescan(limits, check_model)
        parts: list[bytes] = []
        async for chunk in request.stream():
            if chunk:
                scan.feed(chunk)
                parts.append(chunk)
        scan.close()
        body = b"".join(parts)
        del parts
        async with self._slots:
            req = _validated(model_cls, body)
            del body
            served = check_model(req.model)
            if req.rows is not None:
                if served.encoding is None:
                    raise InvalidInputError(
                        f"model {req.model!r} has no table schema: send 'records' in model space",
                        reason="wrong_input_kind",
                    )
                inputs = await run_in_threadpool(served.encoding.encode, req.rows)
            elif req.images is not None:
                shape = image_shape(served.inputs)
                inputs = await run_in_threadpool(images_to_inputs, req.images, limits.max_image_bytes, shape)
            else:
                inputs = await run_in_threadpool(records_to_inputs, req.records or [])
        return req, inputs, req.rows is not None

    async def _multipart(
        self,
        request: Request,
        limits: Limits,
        check_model: Callable[[str], ServedModel],
        allowed_fields: frozenset[str],
    ) -> tuple[dict[str, str], Inputs]:
        try:
            form = await request.form(
                max_files=limits.max_inputs, max_fields=16, max_part_size=limits.max_image_bytes
            )
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise LimitExceededError(
                    f"too many files (limit {limits.max_inputs})", reason="too_many_inputs"
                ) from exc
            raise ServiceError(
                f"bad multipart body: {exc.detail}", reason="bad_multipart", status_code=400
            ) from exc
        try:
            uploads = [item for item in form.getlist("images") if isinstance(item, UploadFile)]
            unknown = sorted({key for key in form if key not in allowed_fields})
            if unknown:
                raise InvalidInputError(
                    f"unknown multipart fields {unknown}; this endpoint takes {sorted(allowed_fields)}",
                    reason="unknown_field",
                )
            fields: dict[str, str] = {}
            for key, value in form.multi_items():
                if key == "images":
                    continue
                if not isinstance(value, str) or key in fields:
                    raise InvalidInputError(
                        f"field {key!r} must be given once, as text", reason="invalid_request"
                    )
                fields[key] = value
            if not uploads:
                raise InvalidInputError("no image files uploaded (field 'images')", reason="no_inputs")
            shape = image_shape(check_model(fields.get("model", "")).inputs)
            blobs = [await upload.read() for upload in uploads]
        finally:
            await form.close()
        async with self._slots:
            inputs = await run_in_threadpool(files_to_inputs, blobs, limits.max_image_bytes, shape)
        return fields, inputs

    async def read_predict(
        self, request: Request, limits: Limits, check_model: Callable[[str], ServedModel]
    ) -> ParsedInputs:
        """``PredictRequest`` as JSON, or multipart with fields ``model``, ``k``, ``seed`` and files
        ``images``. The cost model is checked before anything is decoded."""
        kind = _content_type(request)
        if kind == "application/json":
            req, inputs, rows = await self._json(request, PredictRequest, limits, check_model)
            return ParsedInputs(req.model, inputs, k=req.k, seed=req.seed, rows=rows)
        if kind == "multipart/form-data":
            fields, inputs = await self._multipart(
                request, limits, check_model, frozenset({"model", "images", "k", "seed"})
            )
            opts = _validated(
                PredictRequest,
                {"model": fields.get("model", ""), "images": [], **_integers(fields, "k", "seed")},
            )
            return ParsedInputs(opts.model, inputs, k=opts.k, seed=opts.seed)
        raise _unsupported(kind)

    async def read_adapt(
        self, request: Request, limits: Limits, check_model: Callable[[str], ServedModel]
    ) -> ParsedInputs:
        """``AdaptRequest`` as JSON, or multipart with ``model``, optional ``finetune`` (JSON) and
        files ``images``; any other field (``k``, ``seed``) is refused, as in JSON."""
        kind = _content_type(request)
        if kind == "application/json":
            req, inputs, rows = await self._json(request, AdaptRequest, limits, check_model)
            return ParsedInputs(req.model, inputs, finetune=req.finetune, rows=rows)
        if kind == "multipart/form-data":
            fields, inputs = await self._multipart(
                request, limits, check_model, frozenset({"model", "images", "finetune"})
            )
            try:
                finetune = json.loads(fields["finetune"]) if "finetune" in fields else None
            except ValueError as exc:
                raise InvalidInputError(f"finetune is not JSON: {exc}", reason="invalid_request") from exc
            opts = _validated(
                AdaptRequest, {"model": fields.get("model", ""), "images": [], "finetune": finetune}
            )
            return ParsedInputs(opts.model, inputs, finetune=opts.finetune)
        raise _unsupported(kind)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def _unsupported(kind: str) -> ServiceError:
    return ServiceError(
        f"unsupported content type {kind!r}", reason="unsupported_media_type", status_code=415
    )


def _integers(fields: dict[str, str], *names: str) -> dict[str, object]:
    """Multipart fields that must be integers: decimal digits become ints; anything else stays a
    string, which strict validation then refuses by name (``k=true`` is not 1)."""
    out: dict[str, object] = {}
    for name in names:
        if name in fields:
            value = fields[name].strip()
            digits = value[1:] if value.startswith("-") else value
            out[name] = int(value) if digits.isascii() and digits.isdigit() else fields[name]
    return out
