"""Hardening of a real ``python -m app``: bounded work per request, limits checked while the body
streams in, bad store states answered 503, bounded metric labels, strict wire types, jobs that
never hang, tampered versions refused."""

from __future__ import annotations

import hashlib
import io
import json
import re
import time

import httpx
import numpy as np
import onnx
import pytest
import redis
from onnx import numpy_helper

from app.serving import load_version, session_options
from harness.inputs import bomb_png, digit_like_images, png_base64
from store.adaptation import JobContext, run_job
from store.errors import ConflictError
from store.jobs import JobRecord, RedisJobStore, batch_path
from store.registry import CorruptVersionError, ModelRegistry

TOKEN = "hardening-Vq3xL9-wPz2mK7rT"
REDIS_URL = "redis://127.0.0.1:6379/0"
MAX_INPUTS = 8


def reason(response: httpx.Response) -> str:
    return str(response.json()["detail"]["reason"])


def good_images(n: int) -> list[str]:
    x, _ = digit_like_images(n, seed=3)
    return [png_base64(img / 255.0) for img in x]


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_template):
    from harness.processes import ServiceProcess
    from harness.stores import clone_store

    seed_dir, template = tiny_template
    root = tmp_path_factory.mktemp("hardening")
    store = clone_store(template, root / "store")
    svc = ServiceProcess(
        root / "api.log",
        model_store=str(store),
        seed_dir=str(seed_dir),
        models=["tiny"],
        token=TOKEN,
        max_inputs=MAX_INPUTS,
        max_k=50,
        max_work=400,  # 8 inputs x k=5 x 10 classes
        chunk_work=40,  # one pass: 4 inputs at k=1, 1 input at k=4
        batch_max_wait_ms=1,
    )
    try:
        svc.wait_ready()
        svc.store = store  # type: ignore[attr-defined]
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def client(service):
    with httpx.Client(base_url=service.url, timeout=60) as c:
        yield c


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


# --- 1. the request cost model and chunked passes ------------------------------------------------
def test_work_beyond_the_cost_model_is_refused_before_any_work(client):
    r = client.post("/predict", json={"model": "tiny", "images": good_images(8), "k": 6})  # 480 > 400
    assert (r.status_code, reason(r)) == (413, "too_much_work")
    assert "8 inputs x k=6 x 10 classes" in r.json()["detail"]["message"]
    ok = client.post("/predict", json={"model": "tiny", "images": good_images(8), "k": 5, "seed": 1})
    assert ok.status_code == 200


def test_a_large_request_runs_in_passes_of_bounded_work(client):
    r = client.post("/predict", json={"model": "tiny", "images": good_images(8), "k": 4, "seed": 2})
    assert r.status_code == 200
    text = client.get("/metrics").text
    # every forward pass held at most chunk_work // (k x classes) = 1 input at k=4
    sizes = {
        float(m.group(1)): float(m.group(2))
        for m in re.finditer(r'cama_batch_inputs_bucket\{le="([0-9.]+)",model="tiny"\} ([0-9.]+)', text)
    }
    total = float(re.search(r'cama_batch_inputs_count\{model="tiny"\} ([0-9.]+)', text).group(1))
    assert sizes[4.0] == total  # no pass of the whole 8-input request at once


def test_the_onnx_runtime_keeps_no_memory_arena():
    assert session_options(1).enable_cpu_mem_arena is False


# --- 2. and 3. decompression bombs; limits while the body streams in -----------------------------
def test_a_decompression_bomb_is_a_4xx_on_every_route(client):
    bomb = bomb_png()
    b64 = __import__("base64").b64encode(bomb).decode()
    r = client.post("/predict", json={"model": "tiny", "images": [b64]})
    assert (r.status_code, reason(r)) == (413, "image_too_large")
    r = client.post("/predict", data={"model": "tiny"}, files=[("images", ("b.png", bomb, "image/png"))])
    assert (r.status_code, reason(r)) == (413, "image_too_large")
    r = client.post("/adapt", json={"model": "tiny", "images": [b64] * 10}, headers=auth())
    assert (r.status_code, reason(r)) == (413, "image_too_large")


def test_the_input_count_is_checked_while_the_body_streams_in(client):
    # more inputs than allowed, then bytes that are not JSON: refused for the count, before the
    # body is decoded (decoding first would have answered invalid_request)
    head = json.dumps({"model": "tiny", "images": good_images(1) * (MAX_INPUTS + 1)})[:-1]
    r = client.post(
        "/predict", content=head.encode() + b", @@@ not json", headers={"content-type": "application/json"}
    )
    assert (r.status_code, reason(r)) == (413, "too_many_inputs")

    def chunks():  # no Content-Length: the limit is enforced on the bytes as they arrive
        yield b'{"model": "tiny", "images": ["'
        for _ in range(40):
            yield b"A" * 250_000

    r = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert (r.status_code, reason(r)) == (413, "body_too_large")


