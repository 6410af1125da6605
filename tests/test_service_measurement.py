"""The measurement model through the service: records in, predictions out, adaptation with cond = (a, c)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from cama.adapt import FinetuneConfig
from cama.checkpoint import load_checkpoint
from harness.processes import ACCEPTING_GATE, ServiceProcess, wait_job, wait_served
from harness.stores import build_store, make_measurement_seed_dir

TOKEN = "m" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHIPPED_RECIPE = {"alpha": 0.8, "epochs": 2, "lr": 2e-3, "min_steps": 0, "bf16": False}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("measurement")
    seed_dir = make_measurement_seed_dir(root / "seed", adapt_recipe=SHIPPED_RECIPE)
    store = build_store(root / "store", seed_dir, ["meas"]).root
    svc = ServiceProcess(
        root / "api.log",
        model_store=str(store),
        seed_dir=str(seed_dir),
        models=["meas"],
        token=TOKEN,
        **ACCEPTING_GATE,
        finetune={"epochs": 1, "batch_size": 16},
    )
    svc.store = store  # type: ignore[attr-defined]
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


def records(n: int, seed: int = 0, shift: float = 0.0) -> list[dict[str, list[float]]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "a": rng.standard_normal(5).tolist(),
            "c": rng.standard_normal(5).tolist(),
            "x": (rng.standard_normal(10) + shift).tolist(),
        }
        for _ in range(n)
    ]


def test_records_are_classified(service):
    r = httpx.post(f"{service.url}/predict", json={"model": "meas", "records": records(3), "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1
    assert [len(p["probabilities"]) for p in body["predictions"]] == [5, 5, 5]
    detail = httpx.get(f"{service.url}/models/meas").json()
    assert detail["kind"] == "measurement"
    assert detail["inputs"] == {"x": [10], "a": [5], "c": [5]}


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ({"records": [{"a": [0.0] * 4, "c": [0.0] * 5, "x": [0.0] * 10}]}, "bad_shape"),
        ({"records": [{"a": [0.0] * 5, "c": [0.0] * 5, "x": [0.0] * 9}]}, "bad_shape"),
        ({"records": [{"a": [0.0] * 5, "c": [0.0] * 5}]}, "invalid_request"),
        ({"images": [[[0.0] * 28] * 28]}, "wrong_input_kind"),
    ],
)
def test_bad_records(service, payload, why):
    r = httpx.post(f"{service.url}/predict", json={"model": "meas", **payload})
    assert r.status_code == 422
    assert r.json()["detail"]["reason"] == why


def test_adaptation_with_parents_and_coparents(service):
    with httpx.Client(base_url=service.url, timeout=30, headers=AUTH) as client:
        r = client.post("/adapt", json={"model": "meas", "records": records(60, seed=3, shift=1.5)})
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"], timeout=600)
        assert job["state"] == "succeeded", job
        assert job["version"] == 2
        assert wait_served(client, {"model": "meas", "records": records(1)}, 2)["version"] == 2
    # the recipe: the model's own (alpha, lr), the operator's CAMA_FINETUNE (epochs, batch size)
    recipe = job["finetune"]
    assert (recipe["alpha"], recipe["lr"], recipe["epochs"], recipe["batch_size"]) == (0.8, 2e-3, 1, 16)
    # and the adapted version keeps shipping it, for the next adaptation
    _, meta = load_checkpoint(service.store / "meas" / "2" / "checkpoint.pt")
    assert meta.provenance["adapt_recipe"] == FinetuneConfig.from_dict(SHIPPED_RECIPE).as_dict()
