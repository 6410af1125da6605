"""The client half of ``scripts/compose_smoke.sh``: one ``/predict`` and one ``/adapt`` against a
running stack, the job followed until the model has a new active version.

    python scripts/compose_smoke.py --url http://127.0.0.1:8000 --token "$CAMA_TOKEN"

The batch is the first ``--n`` MNIST test images (``$CAMA_DATA_DIR``) under a seeded manipulation
(``training.manipulations.named``, default a vertical shift of range 0.3). Prints one line per
step with its time and exits non-zero unless the job succeeded and its version became active.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import httpx
import numpy as np

from training.data import load_mnist
from training.manipulations import named

FINAL_STATES = {"succeeded", "rejected", "failed", "cancelled"}


def make_batch(n: int, manipulation: str, level: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` MNIST test images ``(n, 1, 28, 28)`` under the manipulation, and their labels."""
    test = load_mnist().test
    x = named(manipulation, level)(test.x[:n], np.random.default_rng(seed))
    return np.clip(x, 0.0, 1.0), test.y[:n]


def as_json_images(x: np.ndarray) -> list[list[list[float]]]:
    """28x28 arrays of grey levels in [0, 1], rounded to 3 decimals to keep the body small."""
    return [np.round(image[0].astype(np.float64), 3).tolist() for image in x]


def predict(client: httpx.Client, model: str, x: np.ndarray, y: np.ndarray) -> tuple[int, float]:
    """``POST /predict``: the version that answered and the accuracy of its labels."""
    r = client.post("/predict", json={"model": model, "images": as_json_images(x), "seed": 0})
    r.raise_for_status()
    body = r.json()
    labels = np.array([p["label"] for p in body["predictions"]])
    return int(body["version"]), float((labels == y).mean())


def active_version(client: httpx.Client, model: str) -> int | None:
    """``GET /models/{model}``: the active version (the registry's), if any."""
    r = client.get(f"/models/{model}")
    r.raise_for_status()
    version = r.json()["active_version"]
    return None if version is None else int(version)


def follow_job(
    client: httpx.Client, status_url: str, auth: dict[str, str], timeout_s: float
) -> dict[str, Any]:
    """Poll ``GET /jobs/{id}`` every 2 s until the job ends or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get(status_url, headers=auth)
        r.raise_for_status()
        job: dict[str, Any] = r.json()
        if job["state"] in FINAL_STATES:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"job still {job['state']} after {timeout_s:.0f} s (progress {job['progress']})"
            )
        time.sleep(2.0)


def wait_served(client: httpx.Client, model: str, version: int, timeout_s: float) -> None:
    """Poll ``GET /models/{model}`` until ``version`` is both active and served by the API."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get(f"/models/{model}")
        r.raise_for_status()
        body = r.json()
        if body["active_version"] == version and body["served_version"] == version:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"v{version} not served after {timeout_s:.0f} s: {body}")
        time.sleep(1.0)


def run(args: argparse.Namespace) -> int:
    """Predict, adapt, follow the job, predict again; 0 when a new version became active."""
    x, y = make_batch(args.n, args.manipulation, args.level, args.seed)
    auth = {"authorization": f"Bearer {args.token}"}
    with httpx.Client(base_url=args.url, timeout=120.0) as client:
        before = active_version(client, args.model)
        t = time.perf_counter()
        version, accuracy = predict(client, args.model, x[: args.n_predict], y[: args.n_predict])
        print(
            f"predict: {args.n_predict} images in {time.perf_counter() - t:.2f} s, "
            f"v{version}, accuracy {accuracy:.3f} ({args.manipulation} {args.level})"
        )
        payload: dict[str, Any] = {"model": args.model, "images": as_json_images(x)}
        if args.max_steps is not None:
            payload["finetune"] = {"max_steps": args.max_steps}
        t = time.perf_counter()
        r = client.post("/adapt", json=payload, headers=auth)
        r.raise_for_status()
        accepted = r.json()
        print(f"adapt: {args.n} images accepted in {time.perf_counter() - t:.2f} s, job {accepted['job_id']}")
        anonymous = client.get(accepted["status_url"]).status_code
        if anonymous != 401:
            print(f"GET {accepted['status_url']} without a token answered {anonymous}, not 401")
            return 1
        job = follow_job(client, accepted["status_url"], auth, args.timeout)
        took = (job["finished"] or time.time()) - job["created"]
        if job["state"] != "succeeded" or job["version"] is None:
            print(f"adapt: job {job['state']} after {took:.1f} s: {job['reasons'] or job['error']}")
            return 1
        wait_served(client, args.model, int(job["version"]), args.timeout)
        after = active_version(client, args.model)
        print(f"adapt: job succeeded in {took:.1f} s (queued to end), active version {before} -> {after}")
        metrics = {k: round(v, 3) for k, v in job["metrics"].items()}
        print(f"adapt: job metrics {metrics}")
        version, accuracy = predict(client, args.model, x[: args.n_predict], y[: args.n_predict])
        print(
            f"predict after adapt: v{version}, accuracy {accuracy:.3f} (the same images, part of the batch)"
        )
    return 0 if after == job["version"] and after != before else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--token", required=True, help="CAMA_TOKEN of the stack")
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--n", type=int, default=300, help="images posted to /adapt")
    parser.add_argument("--n-predict", type=int, default=64, help="of which the first are posted to /predict")
    parser.add_argument("--manipulation", default="vshift")
    parser.add_argument("--level", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="bound the job's fine-tuning steps")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds to wait for the job")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(run(parse_args(argv)))


if __name__ == "__main__":
    main()
