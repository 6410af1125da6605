"""End to end with real processes: Redis, a Celery worker and ``python -m app`` (uvicorn).

Each test run uses its own Redis database keys (a unique prefix and queue in DB 13) and removes
them afterwards. Redis must be running on 127.0.0.1:6379 (``.ci/run`` starts it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import pytest
import redis

from app.core.config import Settings
from harness.inputs import digit_like_images, png_base64
from harness.processes import (
    ACCEPTING_GATE,
    ContinuousClient,
    ServiceProcess,
    WorkerProcess,
    free_port,
    service_env,
    wait_job,
)
from harness.stores import clone_store, template_store
from store.adaptation import JobContext, run_job
from store.jobs import RedisJobStore
from store.registry import ModelRegistry

TOKEN = "c" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture(scope="module")
def redis_ns():
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"these tests need Redis on 127.0.0.1:6379 (start it: redis-server --daemonize yes): {exc}"
        )
    run = uuid.uuid4().hex[:10]
    ns = {"redis_prefix": f"cama-test-{run}:", "queue": f"cama-test-{run}"}
    yield ns
    for key in client.scan_iter(match=f"*cama-test-{run}*"):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_ns):
    seed_dir, template = template_store(tmp_path_factory.getbasetemp() / "tiny_template")
    root = tmp_path_factory.mktemp("celery")
    store = clone_store(template, root / "store")
    common = {
        "model_store": str(store),
        "seed_dir": str(seed_dir),
        "models": ["tiny"],
        "token": TOKEN,
        "redis_url": REDIS_URL,
        "finetune": {"epochs": 1, "batch_size": 16, "lr": 0.01, "min_steps": 0},
        **ACCEPTING_GATE,
        "poll_interval_s": 30.0,
        **redis_ns,
    }
    worker = WorkerProcess(root / "worker.log", **common)
    api = ServiceProcess(root / "api.log", **common)
    try:
        worker.wait_ready()
        api.wait_ready()
        yield api, worker, ModelRegistry(store), common
    finally:
        api.stop()
        worker.stop()


def batch(n: int = 40) -> list[str]:
    x, _ = digit_like_images(n, seed=21)
    return [png_base64(img) for img in np.roll(x, -3, axis=1) / 255.0]


@pytest.mark.slow
def test_worker_adapts_and_every_api_process_swaps(stack):
    """The API polls ACTIVE only every 30 s here, so a prompt swap shows the pub/sub notice."""
    api, worker, registry, _ = stack
    x, _ = digit_like_images(1, seed=4)
    load = ContinuousClient(api.url, {"model": "tiny", "images": [png_base64(x[0] / 255.0)], "k": 2}).start()
    with httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as client:
        r = client.post("/adapt", json={"model": "tiny", "images": batch()})
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"], timeout=600)
        finished = time.monotonic()
        load.wait_for_version(2, timeout=20)
        swap_delay = time.monotonic() - finished
        stats = load.stop()
    assert job["state"] == "succeeded", job
    assert job["version"] == 2
    assert registry.active("tiny") == 2
    assert f"Task cama.adapt[{job['id']}]" in worker.logs()
    assert "version notice" in api.logs()
    assert swap_delay < 20
    assert stats["failed_requests"] == 0, stats["failures"]
    assert stats["versions"] == [1, 2]
    assert stats["version_regressions"] == 0


def test_a_redelivered_task_is_idempotent(stack):
    """Running the task function again for a finished job, or after a crash, makes nothing twice."""
    _, _, registry, common = stack
    # the processes read "null" from their environment; in Python it is None
    values = {k: None if v == "null" else v for k, v in common.items() if k != "token"}
    settings = Settings(**values, token=TOKEN)
    store = RedisJobStore(REDIS_URL, common["redis_prefix"])
    ctx = JobContext(registry, store, settings)
    finished = [j for j in _jobs(store) if j.state == "succeeded"]
    assert finished, "needs the job of the previous test"
    versions = registry.versions("tiny")
    again = run_job(finished[0].id, ctx)
    assert again is not None
    assert again.state == "succeeded"
    assert registry.versions("tiny") == versions
    # a crash after publishing but before the record said so: the published version is adopted
    crashed = finished[0].model_copy(update={"id": uuid.uuid4().hex, "state": "running", "version": None})
    store.create(crashed)
    produced = finished[0].version or 0
    path = registry.version_dir("tiny", produced) / "manifest.json"
    original = path.read_text()
    path.write_text(json.dumps({**json.loads(original), "job_id": crashed.id}))  # as if `crashed` made it
    try:
        adopted = run_job(crashed.id, ctx)
    finally:
        path.write_text(original)
    assert adopted is not None
    assert adopted.state == "succeeded"
    assert adopted.version == produced
    assert registry.versions("tiny") == versions


def _jobs(store: RedisJobStore):
    client = redis.Redis.from_url(REDIS_URL)
    ids = [m.decode() for m in client.smembers(f"{store.prefix}jobs:succeeded")]
    return [job for job in (store.get(i) for i in ids) if job is not None]


def test_cancel_through_redis(stack):
    api, _, registry, _ = stack
    versions = registry.versions("tiny")
    with httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as client:
        body = {"model": "tiny", "images": batch(), "finetune": {"epochs": 100, "batch_size": 4}}
        job_id = client.post("/adapt", json=body).json()["job_id"]
        deadline = time.monotonic() + 300
        while client.get(f"/jobs/{job_id}").json()["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.post(f"/jobs/{job_id}/cancel").status_code == 202
        job = wait_job(client, job_id, timeout=120)
        metrics = client.get("/metrics").text
    assert job["state"] == "cancelled"
    assert job["version"] is None
    assert registry.versions("tiny") == versions
    assert 'cama_adapt_jobs{state="cancelled"} 1.0' in metrics


def test_celery_configuration(redis_ns):
    """acks_late, prefetch 1, visibility timeout above the longest job; the task is registered by name."""
    env = service_env(redis_url=REDIS_URL, job_timeout_s=600, **redis_ns)
    code = (
        "import json; from worker.celery_app import celery_app as c; import worker.tasks as t; o = c.conf; "
        "print(json.dumps({'acks_late': o.task_acks_late, 'prefetch': o.worker_prefetch_multiplier, "
        "'reject_lost': o.task_reject_on_worker_lost, "
        "'vt': o.broker_transport_options['visibility_timeout'], 'queue': o.task_default_queue, "
        "'task': t.adapt.name, 'task_acks_late': t.adapt.acks_late, "
        "'cuda_initialised': __import__('torch').cuda.is_initialized()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    conf = json.loads(out.stdout.strip().splitlines()[-1])
    assert conf["acks_late"]
    assert conf["task_acks_late"]
    assert conf["reject_lost"]
    assert conf["prefetch"] == 1
    assert conf["vt"] > 600
    assert conf["queue"] == redis_ns["queue"]
    assert conf["task"] == "cama.adapt"
    assert conf["cuda_initialised"] is False  # importing the worker touches no CUDA (safe to fork)


def test_redis_unreachable_adapt_503_predict_still_serves(tmp_path, tmp_path_factory, redis_ns):
    seed_dir, template = template_store(tmp_path_factory.getbasetemp() / "tiny_template")
    store = clone_store(template, tmp_path / "store")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    api = ServiceProcess(
        tmp_path / "api.log",
        model_store=str(store),
        seed_dir=str(seed_dir),
        models=["tiny"],
        token=TOKEN,
        redis_url=dead,
        **redis_ns,
    )
    try:
        api.wait_ready()
        with httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as client:
            r = client.post("/adapt", json={"model": "tiny", "images": batch()})
            assert (r.status_code, r.json()["detail"]["reason"]) == (503, "queue_unavailable")
            r = client.get("/jobs/" + "0" * 32)
            assert (r.status_code, r.json()["detail"]["reason"]) == (503, "queue_unavailable")
            x, _ = digit_like_images(1)
            r = client.post("/predict", json={"model": "tiny", "images": [png_base64(x[0] / 255.0)]})
            assert r.status_code == 200
            assert r.json()["version"] == 1
            assert client.get("/readyz").status_code == 200
            assert client.get("/metrics").status_code == 200
        assert not list((store / ".jobs").glob("*.npz"))  # the batch of a refused job is not kept
    finally:
        api.stop()


@pytest.mark.slow
def test_a_job_whose_worker_is_killed_is_requeued_and_published_once(tmp_path, tmp_path_factory, redis_ns):
    """SIGKILL the worker (main process and child) mid-job: the lease expires, the API queues the
    job again, a new worker runs it to one published version."""
    seed_dir, template = template_store(tmp_path_factory.getbasetemp() / "tiny_template")
    store = clone_store(template, tmp_path / "store")
    run = uuid.uuid4().hex[:8]
    common = {
        "model_store": str(store),
        "seed_dir": str(seed_dir),
        "models": ["tiny"],
        "token": TOKEN,
        "redis_url": REDIS_URL,
        "redis_prefix": f"{redis_ns['redis_prefix']}kill-{run}:",
        "queue": f"{redis_ns['queue']}-kill-{run}",
        **ACCEPTING_GATE,
        "job_lease_s": 3,
        "reap_interval_s": 1,
    }
    api = ServiceProcess(tmp_path / "api.log", **common)
    first = WorkerProcess(tmp_path / "worker1.log", **common)
    second = None
    try:
        api.wait_ready()
        first.wait_ready()
        with httpx.Client(base_url=api.url, timeout=30, headers=AUTH) as client:
            body = {"model": "tiny", "images": batch(), "finetune": {"epochs": 30, "batch_size": 4}}
            job_id = client.post("/adapt", json=body).json()["job_id"]
            deadline = time.monotonic() + 120
            while client.get(f"/jobs/{job_id}").json()["state"] != "running" and time.monotonic() < deadline:
                time.sleep(0.1)
            os.killpg(first.proc.pid, signal.SIGKILL)  # the worker and any child, with no goodbye
            first.proc.wait(10)
            second = WorkerProcess(tmp_path / "worker2.log", **{**common, "finetune": {"epochs": 1}})
            second.wait_ready()
            job = wait_job(client, job_id, timeout=240)
        assert job["state"] == "succeeded", job
        assert job["attempts"] == 2
        registry = ModelRegistry(store)
        produced = [v for v in registry.versions("tiny") if registry.manifest("tiny", v).job_id == job_id]
        assert produced == [job["version"]]
        assert "lost its worker: queued again" in api.logs()
    finally:
        api.stop()
        first.stop()
        if second is not None:
            second.stop()
