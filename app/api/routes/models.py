"""``GET /models``, ``GET /models/{name}`` (versions, lineage) and ``POST /models/{name}/activate``."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import ServerDep, StateDep, TokenDep
from app.errors import ConflictError, NotFoundError
from app.model_server import ModelServer
from app.registry import CorruptVersionError, ModelRegistry, RegistryError, UnknownVersionError
from app.schemas import ActivateRequest, ModelPublic, ModelSummary, VersionPublic
from app.serving import load_version
from app.state import AppState

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
    for version in summary.versions:
        try:
            m = registry.manifest(name, version)
        except RegistryError:
            continue
        inputs = m.inputs
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
    return ModelPublic(**summary.model_dump(), inputs=inputs, lineage=lineage)


@router.get("", response_model=list[ModelSummary])
async def list_models(state: StateDep) -> list[ModelSummary]:
    """Every served model: its versions, the active one and the one this process serves."""
    return await run_in_threadpool(
        lambda: [_summary(state.registry, state.server, name) for name in state.server.slots]
    )


@router.get("/{name}", response_model=ModelPublic)
async def get_model(name: str, state: StateDep, server: ServerDep) -> ModelPublic:
    """A model's versions with their lineage: parent, data hash, metrics, gate decision."""
    server.slot(name)
    return await run_in_threadpool(_details, state.registry, server, name)


def _activate(state: AppState, name: str, version: int) -> None:
    registry = state.registry
    try:
        load_version(registry, name, version, device="cpu", threads=state.settings.torch_threads)
    except UnknownVersionError as exc:
        raise NotFoundError(str(exc), reason="unknown_version") from exc
    except CorruptVersionError as exc:
        raise ConflictError(f"refusing to activate: {exc}", reason="corrupt_version") from exc
    with registry.lock(name):
        registry.activate(name, version)
    state.server.slot(name).refused.pop(version, None)
    state.notify(name, version)


@router.post("/{name}/activate", response_model=ModelPublic)
async def activate(
    name: str, body: ActivateRequest, _: TokenDep, state: StateDep, server: ServerDep
) -> ModelPublic:
    """Make ``version`` the active one (a rollback or roll-forward) after checking it loads."""
    server.slot(name)
    await run_in_threadpool(_activate, state, name, body.version)
    await server.refresh(name)
    return await run_in_threadpool(_details, state.registry, server, name)
