"""Adaptation from live traffic (CAMA_AUTO_ADAPT) and routing by evidence (CAMA_ROUTE_VERSIONS).

The buffer is checked on its own with a fake clock; the whole path — drift on real HTTP traffic,
a full buffer, a job started by drift and hot-swapped in, then a second process routing each
input between the two versions — runs against real ``python -m app`` processes (embedded worker).
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from app.auto_adapt import LiveBuffer
from cama.novelty import route
from harness.inputs import digit_like_images
from harness.processes import ACCEPTING_GATE, ServiceProcess
from harness.stores import clone_store, template_store
from store.data import Inputs
from store.registry import ModelRegistry

TOKEN = "a" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ACCEPT_ALL = ACCEPTING_GATE


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rows(start: int, n: int) -> Inputs:
    return Inputs(np.arange(start, start + n, dtype=np.float32).reshape(n, 1, 1, 1))


def test_live_buffer_keeps_the_newest_inputs_within_size_and_age():
    clock = Clock()
    buffer = LiveBuffer(capacity=5, max_age_s=10.0, clock=clock)
    buffer.add(rows(0, 3))
    clock.now = 4.0
    buffer.add(rows(3, 4))  # 7 rows: the two oldest go
    assert len(buffer) == 5
    clock.now = 12.0  # the first part (now rows 2) is older than 10 s
    assert len(buffer) == 4
    drained = buffer.drain()
    assert drained is not None
    assert drained.x.ravel().tolist() == [3.0, 4.0, 5.0, 6.0]
    assert len(buffer) == 0
    assert buffer.drain() is None
    buffer.add(rows(10, 8))  # one part larger than the buffer: its newest rows
    assert buffer.drain().x.ravel().tolist() == [13.0, 14.0, 15.0, 16.0, 17.0]


def test_route_takes_the_version_with_the_highest_evidence():
    a = np.log(np.array([[0.5, 0.1], [0.01, 0.01], [0.2, 0.2]]))
    b = np.log(np.array([[0.1, 0.1], [0.3, 0.6], [0.2, 0.2]]))
    chosen, picked = route([a, b])
    assert chosen.tolist() == [0, 1, 0]  # log p(x): 0.6 vs 0.2; 0.02 vs 0.9; a tie goes to the first
    assert np.allclose(picked, np.stack([a[0], b[1], a[2]]))
    with pytest.raises(ValueError, match="at least one version"):
        route([])


def post(client: httpx.Client, x: np.ndarray, seed: int) -> dict:
    r = client.post("/predict", json={"model": "tiny", "images": (x / 255.0).tolist(), "seed": seed})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_drift_starts_one_adaptation_and_routing_serves_each_input_by_its_version(tmp_path_factory):
    seed_dir, template = template_store(tmp_path_factory.getbasetemp() / "tiny_template")
    root = tmp_path_factory.mktemp("auto")
    store = clone_store(template, root / "store")
    common = {
        "model_store": str(store),
        "seed_dir": str(seed_dir),
        "models": ["tiny"],
        "token": TOKEN,
        "poll_interval_s": 0.3,
        "drift_window": 24,
        "evidence_inputs": 64,
        "finetune": {"epochs": 1, "batch_size": 16, "lr": 0.01, "min_steps": 0},
        **ACCEPT_ALL,
    }
    clean, _ = digit_like_images(96, seed=11)
    shifted = 255.0 - clean  # what the tiny model explains far worse than its canary
    svc = ServiceProcess(root / "auto.log", auto_adapt="tiny", auto_adapt_inputs=40, **common)
    svc.wait_ready()
    try:
        with httpx.Client(base_url=svc.url, timeout=60, headers=AUTH) as c:
            for i in range(0, 48, 8):
                post(c, clean[i : i + 8], seed=i)
            drift = c.get("/models/tiny/drift").json()
            assert drift["auto_adapt"] is True
            assert drift["state"] == "normal"
            assert drift["buffered"] == 0
            for i in range(0, 96, 8):  # drift raises within the window; then the buffer fills
                post(c, shifted[i : i + 8], seed=100 + i)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                drift = c.get("/models/tiny/drift").json()
                if drift["version"] == 2 and drift["auto_job"] is None:
                    break
                time.sleep(0.2)
            assert drift["version"] == 2, drift  # the job ran, the gate accepted, the app swapped
            assert drift["buffered"] == 0
            assert drift["auto_job"] is None
            assert drift["state"] == "warming"  # a new test for the new version
        registry = ModelRegistry(store)
        manifest = registry.manifest("tiny", 2)
        job = httpx.get(f"{svc.url}/jobs/{manifest.job_id}", headers=AUTH).json()
        assert job["trigger"] == "drift"
        assert job["base_version"] == 1
        assert job["n_inputs"] == 40
        assert job["state"] == "succeeded"
    finally:
        svc.stop()
    assert svc.logs().count('"event": "auto_adapt"') == 1  # one job, not one per request

    # the same store served twice: v2 alone, and v2 with v1 beside it on the route
    plain = ServiceProcess(root / "plain.log", **common)
    routed = ServiceProcess(root / "routed.log", route_versions=1, **common)
    for s in (plain, routed):
        s.wait_ready()
    try:
        mixed = np.concatenate([clean[:8], shifted[:8]])
        with httpx.Client(base_url=plain.url, timeout=60) as c:
            alone = post(c, mixed, seed=5)
        with httpx.Client(base_url=routed.url, timeout=60) as c:
            deadline = time.monotonic() + 60
            while c.get("/models/tiny/drift").json()["routes"] != [1] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert c.get("/models/tiny/drift").json()["routes"] == [1]
            both = post(c, mixed, seed=5)
        assert alone["version"] == both["version"] == 2
        assert all(p["route"] is None for p in alone["predictions"])
        routes = [p["route"] for p in both["predictions"]]
        assert set(routes) <= {1, 2}
        assert 1 in routes
        for a, b in zip(alone["predictions"], both["predictions"], strict=True):
            # same seed, same noise: the route's evidence is the best of the two versions'
            assert b["log_px"] >= a["log_px"] - 1e-3
            if b["route"] == 2:
                assert b["log_px"] == pytest.approx(a["log_px"], abs=1e-3)
                assert b["probabilities"] == pytest.approx(a["probabilities"], abs=1e-5)
    finally:
        plain.stop()
        routed.stop()
