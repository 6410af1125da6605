"""``GET /models``, ``GET /models/{name}`` (versions, lineage, table schema), ``POST .../activate``."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import AutoAdaptDep, ServerDep, StateDep, TokenDep
from app.api.openapi import error_responses
from app.model_server import ModelServer
from app.schemas import (
    ActivateRequest,
    DriftPublic,
    ModelPublic,
    ModelSummary,
    TableSchemaPublic,
    VersionPublic,
)
from app.serving import load_version
from app.state import AppState
from store.registry import ModelRegistry, RegistryError
from store.tables import RowEncoding

router = APIRouter(prefix="/models", tags=["models"])


def _summary(registry: ModelRegistry, server: ModelServer, name: str) -> ModelSummary:
    slot = server.slot(name)
    return ModelSummary(
        name=name,
        kind=slot.current.kind if slot.current else None,
        active_version=registry.active(name),
        served_version=slot.current.version if slot.current else None,
        versions=registry.versions(name),
    )


def _details(registry: ModelRegistry, server: ModelServer, name: str) -> ModelPublic:
    summary = _summary(registry, server, name)
    lineage: list[VersionPublic] = []
    inputs = None
    encoding: RowEncoding | None = None
    for version in summary.versions:
        try:
            m = registry.manifest(name, version)
        except RegistryError:
            continue
        inputs = m.inputs
        encoding = RowEncoding.from_provenance(m.provenance) or encoding
        lineage.append(
            VersionPublic(
                version=m.version,
                parent=m.parent,
                created=m.created,
                data_hash=m.data_hash,
                job_id=m.job_id,
                metrics=m.metrics,
                gate=m.gate,
                files=m.files,
            )
        )
    slot = server.slot(name)
    if slot.current is not None and slot.current.encoding is not None:
        encoding = slot.current.encoding
    table = TableSchemaPublic(**encoding.public()) if encoding is not None else None
    return ModelPublic(**summary.model_dump(), inputs=inputs, table_schema=table, lineage=lineage)


@router.get("", response_model=list[ModelSummary], responses=error_responses(503))
async def list_models(state: StateDep) -> list[ModelSummary]:
    """Every served model: its versions, the active one and the one this process serves."""
    return await run_in_threadpool(
        lambda: [_summary(state.registry, state.server, name) for name in state.server.slots]
    )


@router.get("/{name}", response_model=ModelPublic, responses=error_responses(404, 422, 503))
async def get_model(name: str, state: StateDep, server: ServerDep) -> ModelPublic:
    """A model's versions with their lineage (parent, data hash, metrics, gate decision) and, for a
    model trained from a table, its schema (column roles, class names, standardisation)."""
    server.slot(name)
    return await run_in_threadpool(_details, state.registry, server, name)


@router.get("/{name}/drift", response_model=DriftPublic, responses=error_responses(404, 422))
async def get_drift(name: str, server: ServerDep, auto: AutoAdaptDep) -> DriftPublic:
    """The drift test of the served version: ``state`` turns to ``drift`` when the mean unusual
    score of the last ``window`` inputs (at the default k) is ``alarm_z`` standard errors above
    the clean mean 1/2, and back to ``normal`` at ``clear_z`` (``cama.drift``)."""
    slot = server.slot(name)
    s = server.settings
    current = slot.current
    detector = slot.drift if current is not None and slot.drift_version == current.version else None
    return DriftPublic(
        model=name,
        version=current.version if current is not None else None,
        state=detector.state if detector is not None else "warming",
        statistic=detector.statistic if detector is not None else None,
        window=s.drift_window,
        alarm_z=s.drift_alarm_z,
        clear_z=s.drift_clear_z,
        since=datetime.fromtimestamp(detector.since, UTC) if detector is not None else None,
        seen=detector.seen if detector is not None else 0,
        alarms=detector.alarms if detector is not None else 0,
        reference_k=current.evidence.k if current is not None and current.evidence is not None else None,
        auto_adapt=name in auto.buffers,
        buffered=len(auto.buffers[name]) if name in auto.buffers else 0,
        auto_job=auto.running.get(name),
        routes=sorted(slot.adapters),
    )


def _activate(state: AppState, name: str, version: int) -> None:
    """Check that ``version`` loads (404 unknown_version, 409 corrupt_version), then point ACTIVE at it."""
    registry = state.registry
    load_version(registry, name, version, device="cpu", threads=state.settings.torch_threads)
    with registry.lock(name):
        registry.activate(name, version)
    state.server.slot(name).refused.pop(version, None)
    state.notify(name, version)


@router.post(
    "/{name}/activate",
    response_model=ModelPublic,
    responses=error_responses(401, 403, 404, 409, 422, 503),
)
async def activate(
    name: str, body: ActivateRequest, _: TokenDep, state: StateDep, server: ServerDep
) -> ModelPublic:
    """Make ``version`` the active one (a rollback or roll-forward) after checking it loads."""
    server.slot(name)
    await run_in_threadpool(_activate, state, name, body.version)
    await server.refresh(name)
    return await run_in_threadpool(_details, state.registry, server, name)
