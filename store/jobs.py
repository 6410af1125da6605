"""Adaptation job records (Redis, or memory in the embedded mode) and their leases.

A job's unlabelled batch is written next to the model store (``<store>/.jobs/<id>.npz``, a volume
the API and the worker share); the job record holds its state, progress, metrics and the version
it produced. Terminal states are final: a late progress update or a cancel cannot change them.

Liveness: a worker takes a job's *lease* (``<prefix>job:<id>:lease``, a key with a time to live
that only its owner renews) before it marks the job running, and renews it while it works. A
running job whose lease has expired lost its worker; :meth:`RedisJobStore.requeue` puts it back
in the queue (or the caller fails it after too many attempts). A redelivered message for a job
whose lease is held by a live worker is left alone.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import redis
from pydantic import BaseModel, Field
from redis.exceptions import WatchError

from store.errors import NotFoundError

log = logging.getLogger(__name__)

JOB_TTL_S = 7 * 24 * 3600

JobState = Literal["queued", "running", "succeeded", "rejected", "failed", "cancelled"]
JOB_STATES: tuple[JobState, ...] = ("queued", "running", "succeeded", "rejected", "failed", "cancelled")
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "rejected", "failed", "cancelled"})


class JobRecord(BaseModel):
    """An adaptation job as ``GET /jobs/{id}`` reports it."""

    id: str
    model: str
    state: JobState
    progress: float = Field(ge=0.0, le=1.0)
    n_inputs: int
    data_hash: str
    base_version: int | None = None
    version: int | None = None
    created: float
    started: float | None = None
    finished: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    gate: dict[str, Any] | None = None
    reasons: list[str] = Field(default_factory=list)
    error: str | None = None
    cancel_requested: bool = False
    finetune: dict[str, Any] = Field(default_factory=dict)
    attempts: int = Field(default=0, description="times the job was started (a lost worker's run counts)")
    trigger: Literal["request", "drift"] = Field(
        default="request", description="request: POST /adapt; drift: started from live traffic"
    )


def batch_path(store: Path, job_id: str) -> Path:
    """Where a job's unlabelled batch lives."""
    return store / ".jobs" / f"{job_id}.npz"


class JobStore(Protocol):
    def create(self, job: JobRecord) -> None: ...
    def get(self, job_id: str) -> JobRecord | None: ...
    def update(self, job_id: str, **fields: Any) -> JobRecord: ...
    def request_cancel(self, job_id: str) -> JobRecord: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def counts(self) -> dict[str, int]: ...
    def ping(self) -> None: ...
    def claim(self, job_id: str, owner: str, ttl_s: float) -> bool: ...
    def renew(self, job_id: str, owner: str, ttl_s: float) -> bool: ...
    def release(self, job_id: str, owner: str) -> None: ...


def _apply(job: JobRecord, fields: dict[str, Any]) -> JobRecord:
    """``job`` with ``fields`` set, unless it is already terminal (then it stays as it is)."""
    if job.state in TERMINAL_STATES:
        return job
    return job.model_copy(update=fields)


