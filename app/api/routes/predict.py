"""``POST /predict``: Bayes-rule classification (eq. 6), micro-batched, answered by one version."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request

from app import prediction
from app.api.deps import AutoAdaptDep, DecoderDep, ServerDep, SettingsDep
from app.api.openapi import error_responses, request_body
from app.api.parsing import Limits
from app.prediction import Prediction
from app.schemas import PredictionPublic, PredictRequest, PredictResponse

router = APIRouter(tags=["predict"])


def _predictions(answer: Prediction) -> list[PredictionPublic]:
    """Each input's p(y|x), label (and class name), log p(x), unusual score and, with routing on,
    the version that answered it; a non-finite log p(x) is given as null."""
    out = []
    for i, row in enumerate(answer.probabilities):
        label = int(answer.labels[i])
        log_px = float(answer.log_px[i])
        out.append(
            PredictionPublic(
                label=label,
                class_name=answer.classes[label] if answer.classes else None,
                probabilities=[round(float(p), 6) for p in row],
                log_px=round(log_px, 4) if np.isfinite(log_px) else None,
                unusual=None if answer.unusual is None else round(float(answer.unusual[i]), 4),
                route=None if answer.routes is None else answer.routes[i],
            )
        )
    return out


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Classify images, measurement records or a table model's rows",
    openapi_extra=request_body(PredictRequest, multipart_fields={"k": "integer", "seed": "integer"}),
    responses=error_responses(400, 404, 413, 415, 422, 503),
)
async def predict(
    request: Request, server: ServerDep, settings: SettingsDep, decoder: DecoderDep, auto: AutoAdaptDep
) -> PredictResponse:
    """JSON ``{"model", "images" | "records" | "rows", "k", "seed"}`` or a multipart upload of
    PNG/JPEG files. Each response names the one model version that computed all its predictions."""
    limits = Limits(settings.max_inputs, settings.max_image_bytes, settings.k, settings.max_work)
    parsed = await decoder.read_predict(request, limits, server.served_model)
    request.state.model = parsed.model
    answer = await prediction.predict(
        server, settings, auto, parsed.model, parsed.inputs, parsed.k, parsed.seed
    )
    return PredictResponse(
        model=answer.model,
        version=answer.version,
        k=answer.k,
        seed=answer.seed,
        predictions=_predictions(answer),
    )
