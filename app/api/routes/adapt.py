"""``POST /adapt``: queue a selective fine-tuning job (eq. 8) on an unlabelled batch."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import DecoderDep, JobsDep, ServerDep, SettingsDep, TokenDep
from app.api.openapi import error_responses, request_body
from app.api.parsing import Limits
from app.schemas import AdaptAccepted, AdaptRequest
from store.data import check_shapes
from store.errors import InvalidInputError

router = APIRouter(tags=["adapt"])


@router.post(
    "/adapt",
    status_code=202,
    response_model=AdaptAccepted,
    summary="Adapt a model to an unlabelled batch (token required)",
    openapi_extra=request_body(AdaptRequest, multipart_fields={"finetune": "string"}),
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 503),
)
async def adapt(
    request: Request,
    response: Response,
    _: TokenDep,
    server: ServerDep,
    settings: SettingsDep,
    jobs: JobsDep,
    decoder: DecoderDep,
) -> AdaptAccepted:
    """The worker fine-tunes NN_M^p and NN_M^q, gates the result and, if promoted, hot-swaps it in."""
    limits = Limits(settings.max_adapt_inputs, settings.max_image_bytes)
    parsed = await decoder.read_adapt(request, limits, server.served_model)
    served = server.current(parsed.model)
    request.state.model = parsed.model
    check_shapes(parsed.inputs, served.kind, served.manifest.inputs)
    if len(parsed.inputs) < settings.min_adapt_inputs:
        raise InvalidInputError(
            f"{len(parsed.inputs)} inputs; adaptation needs at least {settings.min_adapt_inputs}",
            reason="too_few_inputs",
        )
    job = await run_in_threadpool(jobs.submit, parsed.model, parsed.inputs, served.version, parsed.finetune)
    status_url = request.app.url_path_for("get_job", job_id=job.id)
    response.headers["Location"] = status_url
    return AdaptAccepted(job_id=job.id, state=job.state, status_url=status_url)
