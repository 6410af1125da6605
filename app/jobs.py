"""Adaptation jobs: their records (Redis, or memory in the embedded mode) and how they are dispatched.

A job's unlabelled batch is written next to the model store (``<store>/.jobs/<id>.npz``, a volume
the API and the worker share); the job record holds its state, progress, metrics and the version
it produced. The API enqueues a job by task *name* (``send_task``), never importing worker code;
in the embedded mode the same task function runs in a background thread of the API process.
Terminal states are final: a late progress update or a cancel cannot change them.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError, WatchError

from app.core.config import Settings
from app.data import Inputs
from app.errors import ConflictError, NotFoundError, UnavailableError
from app.metrics import JOB_STATES
from app.registry import atomic_write_text
from app.schemas import TERMINAL_STATES, JobPublic

log = logging.getLogger(__name__)

JOB_TTL_S = 7 * 24 * 3600
T = TypeVar("T")


def batch_path(store: Path, job_id: str) -> Path:
    """Where a job's unlabelled batch lives."""
    return store / ".jobs" / f"{job_id}.npz"


class JobStore(Protocol):
    def create(self, job: JobPublic) -> None: ...
    def get(self, job_id: str) -> JobPublic | None: ...
    def update(self, job_id: str, **fields: Any) -> JobPublic: ...
    def request_cancel(self, job_id: str) -> JobPublic: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def counts(self) -> dict[str, int]: ...
    def ping(self) -> None: ...


def _apply(job: JobPublic, fields: dict[str, Any]) -> JobPublic:
    """``job`` with ``fields`` set, unless it is already terminal (then it stays as it is)."""
    if job.state in TERMINAL_STATES:
        return job
    return job.model_copy(update=fields)


class MemoryJobStore:
    """Job records of the embedded mode (one process)."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobPublic] = {}
        self._lock = threading.Lock()

    def create(self, job: JobPublic) -> None:
        with self._lock:
            self._jobs[job.id] = job

    def get(self, job_id: str) -> JobPublic | None:
        with self._lock:
            return self._jobs.get(job_id)

    def update(self, job_id: str, **fields: Any) -> JobPublic:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id}", reason="unknown_job")
            self._jobs[job_id] = _apply(job, fields)
            return self._jobs[job_id]

    def request_cancel(self, job_id: str) -> JobPublic:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id}", reason="unknown_job")
            fields: dict[str, Any] = {"cancel_requested": True}
            if job.state == "queued":
                fields.update(state="cancelled", finished=time.time())
            self._jobs[job_id] = _apply(job, fields)
            return self._jobs[job_id]

    def cancel_requested(self, job_id: str) -> bool:
        job = self.get(job_id)
        return bool(job and job.cancel_requested)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(job.state for job in self._jobs.values()))

    def ping(self) -> None:
        return None


class RedisJobStore:
    """Job records in Redis: ``<prefix>job:<id>`` (JSON) and ``<prefix>jobs:<state>`` (sets, for counts)."""

    def __init__(self, url: str, prefix: str) -> None:
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=3.0, decode_responses=True
        )
        self.prefix = prefix

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _state_key(self, state: str) -> str:
        return f"{self.prefix}jobs:{state}"

    def create(self, job: JobPublic) -> None:
        pipe = self._redis.pipeline()
        pipe.set(self._key(job.id), job.model_dump_json(), ex=JOB_TTL_S)
        pipe.sadd(self._state_key(job.state), job.id)
        pipe.execute()

    def get(self, job_id: str) -> JobPublic | None:
        raw = self._redis.get(self._key(job_id))
        return JobPublic.model_validate_json(raw) if raw else None

    def _transition(self, job_id: str, change: Callable[[JobPublic], dict[str, Any]]) -> JobPublic:
        key = self._key(job_id)
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    raw = pipe.get(key)
                    if not raw:
                        raise NotFoundError(f"no job {job_id}", reason="unknown_job")
                    job = JobPublic.model_validate_json(raw)
                    new = _apply(job, change(job))
                    pipe.multi()
                    pipe.set(key, new.model_dump_json(), ex=JOB_TTL_S)
                    if new.state != job.state:
                        pipe.smove(self._state_key(job.state), self._state_key(new.state), job_id)
                    pipe.execute()
                    return new
                except WatchError:
                    continue

    def update(self, job_id: str, **fields: Any) -> JobPublic:
        return self._transition(job_id, lambda _: fields)

    def request_cancel(self, job_id: str) -> JobPublic:
        self._redis.set(f"{self._key(job_id)}:cancel", "1", ex=JOB_TTL_S)

        def change(job: JobPublic) -> dict[str, Any]:
            fields: dict[str, Any] = {"cancel_requested": True}
            if job.state == "queued":
                fields.update(state="cancelled", finished=time.time())
            return fields

        return self._transition(job_id, change)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._redis.exists(f"{self._key(job_id)}:cancel"))

    def counts(self) -> dict[str, int]:
        pipe = self._redis.pipeline()
        for state in JOB_STATES:
            pipe.scard(self._state_key(state))
        return dict(zip(JOB_STATES, (int(n) for n in pipe.execute()), strict=True))

    def ping(self) -> None:
        self._redis.ping()

    def publish_version(self, model: str, version: int) -> None:
        """Tell every API process that ``model`` has a new active version."""
        self._redis.publish(f"{self.prefix}versions", json.dumps({"model": model, "version": version}))


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
        self, model: str, inputs: Inputs, base_version: int | None, overrides: dict[str, Any] | None
    ) -> JobPublic:
        job = JobPublic(
            id=uuid.uuid4().hex,
            model=model,
            state="queued",
            progress=0.0,
            n_inputs=len(inputs),
            data_hash=inputs.digest(),
            base_version=base_version,
            created=time.time(),
            finetune=dict(overrides or {}),
        )
        path = batch_path(self.model_store, job.id)
        guarded(self.store.ping)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.tmp.npz")
            inputs.save(tmp)
            tmp.replace(path)
            guarded(lambda: self.store.create(job))
            guarded(lambda: self.dispatcher.submit(job.id))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        log.info("job %s queued: %s, %d inputs", job.id, model, len(inputs))
        return job

    def get(self, job_id: str) -> JobPublic:
        job = guarded(lambda: self.store.get(job_id))
        if job is None:
            raise NotFoundError(f"no job {job_id}", reason="unknown_job")
        return job

    def cancel(self, job_id: str) -> JobPublic:
        job = self.get(job_id)
        if job.state in TERMINAL_STATES:
            raise ConflictError(f"job {job_id} already {job.state}", reason="job_finished")
        return guarded(lambda: self.store.request_cancel(job_id))

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
    atomic_write_text(path, token + "\n")
    path.chmod(0o600)
