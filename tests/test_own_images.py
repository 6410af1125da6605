"""A user's own images: a folder of class subfolders (or an ``.npz``) read at the size and channel
count a config names, then end to end over HTTP: ``cama-serve train --data`` -> ``cama-serve
export`` -> a real service answers ``/predict`` with the class names -> an ``/adapt`` job
completes and the adapted version names the classes too."""

from __future__ import annotations

import base64
import io
import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cama.checkpoint import load_checkpoint
from harness.processes import ACCEPTING_GATE, ServiceProcess, wait_job, wait_served
from store.registry import ModelRegistry
from training.data import DataError, ImageSpec, load_images, recorded_test_split

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("bars", "cross", "ring")  # folder names; labels 0, 1, 2 (sorted)
TOKEN = "o" * 24


def pattern(label: int, rng: np.random.Generator, side: int = 16) -> np.ndarray:
    """An RGB ``(side, side, 3)`` uint8 image of class ``label``: vertical bars, a cross or a ring,
    in a random colour over noise."""
    yy, xx = np.mgrid[:side, :side]
    centre = (side - 1) / 2
    if label == 0:
        mask = (xx // 3) % 2 == 0
    elif label == 1:
        mask = (np.abs(xx - centre) < 2) | (np.abs(yy - centre) < 2)
    else:
        mask = np.abs(np.hypot(xx - centre, yy - centre) - side / 3) < 1.5
    image = rng.integers(0, 50, size=(side, side, 3))
    image[mask] = rng.integers(150, 256, size=3)
    return image.astype(np.uint8)


def write_folder(root: Path, per_class: int, seed: int = 0, *, fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern(label, rng)).save(root / name / f"{i}.{fmt.lower()}", format=fmt)
    return root


def png_base64(image: np.ndarray) -> str:
    """``(3, H, W)`` float in [0, 1] -> a base64 PNG."""
    buf = io.BytesIO()
    pixels = np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"{result.args[3:5]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def test_a_folder_is_read_at_the_configured_size_and_channels(tmp_path):
    write_folder(tmp_path / "imgs", per_class=5)
    data = load_images(tmp_path / "imgs", ImageSpec(image_size=(12, 10), channels=1, test_fraction=0.2))
    assert data.classes == CLASSES
    assert data.train.x.shape == (12, 1, 12, 10)  # 15 images, 3 held out as the test split
    assert data.test.x.shape == (3, 1, 12, 10)
    assert data.train.x.dtype == np.float32
    assert 0.0 <= data.train.x.min() <= data.train.x.max() <= 1.0
    assert sorted(np.concatenate([data.train.y, data.test.y]).tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    again = load_images(tmp_path / "imgs", ImageSpec(image_size=(12, 10), channels=1, test_fraction=0.2))
    np.testing.assert_array_equal(again.test.x, data.test.x)  # the held-out split is seeded
    assert len(data.checksum) == 64


def test_train_and_test_subfolders_are_the_splits_and_jpegs_are_read(tmp_path):
    write_folder(tmp_path / "imgs" / "train", per_class=4)
    write_folder(tmp_path / "imgs" / "test", per_class=2, seed=1, fmt="JPEG")
    data = load_images(tmp_path / "imgs", ImageSpec(image_size=(16, 16), channels=3))
    assert (len(data.train), len(data.test)) == (12, 6)
    assert data.test.x.shape[1:] == (3, 16, 16)
    (tmp_path / "imgs" / "test" / "stars").mkdir()
    with pytest.raises(DataError, match="stars"):
        load_images(tmp_path / "imgs", ImageSpec())


def test_an_npz_with_class_names(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(20, 9, 9), dtype=np.uint8)
    y = np.arange(20) % 2
    np.savez(tmp_path / "d.npz", x=x, y=y, class_names=np.array(["cat", "dog"]))
    data = load_images(tmp_path / "d.npz", ImageSpec(image_size=(9, 9), channels=1, test_fraction=0.25))
    assert data.classes == ("cat", "dog")
    assert (len(data.train), len(data.test)) == (15, 5)
    every = np.concatenate([data.train.x, data.test.x]).reshape(20, -1)
    # the same images, levels unchanged (no resize at their own size), split 15 / 5
    np.testing.assert_allclose(np.sort(every.sum(1)), np.sort(x.reshape(20, -1).sum(1) / 255.0), rtol=1e-5)


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir()
    with pytest.raises(DataError, match="no PNG or JPEG"):
        load_images(tmp_path / "imgs", ImageSpec())


CONFIG = """
name = "shapes"
out = "models/shapes.pt"
seed = 0

[data]
dataset = "images"
image_size = [12, 12]
channels = 3
test_fraction = 0.2
val_fraction = 0.25

[model]
kind = "cama"
tiny = true
m_pathway = "transform"

[[stages]]
name = "train"
epochs = 2
batch_size = 16
val_k = 2
test_k = 2
"""


@pytest.mark.slow
def test_own_images_train_export_serve_predict_adapt(tmp_path, cama_serve):
    folder = write_folder(tmp_path / "shapes", per_class=30)
    config = tmp_path / "shapes.toml"
    config.write_text(CONFIG)
    checkpoint = tmp_path / "shapes.pt"
    train = ("--config", str(config), "--data", str(folder), "--out", str(checkpoint), "--threads", "1")
    succeeded(cama_serve("train", *train))
    _, meta = load_checkpoint(checkpoint)
    assert meta.provenance["class_names"] == list(CLASSES)
    assert meta.provenance["dataset"] == "images"
    assert meta.config["image_size"] == [12, 12]
    assert meta.config["channels"] == 3
    assert meta.config["num_classes"] == 3
    assert meta.provenance["config"]["overrides"]["data"] == str(folder)

    evaluated = json.loads(
        succeeded(cama_serve("evaluate", "--checkpoint", str(checkpoint), "--k", "2")).splitlines()[-1]
    )
    assert evaluated["images"] == 18  # the held-out 20% of 90
    test = recorded_test_split(meta.provenance)
    assert len(test) == 18

    store = tmp_path / "store"
    export = ("--checkpoint", str(checkpoint), "--name", "shapes", "--store", str(store))
    exported = json.loads(succeeded(cama_serve("export", *export)))
    assert exported == {"name": "shapes", "version": 1, "active": True}
    registry = ModelRegistry(store)
    assert registry.manifest("shapes", 1).inputs == {"x": [3, 12, 12]}
    assert registry.manifest("shapes", 1).provenance["class_names"] == list(CLASSES)

    svc = ServiceProcess(
        tmp_path / "api.log",
        model_store=str(store),
        seed_dir=str(tmp_path),
        models=["shapes"],
        token=TOKEN,
        **ACCEPTING_GATE,
        finetune={"epochs": 1, "batch_size": 16, "min_steps": 0},
    )
    try:
        svc.wait_ready()
        with httpx.Client(
            base_url=svc.url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as client:
            images = [png_base64(x) for x in test.x[:6]]
            answer = client.post("/predict", json={"model": "shapes", "images": images, "seed": 0})
            assert answer.status_code == 200, answer.text
            predictions = answer.json()["predictions"]
            assert [p["class_name"] for p in predictions] == [CLASSES[p["label"]] for p in predictions]
            darker = [png_base64(x * 0.6) for x in test.x]  # a manipulation: the images dimmed
            job = client.post("/adapt", json={"model": "shapes", "images": darker})
            assert job.status_code == 202, job.text
            done = wait_job(client, job.json()["job_id"], timeout=600)
            assert done["state"] == "succeeded", done
            adapted = wait_served(client, {"model": "shapes", "images": darker[:3]}, done["version"])
            assert adapted["version"] == 2
            assert all(p["class_name"] in CLASSES for p in adapted["predictions"])
    finally:
        svc.stop()
