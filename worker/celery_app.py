"""The Celery application of the worker role: ``celery -A worker.celery_app worker``.

Redis is the broker; job state lives in the job store (no result backend). Late acknowledgement
with prefetch 1 means a job whose worker dies is redelivered (the task is idempotent by job id),
and the visibility timeout is twice the longest job so that a running job is not redelivered.
Run one worker process per GPU (``--concurrency 1``, ``CUDA_VISIBLE_DEVICES`` per process);
nothing here touches CUDA, so forking the pool is safe.
"""

from __future__ import annotations

from celery import Celery

from app.core.config import get_settings

settings = get_settings()
if not settings.redis_url:
    raise RuntimeError("the worker needs CAMA_REDIS_URL (the embedded mode runs jobs inside the API)")

celery_app = Celery("cama", broker=settings.redis_url, include=["worker.tasks"])
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
