"""A 3 x 32 x 32 image model through a real service: RGB files and arrays in, predictions out, its
shape in ``GET /models/{name}``, adaptation on RGB inputs, and every wrong shape a 4xx."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from harness.inputs import rgb_images
from harness.processes import ACCEPTING_GATE, ServiceProcess, wait_job, wait_served
from harness.stores import build_store, make_rgb_seed_dir

TOKEN = "r" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb")
    seed_dir = make_rgb_seed_dir(root / "seed")
    store = build_store(root / "store", seed_dir, ["rgb"]).root
    svc = ServiceProcess(
        root / "api.log",
        model_store=str(store),
        seed_dir=str(seed_dir),
        models=["rgb"],
        token=TOKEN,
        **ACCEPTING_GATE,
        finetune={"epochs": 1, "batch_size": 16, "min_steps": 0},
    )
    try:
        svc.wait_ready()
        yield svc
    finally:
        svc.stop()


def png(image: np.ndarray, mode: str = "RGB") -> bytes:
    """``image (3, H, W)`` uint8 -> PNG bytes (``mode="L"``: its first channel, grey)."""
    buf = io.BytesIO()
    pixels = image.transpose(1, 2, 0) if mode == "RGB" else image[0]
    Image.fromarray(np.ascontiguousarray(pixels), mode).save(buf, format="PNG")
    return buf.getvalue()


def test_the_model_says_its_shape_and_answers_rgb_files_and_arrays(service):
    images, _ = rgb_images(3, seed=5)
    with httpx.Client(base_url=service.url, timeout=60) as client:
        info = client.get("/models/rgb").json()
        assert info["inputs"] == {"x": [3, 32, 32]}
        arrays = [(image / 255.0).tolist() for image in images]
        encoded = [base64.b64encode(png(image)).decode() for image in images]
        by_array = client.post("/predict", json={"model": "rgb", "images": arrays, "seed": 1})
        by_png = client.post("/predict", json={"model": "rgb", "images": encoded, "seed": 1})
        files = [("images", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(images)]
        by_upload = client.post("/predict", data={"model": "rgb", "seed": "1"}, files=files)
    for r in (by_array, by_png, by_upload):
        assert r.status_code == 200, r.text
    answers = [[p["probabilities"] for p in r.json()["predictions"]] for r in (by_array, by_png, by_upload)]
    assert all(len(row) == 2 for row in answers[0])  # two classes
    np.testing.assert_allclose(answers[0], answers[1], atol=1e-5)  # lossless PNG = the same pixels
    np.testing.assert_allclose(answers[0], answers[2], atol=1e-5)


@pytest.mark.parametrize(
    ("images", "why"),
    [
        ([[[0.5] * 32] * 32], "bad_shape"),  # H x W to a 3-channel model
        ([[[[0.5] * 28] * 28] * 3], "bad_shape"),  # 3 x 28 x 28
        ([base64.b64encode(png(np.zeros((3, 28, 28), np.uint8))).decode()], "bad_shape"),
        ([[[[1.5] * 32] * 32] * 3], "out_of_range"),
    ],
)
def test_wrong_shapes_and_values_are_4xx_with_a_reason(service, images, why):
    r = httpx.post(f"{service.url}/predict", json={"model": "rgb", "images": images}, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["reason"] == why


def test_a_grey_file_is_taken_as_rgb(service):
    image = rgb_images(1, seed=6)[0][0]
    grey = np.repeat(image[:1], 3, axis=0)
    with httpx.Client(base_url=service.url, timeout=60) as client:
        as_grey = client.post(
            "/predict",
            json={"model": "rgb", "images": [base64.b64encode(png(image, "L")).decode()], "seed": 2},
        )
        as_rgb = client.post(
            "/predict", json={"model": "rgb", "images": [(grey / 255.0).tolist()], "seed": 2}
        )
    assert as_grey.status_code == 200
    assert as_rgb.status_code == 200
    np.testing.assert_allclose(
        as_grey.json()["predictions"][0]["probabilities"],
        as_rgb.json()["predictions"][0]["probabilities"],
        atol=1e-5,
    )


def test_adaptation_on_rgb_inputs_swaps_the_version(service):
    images, _ = rgb_images(40, seed=7)
    shifted = np.clip(images.astype(np.int16) + 40, 0, 255).astype(np.uint8)  # brighter: a manipulation
    payload = [base64.b64encode(png(image)).decode() for image in shifted]
    with httpx.Client(base_url=service.url, timeout=60, headers=AUTH) as client:
        r = client.post("/adapt", json={"model": "rgb", "images": payload})
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["job_id"], timeout=600)
        assert job["state"] == "succeeded", job
        assert job["version"] == 2
        probe = {"model": "rgb", "images": payload[:1]}
        assert wait_served(client, probe, 2)["version"] == 2
