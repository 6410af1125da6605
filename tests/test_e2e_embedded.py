"""End to end, embedded mode (no Redis): a real ``python -m app`` adapts in its background thread.

Hot-swap under continuous load, cancellation, rollback, corrupted versions, and the gate's refusal.
The tiny model's gate is configured to decide deterministically (accept everything in one service,
demand an impossible ELBO gain in the other): these tests check the plumbing; the natural gate
decisions are shown with the real MNIST model by ``benchmarks/e2e_mnist.py``.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from harness.inputs import digit_like_images, png_base64
from harness.processes import ACCEPTING_GATE, ContinuousClient, ServiceProcess, wait_job
from harness.stores import clone_store, template_store
from store.registry import ModelRegistry

TOKEN = "e" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RECIPE = {"epochs": 1, "batch_size": 16, "lr": 0.01, "min_steps": 0}


def start(tmp_path_factory, name: str, **settings: object) -> tuple[ServiceProcess, ModelRegistry]:
    seed_dir, template = template_store(tmp_path_factory.getbasetemp() / "tiny_template")
    root = tmp_path_factory.mktemp(name)
    store = clone_store(template, root / "store")
    svc = ServiceProcess(
        root / "api.log",
        model_store=str(store),
        seed_dir=str(seed_dir),
        models=["tiny"],
        token=TOKEN,
        finetune=RECIPE,
        poll_interval_s=0.5,
        **settings,
    )
    svc.wait_ready()
    return svc, ModelRegistry(store)


@pytest.fixture(scope="module")
def accepting(tmp_path_factory):
    svc, registry = start(
        tmp_path_factory,
        "accepting",
        **ACCEPTING_GATE,
    )
    try:
        yield svc, registry
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    svc, registry = start(tmp_path_factory, "strict", gate={**ACCEPTING_GATE["gate"], "min_elbo_gain": 1e9})
    try:
        yield svc, registry
    finally:
        svc.stop()


def shifted_batch(n: int = 40) -> list[str]:
    x, _ = digit_like_images(n, seed=11)
    return [png_base64(img) for img in np.roll(x, 4, axis=1) / 255.0]


def predict_payload() -> dict[str, object]:
    x, _ = digit_like_images(2, seed=3)
    return {"model": "tiny", "images": [png_base64(img / 255.0) for img in x], "k": 2}


@pytest.mark.slow
def test_adaptation_hot_swaps_with_zero_failed_requests(accepting):
    svc, registry = accepting
    with httpx.Client(base_url=svc.url, timeout=30, headers=AUTH) as client:
        load = ContinuousClient(svc.url, predict_payload()).start()
        overrides = {"lr_schedule": "cosine"}  # an optional recipe setting
        r = client.post("/adapt", json={"model": "tiny", "images": shifted_batch(), "finetune": overrides})
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert accepted["state"] == "queued"
        assert accepted["status_url"] == f"/jobs/{accepted['job_id']}"
        assert r.headers["location"] == accepted["status_url"]
        progress, states = [], set()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            job = client.get(accepted["status_url"]).json()
            progress.append(job["progress"])
            states.add(job["state"])
            if job["state"] in ("succeeded", "rejected", "failed", "cancelled"):
                break
            time.sleep(0.1)
        load.wait_for_version(2)
        time.sleep(0.5)
        stats = load.stop()
    assert job["state"] == "succeeded", job
    assert "running" in states
    assert progress == sorted(progress)
    assert job["progress"] == 1.0
    assert job["version"] == 2
    assert job["base_version"] == 1
    assert job["n_inputs"] == 40
    assert job["finetune"]["lr_schedule"] == "cosine"  # the recipe it ran with
    assert job["gate"]["accepted"]
    assert job["metrics"]["steps"] >= 1
    assert stats["failed_requests"] == 0, stats["failures"]
    assert stats["versions"] == [1, 2]
    assert stats["version_regressions"] == 0
    assert registry.active("tiny") == 2
    manifest = registry.manifest("tiny", 2)
    assert manifest.parent == 1
    assert manifest.job_id == job["id"]
    assert manifest.data_hash == job["data_hash"]
    detail = httpx.get(f"{svc.url}/models/tiny").json()
    assert detail["served_version"] == 2
    assert [v["version"] for v in detail["lineage"]] == [1, 2]
    assert detail["lineage"][1]["gate"]["accepted"] is True


def test_cancelled_job_publishes_nothing(accepting):
    svc, registry = accepting
    versions = registry.versions("tiny")
    with httpx.Client(base_url=svc.url, timeout=30, headers=AUTH) as client:
        served = client.get("/models/tiny").json()["served_version"]
        body = {"model": "tiny", "images": shifted_batch(), "finetune": {"epochs": 100, "batch_size": 4}}
        job_id = client.post("/adapt", json=body).json()["job_id"]
        deadline = time.monotonic() + 300
        while client.get(f"/jobs/{job_id}").json()["progress"] < 0.06 and time.monotonic() < deadline:
            time.sleep(0.1)
        r = client.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 202
        assert r.json()["cancel_requested"]
        job = wait_job(client, job_id, timeout=120)
        assert job["state"] == "cancelled"
        assert job["version"] is None
        r = client.post(f"/jobs/{job_id}/cancel")
        assert (r.status_code, r.json()["detail"]["reason"]) == (409, "job_finished")
        assert client.get("/models/tiny").json()["served_version"] == served
    assert registry.versions("tiny") == versions
    assert not list((registry.root / ".jobs").glob("*.npz"))


def test_rollback_and_corrupted_versions_are_never_served(accepting):
    svc, registry = accepting
    if registry.versions("tiny") != [1, 2]:
        pytest.skip("needs the version produced by the hot-swap test")
    with httpx.Client(base_url=svc.url, timeout=30, headers=AUTH) as client:
        r = client.post("/models/tiny/activate", json={"version": 1})  # rollback
        assert r.status_code == 200
        assert r.json()["served_version"] == 1
        assert r.json()["active_version"] == 1
        assert client.post("/predict", json=predict_payload()).json()["version"] == 1
        onnx = registry.version_dir("tiny", 2) / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[:-100])  # a damaged artifact
        r = client.post("/models/tiny/activate", json={"version": 2})
        assert (r.status_code, r.json()["detail"]["reason"]) == (409, "corrupt_version")
        assert registry.active("tiny") == 1
        # another process flips ACTIVE to the damaged version: refused at load, v1 stays served
        (registry.model_dir("tiny") / "ACTIVE").write_text("2\n")
        deadline = time.monotonic() + 10
        while "REFUSED tiny v2" not in svc.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "REFUSED tiny v2, not served: tiny v2: checksum mismatch for model.onnx" in svc.logs()
        assert client.post("/predict", json=predict_payload()).json()["version"] == 1
        ready = client.get("/readyz").json()
        assert ready["models"] == {"tiny": 1}
        assert "refused v2" in ready["problems"]["tiny"]
        assert 'cama_model_load_failures_total{model="tiny"} 1.0' in client.get("/metrics").text
        (registry.model_dir("tiny") / "ACTIVE").write_text("1\n")


@pytest.mark.slow
def test_poisoned_batch_is_rejected_and_the_served_version_is_unchanged(strict):
    svc, registry = strict
    rng = np.random.default_rng(0)
    noise = [png_base64(img) for img in rng.random((40, 28, 28))]
    with httpx.Client(base_url=svc.url, timeout=30, headers=AUTH) as client:
        job_id = client.post("/adapt", json={"model": "tiny", "images": noise}).json()["job_id"]
        job = wait_job(client, job_id, timeout=600)
        assert job["state"] == "rejected"
        assert job["version"] is None
        assert any("held-out ELBO(x) did not rise" in reason for reason in job["reasons"])
        assert job["gate"]["accepted"] is False
        assert "canary_accuracy_after" in job["metrics"]
        assert client.post("/predict", json=predict_payload()).json()["version"] == 1
        assert 'cama_adapt_jobs{state="rejected"} 1.0' in client.get("/metrics").text
    assert registry.versions("tiny") == [1]
    assert registry.active("tiny") == 1
