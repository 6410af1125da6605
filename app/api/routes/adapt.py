"""``POST /adapt``: queue a selective fine-tuning job (eq. 8) on an unlabelled batch."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import JobsDep, ServerDep, SettingsDep, TokenDep
from app.api.openapi import request_body
from app.api.parsing import read_adapt
from app.errors import InputError
from app.inputs import check_shapes
from app.schemas import AdaptAccepted, AdaptRequest

router = APIRouter(tags=["adapt"])


@router.post(
    "/adapt",
    status_code=202,
    response_model=AdaptAccepted,
    summary="Adapt a model to an unlabelled batch (token required)",
    openapi_extra=request_body(AdaptRequest, multipart_fields={"finetune": "string"}),
    responses={
        401: {"description": "missing token"},
        403: {"description": "invalid token"},
        413: {"description": "too many inputs / body too large"},
        422: {"description": "bad input"},
        503: {"description": "job queue or model unavailable"},
    },
)
async def adapt(
    request: Request, response: Response, _: TokenDep, server: ServerDep, settings: SettingsDep, jobs: JobsDep
) -> AdaptAccepted:
    """The worker fine-tunes NN_M^p and NN_M^q, gates the result and, if promoted, hot-swaps it in."""
    parsed = await read_adapt(request, settings.max_adapt_inputs, settings.max_image_bytes, server.current)
    served = server.current(parsed.model)
    request.state.model = parsed.model
    check_shapes(parsed.inputs, served.kind, served.manifest.inputs)
    if len(parsed.inputs) < settings.min_adapt_inputs:
        raise InputError(
            f"{len(parsed.inputs)} inputs; adaptation needs at least {settings.min_adapt_inputs}",
            reason="too_few_inputs",
        )
    job = await run_in_threadpool(jobs.submit, parsed.model, parsed.inputs, served.version, parsed.finetune)
    status_url = request.app.url_path_for("get_job", job_id=job.id)
    response.headers["Location"] = status_url
    return AdaptAccepted(job_id=job.id, state=job.state, status_url=status_url)
