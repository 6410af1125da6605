"""``GET /livez`` (the process answers) and ``GET /readyz`` (every configured model is loaded)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import ServerDep
from app.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/livez", response_model=HealthPublic)
async def livez() -> HealthPublic:
    return HealthPublic(status="ok")


@router.get("/readyz", response_model=HealthPublic, responses={503: {"model": HealthPublic}})
async def readyz(server: ServerDep) -> JSONResponse:
    ready, versions, problems = server.ready()
    body = HealthPublic(status="ok" if ready else "unavailable", models=versions, problems=problems)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
