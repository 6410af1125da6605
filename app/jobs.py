"""How the API dispatches adaptation jobs, and the job service its routes call.

The API enqueues a job by task *name* (``send_task``), never importing worker code; in the
embedded mode the same task function runs in a background thread of the API process. In the
Redis mode every API process also reaps jobs whose worker died (their lease expired): such a job
is queued again, or failed after ``CAMA_JOB_MAX_ATTEMPTS`` starts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from app.core.config import Settings
from cama.runtime import atomic_write
from store.data import Inputs
from store.errors import ConflictError, NotFoundError, UnavailableError
from store.jobs import TERMINAL_STATES, JobRecord, JobStore, RedisJobStore, batch_path

log = logging.getLogger(__name__)

T = TypeVar("T")


class Dispatcher(Protocol):
    def submit(self, job_id: str) -> None: ...
    def close(self) -> None: ...


class CeleryDispatcher:
    """Enqueue by task name on the Redis broker; the API never imports the worker's code."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = Celery("cama-api", broker=settings.redis_url, set_as_current=False)
        self.client.conf.update(
            broker_connection_retry=False,
            broker_connection_retry_on_startup=False,
            broker_transport_options={
                "visibility_timeout": 2 * settings.job_timeout_s,
                "socket_connect_timeout": 1.0,
                "socket_timeout": 3.0,
            },
        )

    def submit(self, job_id: str) -> None:
        self.client.send_task(
            self.settings.task_name,
            args=[job_id],
            task_id=job_id,
            queue=self.settings.queue,
            retry=False,
        )

    def close(self) -> None:
        self.client.close()


class ThreadDispatcher:
    """The embedded worker: one background thread running the task function job after job."""

    def __init__(self, run: Callable[[str], object]) -> None:
        self._run = run
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="embedded-worker", daemon=True)
        self._thread.start()

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def _loop(self) -> None:
        while (job_id := self._queue.get()) is not None:
            try:
                self._run(job_id)
            except Exception:
                log.exception("embedded job %s crashed", job_id)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)


class JobService:
    """What the API does with jobs: submit (write the batch, record, enqueue), read, cancel."""

    def __init__(self, store: JobStore, dispatcher: Dispatcher, model_store: Path) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.model_store = model_store

    def submit(
        self,
        model: str,
        inputs: Inputs,
        base_version: int | None,
        overrides: dict[str, Any] | None,
        trigger: Literal["request", "drift"] = "request",
    ) -> JobRecord:
        job = JobRecord(
            id=uuid.uuid4().hex,
            model=model,
            state="queued",
            progress=0.0,
            n_inputs=len(inputs),
            data_hash=inputs.digest(),
            base_version=base_version,
            created=time.time(),
            finetune=dict(overrides or {}),
            trigger=trigger,
        )
        path = batch_path(self.model_store, job.id)
        guarded(self.store.ping)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            inputs.save(path)
            guarded(lambda: self.store.create(job))
            guarded(lambda: self.dispatcher.submit(job.id))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        log.info("job %s queued: %s, %d inputs", job.id, model, len(inputs))
        return job

    def get(self, job_id: str) -> JobRecord:
        job = guarded(lambda: self.store.get(job_id))
        if job is None:
            raise NotFoundError(f"no job {job_id}", reason="unknown_job")
        return job

    def cancel(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job.state in TERMINAL_STATES:
            raise ConflictError(f"job {job_id} already {job.state}", reason="job_finished")
        job = guarded(lambda: self.store.request_cancel(job_id))
        if job.state in TERMINAL_STATES:  # cancelled while queued: no worker will see its batch
            batch_path(self.model_store, job_id).unlink(missing_ok=True)
        return job

    def reap(self, max_attempts: int) -> list[str]:
        """Queue again every running job whose worker died (lease expired), or fail it after
        ``max_attempts`` starts; a job that ends here loses its batch file. Returns their ids."""
        store = self.store
        if not isinstance(store, RedisJobStore):
            return []  # embedded: the worker thread lives and dies with this process
        reaped = []
        for job_id in store.lost_jobs():
            job = store.requeue(job_id, max_attempts)
            if job is None:
                continue
            reaped.append(job_id)
            if job.state == "queued":
                log.warning("job %s lost its worker: queued again (attempt %d)", job_id, job.attempts + 1)
                self.dispatcher.submit(job_id)
            else:
                log.error("job %s lost its worker: %s", job_id, job.state)
                batch_path(self.model_store, job_id).unlink(missing_ok=True)
        return reaped

    def close(self) -> None:
        self.dispatcher.close()


def guarded(action: Callable[[], T]) -> T:
    """Run ``action``; a Redis or broker failure becomes a 503 ``queue_unavailable``."""
    try:
        return action()
    except (RedisError, OperationalError, ConnectionError, TimeoutError) as exc:
        raise UnavailableError(f"job queue unavailable: {exc}", reason="queue_unavailable") from exc


def write_token_file(path: Path, token: str) -> None:
    """Write a generated development token with owner-only permissions."""
    atomic_write(path, token + "\n", mode=0o600)