# --- 5. a malformed ACTIVE file ------------------------------------------------------------------
def test_a_malformed_active_file_is_a_503_and_the_connection_survives(client, service):
    active = service.store / "tiny" / "ACTIVE"
    saved = active.read_text()
    try:
        active.write_text("abc")
        for path in ("/models", "/models/tiny"):
            r = client.get(path)
            assert (r.status_code, reason(r)) == (503, "corrupt_active")
        # the same keep-alive connection goes on; the loaded version keeps serving
        r = client.post("/predict", json={"model": "tiny", "images": good_images(1)})
        assert r.status_code == 200
    finally:
        active.write_text(saved)
    assert client.get("/models").status_code == 200


# --- 7. bounded label cardinality ----------------------------------------------------------------
def test_made_up_methods_and_paths_share_one_label(client):
    for i in range(5):
        client.request(f"BREW{i}", "/predict")
        client.get(f"/no-such-path-{i}")
    text = client.get("/metrics").text
    assert "BREW" not in text
    assert "no-such-path" not in text
    assert 'method="other"' in text
    methods = set(re.findall(r'cama_requests_total\{[^}]*method="([^"]+)"', text))
    assert methods <= {"GET", "POST", "other"}


# --- 10. strict wire types, multipart fields, the OpenAPI schema -------------------------------
@pytest.mark.parametrize("version", [True, "1", 1.5])
def test_activation_takes_only_an_integer_version(client, version):
    r = client.post("/models/tiny/activate", json={"version": version}, headers=auth())
    assert (r.status_code, reason(r)) == (422, "invalid_request")


def test_activation_takes_a_whole_number_written_as_json_allows_and_an_unparsable_body_is_422(client):
    r = client.post("/models/tiny/activate", json={"version": 1.0}, headers=auth())  # JSON Schema's integer
    assert r.status_code == 200, r.text
    assert r.json()["active_version"] == 1
    r = client.post(
        "/models/tiny/activate", content=b"version=1", headers={**auth(), "content-type": "text/plain"}
    )
    assert (r.status_code, reason(r)) == (422, "invalid_request")


def test_multipart_refuses_fields_it_does_not_use(client):
    files = [
        ("images", (f"{i}.png", __import__("base64").b64decode(img), "image/png"))
        for i, img in enumerate(good_images(10))
    ]
    r = client.post("/adapt", data={"model": "tiny", "k": "5", "seed": "1"}, files=files, headers=auth())
    assert (r.status_code, reason(r)) == (422, "unknown_field")
    r = client.post("/predict", data={"model": "tiny", "k": "true"}, files=files[:1])
    assert (r.status_code, reason(r)) == (422, "invalid_request")
    r = client.post("/predict", data={"model": "tiny", "k": "2", "seed": "3"}, files=files[:1])
    assert (r.status_code, r.json()["k"], r.json()["seed"]) == (200, 2, 3)


