"""The adaptation task: a thin shell (serialisation, state) around ``store.adaptation.run_job``.

It imports the settings, the model store and the core only: no web framework.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch

from store.adaptation import JobContext, run_job
from store.jobs import RedisJobStore
from store.registry import ModelRegistry
from worker.celery_app import celery_app, settings

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def context() -> JobContext:
    """Built on first use in the worker (child) process, after any fork."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    store = RedisJobStore(settings.redis_url or "", settings.redis_prefix)
    return JobContext(ModelRegistry(settings.model_store), store, settings, notify=store.publish_version)


@celery_app.task(  # type: ignore[untyped-decorator]  # Celery ships no type hints
    name=settings.task_name, acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def adapt(job_id: str) -> str:
    """Run adaptation job ``job_id`` (idempotent: a finished job is left as it is)."""
    job = run_job(job_id, context())
    return job.state if job is not None else "unknown"
