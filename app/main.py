"""The FastAPI application: built by :func:`create_app`, models loaded in its lifespan.

Start-up never blocks on model loading: ``/livez`` answers at once, the store is seeded (when
empty) and each model loaded in the background, and ``/readyz`` turns 200 when all are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable

import torch
from fastapi import FastAPI

from app.api.main import api_router
from app.api.openapi import install_openapi
from app.api.parsing import Decoder
from app.auto_adapt import AutoAdapter
from app.core.config import Settings, get_settings
from app.errors import install_error_handlers
from app.jobs import CeleryDispatcher, JobService, ThreadDispatcher, write_token_file
from app.metrics import ServiceMetrics
from app.middleware import BodyLimitMiddleware, MetricsMiddleware
from app.model_server import ModelServer
from app.state import AppState
from store.adaptation import JobContext, run_job
from store.artifacts import seed_store
from store.jobs import MemoryJobStore, RedisJobStore
from store.memory import limit_arenas
from store.registry import ModelRegistry

log = logging.getLogger(__name__)

DESCRIPTION = """Deep CAMA as a service: Bayes-rule prediction (eq. 6) in ONNX Runtime, test-time
adaptation of the manipulation networks (eq. 8) as gated background jobs, versioned models with
hot-swap. Management endpoints (`/adapt`, `/jobs`, activation) need `Authorization: Bearer <token>`.
Every error body is `{"detail": {"reason": ..., "message": ...}}`."""


def resolve_token(settings: Settings) -> str:
    """``CAMA_TOKEN``; in development without one, a random token kept in the token file."""
    if settings.token is not None and settings.token.get_secret_value():
        return settings.token.get_secret_value()
    path = settings.resolved_token_file
    if path.exists() and len(path.read_text().strip()) >= 16:
        token = path.read_text().strip()
    else:
        token = secrets.token_urlsafe(24)
        write_token_file(path, token)
    log.warning("no CAMA_TOKEN set (development): management token is in %s", path)
    return token


def build_jobs(
    settings: Settings, registry: ModelRegistry, server: ModelServer
) -> tuple[JobService, Callable[[str, int], None]]:
    """Redis + Celery when ``redis_url`` is set; else the embedded worker thread and memory records."""
    if settings.redis_url:
        store = RedisJobStore(settings.redis_url, settings.redis_prefix)

        def publish(model: str, version: int) -> None:
            try:
                store.publish_version(model, version)
            except Exception as exc:
                log.warning("could not publish the version notice: %s", exc)

        return JobService(store, CeleryDispatcher(settings), registry.root), publish

    memory = MemoryJobStore()
    loop = asyncio.get_running_loop()

    def notify(model: str, version: int) -> None:
        loop.call_soon_threadsafe(server.wake)

    ctx = JobContext(registry, memory, settings, notify=notify)
    return JobService(memory, ThreadDispatcher(lambda job_id: run_job(job_id, ctx)), registry.root), (
        lambda model, version: None
    )


async def reap(jobs: JobService, settings: Settings) -> None:
    """Every ``reap_interval_s``: queue again (or fail) the jobs whose worker died."""
    while True:
        await asyncio.sleep(settings.reap_interval_s)
        try:
            await asyncio.to_thread(jobs.reap, settings.job_max_attempts)
        except Exception as exc:  # Redis down: try again at the next interval
            log.warning("reaping lost jobs failed: %s", exc)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: ServiceMetrics = app.state.metrics
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    registry = ModelRegistry(settings.model_store)
    registry.root.mkdir(parents=True, exist_ok=True)
    server = ModelServer(registry, settings, metrics)
    jobs, notify = build_jobs(settings, registry, server)
    metrics.jobs.source = jobs.store.counts
    app.state.cama = AppState(
        settings,
        registry,
        metrics,
        server,
        jobs,
        resolve_token(settings),
        Decoder(settings.decode_slots),
        AutoAdapter(settings, jobs),
        notify,
    )
    await server.start()
    loop = asyncio.get_running_loop()
    reaper = loop.create_task(reap(jobs, settings)) if settings.redis_url else None
    auto = app.state.cama.auto
    watcher = loop.create_task(auto.run(settings.poll_interval_s)) if auto.buffers else None

    async def seed() -> None:
        problems = await asyncio.to_thread(seed_store, registry, list(server.slots), settings.seed_dir)
        for name, problem in problems.items():
            server.slot(name).seed_problem = problem
        server.wake()

    seeding = asyncio.get_running_loop().create_task(seed())
    mode = "embedded worker" if settings.embedded else f"Celery on {settings.redis_url}"
    log.info("cama-serve up: models %s, store %s, jobs via %s", settings.models, registry.root, mode)
    try:
        yield
    finally:
        seeding.cancel()
        for task in (reaper, watcher):
            if task is not None:
                task.cancel()
        await server.stop()
        jobs.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app (nothing is loaded until the lifespan starts)."""
    settings = settings or get_settings()
    if settings.malloc_arena_max is not None:
        limit_arenas(settings.malloc_arena_max)
    app = FastAPI(title="cama-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(
        BodyLimitMiddleware,
        limit_for=lambda path: settings.max_adapt_body_bytes if path == "/adapt" else settings.max_body_bytes,
    )
    app.include_router(api_router)
    install_openapi(app)
    return app
