"""Each prediction's log p(x) and unusual score, and the drift test on live traffic, over real HTTP."""

from __future__ import annotations

import json

import httpx
import numpy as np

from harness.inputs import digit_like_images


def post(client: httpx.Client, x: np.ndarray, seed: int) -> dict:
    r = client.post("/predict", json={"model": "tiny", "images": (x / 255.0).tolist(), "seed": seed})
    assert r.status_code == 200, r.text
    return r.json()


def test_unusual_scores_and_drift_state_follow_the_traffic(tiny_template, tiny_store, start_service):
    seed_dir, _ = tiny_template
    svc = start_service(
        model_store=str(tiny_store),
        seed_dir=str(seed_dir),
        models=["tiny"],
        drift_window=24,
        evidence_inputs=64,
        unusual_rule="evidence",  # the tiny model's q(m|x) is barely trained; its evidence flags inversion
    )
    with httpx.Client(base_url=svc.url, timeout=60) as c:
        drift = c.get("/models/tiny/drift").json()
        assert drift["state"] == "warming"
        assert drift["reference_k"] == 10
        assert drift["seen"] == 0
        clean, _ = digit_like_images(96, seed=11)  # drawn like the tiny model's canary
        scores = []
        for i in range(0, 96, 8):
            body = post(c, clean[i : i + 8], seed=i)
            for p in body["predictions"]:
                assert np.isclose(np.sum(p["probabilities"]), 1.0, atol=1e-4)
                assert 0.0 <= p["unusual"] <= 1.0
                assert np.isfinite(p["log_px"])
                scores.append(p["unusual"])
        assert 0.2 < np.mean(scores) < 0.8  # roughly uniform on clean inputs
        drift = c.get("/models/tiny/drift").json()
        assert drift["state"] == "normal"
        assert drift["seen"] == 96
        assert drift["alarms"] == 0
        # the same digits, inverted: what the model explains far worse than its canary
        for i in range(0, 48, 8):
            body = post(c, 255.0 - clean[i : i + 8], seed=100 + i)
            assert min(p["unusual"] for p in body["predictions"]) > 0.9
        drift = c.get("/models/tiny/drift").json()
        assert drift["state"] == "drift"
        assert drift["alarms"] == 1
        assert drift["statistic"] >= drift["alarm_z"]
        assert drift["since"] is not None
        # a request at another k is answered without a score and not tested
        r = c.post("/predict", json={"model": "tiny", "images": (clean[:2] / 255.0).tolist(), "k": 3})
        assert all(p["unusual"] is None for p in r.json()["predictions"])
        assert c.get("/models/tiny/drift").json()["seen"] == 144
        metrics = c.get("/metrics").text
        assert 'cama_drift_state{model="tiny"} 2.0' in metrics
        assert "cama_drift_statistic" in metrics
        assert c.get("/models/nope/drift").status_code == 404
    svc.stop()
    events = [
        json.loads(line[line.index("{") :])
        for line in svc.logs().splitlines()
        if '"event": "drift_state"' in line
    ]
    assert [e["state"] for e in events] == ["normal", "drift"]
    assert all(e["model"] == "tiny" and e["version"] == 1 for e in events)
