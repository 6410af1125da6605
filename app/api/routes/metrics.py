"""``GET /metrics``: Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import StateDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(state: StateDep) -> Response:
    """Requests and latency per route and model, in-flight, batch sizes, jobs by state, active versions."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
