"""``POST /predict``: Bayes-rule classification (eq. 6), micro-batched, answered by one version."""

from __future__ import annotations

import secrets

import numpy as np
from fastapi import APIRouter, Request

from app.api.deps import AutoAdaptDep, DecoderDep, ServerDep, SettingsDep
from app.api.openapi import error_responses, request_body
from app.api.parsing import Limits, check_work
from app.schemas import PredictionPublic, PredictRequest, PredictResponse
from cama.novelty import log_evidence
from store.data import check_shapes
from store.errors import InvalidInputError

router = APIRouter(tags=["predict"])


def _predictions(
    log_w: np.ndarray,
    classes: tuple[str, ...] | None,
    unusual: np.ndarray | None,
    routes: list[int] | None,
) -> list[PredictionPublic]:
    """p(y|x) = softmax over the per-class log-weights (eq. 6), with its arg-max label, the
    evidence log p(x) = logsumexp_c of the same weights, its unusual score (cama.novelty) and,
    with routing on, the version that answered it."""
    log_px = log_evidence(log_w)
    probs = np.exp(log_w - log_px[:, None])
    out = []
    for i, row in enumerate(probs):
        label = int(row.argmax())
        out.append(
            PredictionPublic(
                label=label,
                class_name=classes[label] if classes else None,
                probabilities=[round(float(p), 6) for p in row],
                log_px=round(float(log_px[i]), 4) if np.isfinite(log_px[i]) else None,
                unusual=None if unusual is None else round(float(unusual[i]), 4),
                route=None if routes is None else routes[i],
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
    served = server.current(parsed.model)
    request.state.model = parsed.model
    check_shapes(parsed.inputs, served.kind, served.manifest.inputs)
    k = parsed.k or settings.k
    if k > settings.max_k:
        raise InvalidInputError(f"k={k} exceeds the limit {settings.max_k}", reason="k_too_large")
    check_work(len(parsed.inputs), k, served.num_classes, settings.max_work)
    seed = parsed.seed if parsed.seed is not None else secrets.randbits(63)
    answer = await server.predict(parsed.model, parsed.inputs, k, seed)
    version = answer.version
    classes = version.classes
    unusual = answer.unusual
    if unusual is not None:
        state = server.observe(parsed.model, version, unusual)
        auto.offer(parsed.model, version.version, parsed.inputs, unusual, state)
    routes = None if answer.routes is None else [v.version for v in answer.routes]
    return PredictResponse(
        model=parsed.model,
        version=version.version,
        k=k,
        seed=seed,
        predictions=_predictions(answer.log_w, classes, unusual, routes),
    )