def test_the_openapi_schema_names_the_real_statuses_and_error_body(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"401", "403", "404"} <= set(paths["/jobs/{job_id}"]["get"]["responses"])
    assert {"400", "404", "413", "415", "422"} <= set(paths["/adapt"]["post"]["responses"])
    assert "400" in paths["/predict"]["post"]["responses"]
    body = paths["/predict"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ErrorBody"}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    r = client.post("/predict", json={"model": "tiny"})
    assert set(r.json()["detail"]) <= {"reason", "message", "errors"}


# --- 6. and 8. jobs: a cancelled queued job leaves no batch; cancellation during the gate ------------
def test_a_job_cancelled_while_queued_deletes_its_batch(
    tmp_path, tiny_store, tiny_template, start_service, redis_prefix
):
    svc = start_service(
        model_store=str(tiny_store),
        seed_dir=str(tiny_template[0]),
        models=["tiny"],
        token=TOKEN,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        queue=f"{redis_prefix}nobody",  # no worker listens: the job stays queued
    )
    with httpx.Client(base_url=svc.url, timeout=60, headers=auth()) as c:
        r = c.post("/adapt", json={"model": "tiny", "images": good_images(12)})
        assert r.status_code == 202
        job_id = r.json()["job_id"]
        assert batch_path(tiny_store, job_id).exists()
        r = c.post(f"/jobs/{job_id}/cancel")
        assert (r.status_code, r.json()["state"]) == (202, "cancelled")
        assert not batch_path(tiny_store, job_id).exists()
    _cleanup(redis_prefix)


def test_cancelling_during_the_first_gate_evaluation_stops_it(tmp_path, start_service):
    from harness.stores import build_store, make_seed_dir

    seed_dir = make_seed_dir(tmp_path / "seed", "slow", n_canary=4000)
    store = tmp_path / "store"
    build_store(store, seed_dir, ["slow"])
    svc = start_service(
        model_store=str(store), seed_dir=str(seed_dir), models=["slow"], token=TOKEN, gate={"k": 50}
    )
    with httpx.Client(base_url=svc.url, timeout=60, headers=auth()) as c:
        job_id = c.post("/adapt", json={"model": "slow", "images": good_images(40)}).json()["job_id"]
        deadline = time.monotonic() + 60
        while c.get(f"/jobs/{job_id}").json()["state"] == "queued" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.post(f"/jobs/{job_id}/cancel").status_code == 202
        while (job := c.get(f"/jobs/{job_id}").json())["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
    assert job["state"] == "cancelled"
    # the first gate evaluation reports 8% of adapt-and-judge when it completes: it never did
    assert job["progress"] < 0.9 * 0.08
    assert ModelRegistry(store).versions("slow") == [1]


# --- 4. liveness: leases ---------------------------------------------------------------------------
def _cleanup(prefix: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"{prefix}*"))
    if keys:
        r.delete(*keys)


def test_a_lease_is_held_by_one_worker_and_a_lost_job_is_requeued_then_failed(redis_prefix):
    store = RedisJobStore(REDIS_URL, redis_prefix)
    job = JobRecord(
        id="a" * 32, model="tiny", state="queued", progress=0.0, n_inputs=1, data_hash="x", created=0.0
    )
    store.create(job)
    try:
        assert store.claim(job.id, "w1", 1.0)
        assert not store.claim(job.id, "w2", 1.0)  # a redelivery while w1 lives does nothing
        assert store.renew(job.id, "w1", 1.0)
        store.update(job.id, state="running", attempts=1)
        assert store.lost_jobs() == []
        assert store.requeue(job.id, 3) is None  # the lease is alive
        time.sleep(1.2)  # w1 died: its lease expired
        assert not store.renew(job.id, "w1", 1.0)
        assert store.lost_jobs() == [job.id]
        requeued = store.requeue(job.id, 3)
        assert requeued is not None
        assert requeued.state == "queued"
        assert store.requeue(job.id, 3) is None  # a second reaper finds nothing to do
        assert store.claim(job.id, "w2", 1.0)
        store.update(job.id, state="running", attempts=3)
        store.release(job.id, "w2")
        failed = store.requeue(job.id, 3)
        assert failed is not None
        assert failed.state == "failed"
        assert "worker lost" in (failed.error or "")
    finally:
        _cleanup(redis_prefix)


def test_a_delivery_of_a_job_another_worker_holds_does_nothing(tiny_store, redis_prefix):
    from app.core.config import Settings

    store = RedisJobStore(REDIS_URL, redis_prefix)
    job = JobRecord(
        id="b" * 32, model="tiny", state="running", progress=0.3, n_inputs=1, data_hash="x", created=0.0
    )
    store.create(job)
    try:
        assert store.claim(job.id, "another-live-worker", 30.0)
        ctx = JobContext(ModelRegistry(tiny_store), store, Settings(models=["tiny"], model_store=tiny_store))
        after = run_job(job.id, ctx)
        assert after is not None
        assert (after.state, after.progress) == ("running", 0.3)
        assert ModelRegistry(tiny_store).versions("tiny") == [1]
    finally:
        _cleanup(redis_prefix)


# --- 9. a tampered and re-checksummed model.onnx ---------------------------------------------------
def test_a_tampered_rechecksummed_onnx_graph_is_refused(tiny_store):
    registry = ModelRegistry(tiny_store)
    directory = registry.version_dir("tiny", 1)
    graph = onnx.load(str(directory / "model.onnx"))
    init = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(init).copy()
    values += 0.5
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    buf = io.BytesIO()
    onnx.save(graph, buf)
    (directory / "model.onnx").write_bytes(buf.getvalue())
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    registry.verify("tiny", 1)  # the checksums hold
    with pytest.raises(CorruptVersionError, match=r"disagrees with checkpoint\.pt") as info:
        load_version(registry, "tiny", 1)
    assert isinstance(info.value, ConflictError)