class MemoryJobStore:
    """Job records of the embedded mode (one process)."""

    def __init__(self) -> None:
        self._jobs: dict[str, JobRecord] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # job id -> (owner, expiry)
        self._lock = threading.Lock()

    def create(self, job: JobRecord) -> None:
        with self._lock:
            self._jobs[job.id] = job

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._jobs.get(job_id)

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id}", reason="unknown_job")
            self._jobs[job_id] = _apply(job, fields)
            return self._jobs[job_id]

    def request_cancel(self, job_id: str) -> JobRecord:
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

    def claim(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Take the job's lease if it is free, expired or already ``owner``'s."""
        with self._lock:
            held = self._leases.get(job_id)
            if held is not None and held[0] != owner and held[1] > time.monotonic():
                return False
            self._leases[job_id] = (owner, time.monotonic() + ttl_s)
            return True

    def renew(self, job_id: str, owner: str, ttl_s: float) -> bool:
        with self._lock:
            held = self._leases.get(job_id)
            if held is None or held[0] != owner:
                return False
            self._leases[job_id] = (owner, time.monotonic() + ttl_s)
            return True

    def release(self, job_id: str, owner: str) -> None:
        with self._lock:
            if self._leases.get(job_id, ("", 0.0))[0] == owner:
                del self._leases[job_id]


# renew or delete a lease only while ``owner`` holds it (a compare-and-set in one round trip)
_IF_OWNER = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call({}) end return 0"
_RENEW = _IF_OWNER.format("'pexpire', KEYS[1], ARGV[2]")
_RELEASE = _IF_OWNER.format("'del', KEYS[1]")


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

    def create(self, job: JobRecord) -> None:
        pipe = self._redis.pipeline()
        pipe.set(self._key(job.id), job.model_dump_json(), ex=JOB_TTL_S)
        pipe.sadd(self._state_key(job.state), job.id)
        pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        raw = self._redis.get(self._key(job_id))
        return JobRecord.model_validate_json(raw) if raw else None

    def _transition(self, job_id: str, change: Callable[[JobRecord], dict[str, Any]]) -> JobRecord:
        key = self._key(job_id)
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    raw = pipe.get(key)
                    if not raw:
                        raise NotFoundError(f"no job {job_id}", reason="unknown_job")
                    job = JobRecord.model_validate_json(raw)
                    new = _apply(job, change(job))
                    pipe.multi()
                    pipe.set(key, new.model_dump_json(), ex=JOB_TTL_S)
                    if new.state != job.state:
                        pipe.smove(self._state_key(job.state), self._state_key(new.state), job_id)
                    pipe.execute()
                    return new
                except WatchError:
                    continue

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        return self._transition(job_id, lambda _: fields)

    def request_cancel(self, job_id: str) -> JobRecord:
        self._redis.set(f"{self._key(job_id)}:cancel", "1", ex=JOB_TTL_S)

        def change(job: JobRecord) -> dict[str, Any]:
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

    def _lease_key(self, job_id: str) -> str:
        return f"{self._key(job_id)}:lease"

    def claim(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Take the job's lease if it is free (or already ``owner``'s); it expires after ``ttl_s``."""
        key, ms = self._lease_key(job_id), max(1, round(ttl_s * 1000))
        if self._redis.set(key, owner, nx=True, px=ms):
            return True
        return bool(self._redis.eval(_RENEW, 1, key, owner, ms))

    def renew(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Extend ``owner``'s lease; False if it expired or another worker holds it now."""
        return bool(self._redis.eval(_RENEW, 1, self._lease_key(job_id), owner, max(1, round(ttl_s * 1000))))

    def release(self, job_id: str, owner: str) -> None:
        self._redis.eval(_RELEASE, 1, self._lease_key(job_id), owner)

    def lost_jobs(self) -> list[str]:
        """Running jobs whose lease has expired: their worker died."""
        running = sorted(str(m) for m in self._redis.smembers(self._state_key("running")))
        if not running:
            return []
        pipe = self._redis.pipeline()
        for job_id in running:
            pipe.exists(self._lease_key(job_id))
        return [job_id for job_id, alive in zip(running, pipe.execute(), strict=True) if not alive]

    def requeue(self, job_id: str, max_attempts: int) -> JobRecord | None:
        """A lost job back to ``queued`` (or ``failed`` after ``max_attempts`` starts); None if it
        is not lost any more (finished, or its lease is held again). Safe with several reapers."""
        key = self._key(job_id)
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, self._lease_key(job_id))  # type: ignore[no-untyped-call]
                    raw = pipe.get(key)
                    if not raw or pipe.exists(self._lease_key(job_id)):
                        pipe.unwatch()
                        return None
                    job = JobRecord.model_validate_json(raw)
                    if job.state != "running":
                        pipe.unwatch()
                        return None
                    if job.cancel_requested or job.attempts >= max_attempts:
                        error = None if job.cancel_requested else f"worker lost {job.attempts} times"
                        state = "cancelled" if job.cancel_requested else "failed"
                        new = job.model_copy(update={"state": state, "finished": time.time(), "error": error})
                    else:
                        new = job.model_copy(update={"state": "queued", "progress": 0.0})
                    pipe.multi()
                    pipe.set(key, new.model_dump_json(), ex=JOB_TTL_S)
                    pipe.smove(self._state_key(job.state), self._state_key(new.state), job_id)
                    pipe.execute()
                    return new
                except WatchError:
                    continue

    def publish_version(self, model: str, version: int) -> None:
        """Tell every API process that ``model`` has a new active version."""
        self._redis.publish(f"{self.prefix}versions", json.dumps({"model": model, "version": version}))
