"""The Celery application of the worker role: ``celery -A worker.celery_app worker``.

Redis is the broker; job state lives in the job store (no result backend). Late acknowledgement
with prefetch 1 means a job whose worker dies is redelivered (the task is idempotent by job id),
and the visibility timeout is twice the longest job so that a running job is not redelivered.
Run one worker process per GPU (``--concurrency 1``, ``CUDA_VISIBLE_DEVICES`` per process);
nothing here touches CUDA, so forking the pool is safe.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery
from celery.signals import worker_init

from app.core.config import get_settings

settings = get_settings()
# no broker without CAMA_REDIS_URL: the module imports (tools, tests), a worker refuses to start
celery_app = Celery("cama", broker=settings.redis_url or "memory://", include=["worker.tasks"])
celery_app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_concurrency=1,
    task_default_queue=settings.queue,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    task_time_limit=settings.job_timeout_s + 60,
    task_soft_time_limit=settings.job_timeout_s,
    broker_transport_options={"visibility_timeout": 2 * settings.job_timeout_s},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
app = celery_app


@worker_init.connect  # type: ignore[untyped-decorator]  # Celery ships no type hints
def require_redis(**_: Any) -> None:
    """A worker needs the Redis broker; without ``CAMA_REDIS_URL`` it stops before taking a job."""
    if not settings.redis_url:
        print("the worker needs CAMA_REDIS_URL (the embedded mode runs jobs inside the API)", file=sys.stderr)
        raise SystemExit(2)
