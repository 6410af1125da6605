"""Your own images, shown on a real data set: scikit-learn's 8x8 handwritten digits (docs/own_images.md).

    python -m benchmarks.digits write --out data/digits     # the image folder (train/ and test/)
    cama-serve train --config configs/digits.toml           # CAMA on it
    cama-serve train --config configs/digits_dnn.toml       # the appendix-C DNN on the same folder
    python -m benchmarks.digits measure                     # clean accuracy of both; one /adapt

``write`` turns the 1,797 digits (``sklearn.datasets.load_digits``, 16 grey levels) into 8x8
PNGs, one subfolder per digit, a seeded 80/20 split into ``train/`` and ``test/``. ``measure``
scores both checkpoints on ``test/`` (``cama-serve evaluate``'s numerics: CAMA as ``POST
/predict`` answers it), exports CAMA into a fresh store, serves it (embedded worker, the
default promotion gate), and adapts it through the service: the test split is shifted
vertically (range 0.25, two pixels at most, seeded), its first half posted unlabelled to
``/adapt``, and ``/predict`` scores the other half before and after. Where the gate refuses the
job, the candidate it refused is scored too (the same code path run here, kept). It writes
``benchmarks/results/own_images_digits.json`` and the metrics ``own_images.digits.*``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from harness.processes import ServiceProcess, wait_job, wait_served
from training.metrics import update_metrics

RESULTS = Path(__file__).resolve().parent / "results" / "own_images_digits.json"
SHIFT = ("vshift", 0.25)  # the manipulation /adapt is shown on


def write_digits(out: Path, *, test_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """scikit-learn's digits as ``out/{train,test}/<digit>/<i>.png`` (8x8 grey, levels 0-16 scaled
    to 0-255); a seeded ``test_fraction`` goes to ``test/``. Returns the number of files per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    levels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    order = np.random.default_rng(seed).permutation(len(levels))
    n_test = round(test_fraction * len(levels))
    counts = {}
    for split, idx in (("test", order[:n_test]), ("train", order[n_test:])):
        for i in idx:
            folder = out / split / str(int(digits.target[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(levels[i], "L").save(folder / f"{i:04d}.png")
        counts[split] = len(idx)
    return counts


def png_base64(image: np.ndarray) -> str:
    """``(1, H, W)`` float in [0, 1] -> a base64 PNG (8-bit grey)."""
    buf = io.BytesIO()
    Image.fromarray(np.round(image[0] * 255.0).astype(np.uint8), "L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def served_accuracy(
    client: httpx.Client, model: str, x: np.ndarray, y: np.ndarray, k: int = 10
) -> tuple[float, int]:
    """Accuracy of ``POST /predict`` on ``x`` (requests of 64, noise seed 0); the version that answered."""
    correct, version = 0, -1
    for start in range(0, len(x), 64):
        images = [png_base64(image) for image in x[start : start + 64]]
        r = client.post("/predict", json={"model": model, "images": images, "k": k, "seed": 0})
        r.raise_for_status()
        answer = r.json()
        version = int(answer["version"])
        correct += sum(
            int(p["label"]) == int(t)
            for p, t in zip(answer["predictions"], y[start : start + 64], strict=True)
        )
    return correct / len(x), version


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Clean accuracy of both models on ``test/``; one adaptation through the service."""
    import training.baselines  # noqa: F401 - registers the DNN's checkpoint kind
    from cama.adapt import FinetuneConfig, GateConfig
    from cama.checkpoint import load_checkpoint
    from cama.image_model import ImageCama
    from experiments.experiment import adapt_as_served
    from store.data import ServingData
    from store.registry import ModelRegistry
    from training.accuracy import served_accuracy as cama_served_accuracy
    from training.baselines import evaluate_accuracy
    from training.data import recorded_test_split
    from training.export_model import export
    from training.manipulations import named

    cama, cama_meta = load_checkpoint(args.cama)
    dnn, _ = load_checkpoint(args.dnn)
    if not isinstance(cama, ImageCama):
        raise SystemExit(f"{args.cama} is not an image CAMA")
    test = recorded_test_split(cama_meta.provenance)  # test/ of the folder both were trained on
    metrics = {
        "own_images.digits.test_images": float(len(test)),
        "own_images.digits.cama.clean": cama_served_accuracy(cama, test.x, test.y, k=10, seed=0),
        "own_images.digits.dnn.clean": evaluate_accuracy(dnn, test.x, test.y),
    }
    name, level = SHIFT
    shifted = named(name, level)(test.x, np.random.default_rng(1))
    half = len(test) // 2
    adapt_x, score_x, score_y = shifted[:half], shifted[half:], test.y[half:]
    metrics["own_images.digits.dnn.vshift_0.25"] = evaluate_accuracy(dnn, score_x, score_y)
    store = Path(args.work) / "store"
    export(args.cama, "digits", store)
    svc = ServiceProcess(
        Path(args.work) / "api.log",
        model_store=str(store),
        seed_dir=str(args.work),
        models=["digits"],
        token=args.token,
    )
    try:
        svc.wait_ready(timeout=600)
        headers = {"Authorization": f"Bearer {args.token}"}
        with httpx.Client(base_url=svc.url, timeout=300, headers=headers) as client:
            before, v1 = served_accuracy(client, "digits", score_x, score_y)
            clean_before, _ = served_accuracy(client, "digits", test.x[half:], score_y)
            t0 = time.perf_counter()
            r = client.post("/adapt", json={"model": "digits", "images": [png_base64(x) for x in adapt_x]})
            r.raise_for_status()
            job = wait_job(client, r.json()["job_id"], timeout=3600)
            seconds = time.perf_counter() - t0
            promoted = job["state"] == "succeeded"
            if promoted:
                wait_served(
                    client, {"model": "digits", "images": [png_base64(score_x[0])]}, int(job["version"])
                )
            after, v2 = served_accuracy(client, "digits", score_x, score_y)
            clean_after, _ = served_accuracy(client, "digits", test.x[half:], score_y)
    finally:
        svc.stop()
    # what the job fine-tuned, kept although the gate may refuse it: the same code path
    # (cama.adapt.adapt_batch, the recipe and default gate) run here on the same unlabelled half
    serving = ServingData.load(ModelRegistry(store).version_dir("digits", 1) / "replay.npz")
    recipe = FinetuneConfig(**cama_meta.provenance["adapt_recipe"])
    candidate, _ = adapt_as_served(cama, adapt_x, recipe, GateConfig(), serving, keep_refused=True)
    metrics |= {
        "own_images.digits.cama.vshift_0.25.candidate": cama_served_accuracy(
            candidate, score_x, score_y, k=10, seed=0
        ),
        "own_images.digits.cama.clean_half.candidate": cama_served_accuracy(
            candidate, test.x[half:], score_y, k=10, seed=0
        ),
    }
    metrics |= {
        "own_images.digits.cama.vshift_0.25.before": before,
        "own_images.digits.cama.vshift_0.25.after": after,
        "own_images.digits.cama.clean_half.before": clean_before,
        "own_images.digits.cama.clean_half.after": clean_after,
        "own_images.digits.adapt.promoted": float(promoted),
        "own_images.digits.adapt.seconds": seconds,
    }
    report = {
        "metrics": metrics,
        "job": job,
        "versions": [v1, v2],
        "cama": str(args.cama),
        "dnn": str(args.dnn),
    }
    RESULTS.write_text(json.dumps(report, indent=2, default=str) + "\n")
    update_metrics({k: v for k, v in metrics.items() if k != "own_images.digits.adapt.seconds"})
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="scikit-learn's digits as an image folder")
    write.add_argument("--out", type=Path, default=Path("data/digits"))
    run = commands.add_parser(
        "measure", help="clean accuracy of CAMA and the DNN; one /adapt through the service"
    )
    run.add_argument("--cama", type=Path, default=Path("models/digits_cama.pt"))
    run.add_argument("--dnn", type=Path, default=Path("models/digits_dnn.pt"))
    run.add_argument(
        "--work", type=Path, default=None, help="store and logs (default: a new temporary folder)"
    )
    run.add_argument("--token", default="digits-benchmark-token-0123")
    args = parser.parse_args(argv)
    if args.command == "write":
        print(json.dumps(write_digits(args.out)))
        return
    args.work = args.work or Path(tempfile.mkdtemp(prefix="cama-digits-"))
    args.work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(measure(args), indent=2))


if __name__ == "__main__":
    main()
