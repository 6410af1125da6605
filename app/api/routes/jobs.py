"""``GET /jobs/{id}`` and ``POST /jobs/{id}/cancel`` (token required)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from starlette.concurrency import run_in_threadpool

from app.api.deps import JobsDep, require_token
from app.api.openapi import error_responses
from app.schemas import JobPublic

router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    dependencies=[Depends(require_token)],
    responses=error_responses(401, 403, 404, 422, 503),
)

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="the id /adapt returned")]


@router.get("/{job_id}", response_model=JobPublic, name="get_job")
async def get_job(job_id: JobId, jobs: JobsDep) -> JobPublic:
    """State (queued, running, succeeded, rejected, failed, cancelled), progress, metrics, version."""
    return await run_in_threadpool(jobs.get, job_id)


@router.post("/{job_id}/cancel", response_model=JobPublic, status_code=202, responses=error_responses(409))
async def cancel_job(job_id: JobId, jobs: JobsDep) -> JobPublic:
    """Stop a queued or running job; it ends ``cancelled`` and publishes nothing (409 if finished)."""
    return await run_in_threadpool(jobs.cancel, job_id)
