"""``POST /predict``: Bayes-rule classification (eq. 6), micro-batched, answered by one version."""

from __future__ import annotations

import secrets

import numpy as np
from fastapi import APIRouter, Request

from app.api.deps import ServerDep, SettingsDep
from app.api.openapi import request_body
from app.api.parsing import read_predict
from app.errors import InputError
from app.inputs import check_shapes
from app.schemas import PredictionPublic, PredictRequest, PredictResponse

router = APIRouter(tags=["predict"])


def _predictions(log_w: np.ndarray) -> list[PredictionPublic]:
    """p(y|x) = softmax over the per-class log-weights (eq. 6), with its arg-max label."""
    shifted = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    return [
        PredictionPublic(label=int(row.argmax()), probabilities=[round(float(p), 6) for p in row])
        for row in probs
    ]


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Classify images or measurement records",
    openapi_extra=request_body(PredictRequest, multipart_fields={"k": "integer", "seed": "integer"}),
    responses={
        404: {"description": "unknown model"},
        413: {"description": "too many inputs / body too large"},
        415: {"description": "unsupported content type"},
        422: {"description": "bad input"},
        503: {"description": "model not loaded"},
    },
)
async def predict(request: Request, server: ServerDep, settings: SettingsDep) -> PredictResponse:
    """JSON ``{"model", "images" | "records", "k", "seed"}`` or a multipart upload of PNG/JPEG files.

    Each response names the one model version that computed all its predictions.
    """
    parsed = await read_predict(request, settings.max_inputs, settings.max_image_bytes, server.current)
    served = server.current(parsed.model)
    request.state.model = parsed.model
    check_shapes(parsed.inputs, served.kind, served.manifest.inputs)
    k = parsed.k or settings.k
    if k > settings.max_k:
        raise InputError(f"k={k} exceeds the limit {settings.max_k}", reason="k_too_large")
    seed = parsed.seed if parsed.seed is not None else secrets.randbits(63)
    log_w, version = await server.predict(parsed.model, parsed.inputs, k, seed)
    return PredictResponse(
        model=parsed.model, version=version.version, k=k, seed=seed, predictions=_predictions(log_w)
    )
