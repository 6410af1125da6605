"""The reliability suite: fuzzing, bad inputs, memory, a killed worker, hot-swaps, Redis down.

    python -m benchmarks.reliability                 # everything (about 25 minutes on 2 cores)
    python -m benchmarks.reliability --sections fuzz,bad_inputs --soak-seconds 60

Loopback only, every loop bounded in count and time. Each section starts its own service
processes (tiny models, or the committed MNIST model for the memory sections), writes
``benchmarks/results/reliability.json`` and the ``reliability.*`` keys of ``docs/results/metrics.json``:

- ``fuzz``: schemathesis (``--checks all``) against the OpenAPI schema (the native and the
  Open Inference Protocol's ``/v2`` routes) until at least ``--fuzz-requests`` requests were
  answered, then ``--fuzz-v2-requests`` mutations of valid ``/v2`` inference requests (JSON and
  binary tensor data, which a schema cannot describe); ``reliability.fuzz.requests`` and ``.5xx``
  are the server's own counts (``cama_requests_total``), ``.v2_requests`` and ``.v2_5xx`` those
  of the ``/v2`` routes.
- ``bad_inputs``: hand-made hostile requests (bombs, malformed and truncated bodies, loose types,
  made-up methods, a corrupt ACTIVE file); ``.tried`` and ``.5xx`` (a reset connection counts).
- ``worst_request``: the largest resident-memory growth one request within the limits causes
  (peak during the request minus before), on the MNIST model.
- ``soak``: ``--soak-seconds`` of mixed load on MNIST, then 30 s idle; RSS after minus before.
- ``worker_kill``: SIGKILL a Celery worker mid-job, start another; seconds from the kill to the
  job's success.
- ``swap``: 20 activations under 8 concurrent clients; failed requests.
- ``redis_down``: the Redis mode with its Redis stopped; failed ``/predict`` requests.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness.inputs import bomb_png, digit_like_images, png_base64
from harness.processes import (
    ACCEPTING_GATE,
    ROOT,
    ContinuousClient,
    ServiceProcess,
    WorkerProcess,
    free_port,
    wait_job,
)
from harness.stores import build_store, make_measurement_seed_dir, make_seed_dir
from store.artifacts import export_checkpoint, seed_paths
from store.memory import rss_bytes
from store.registry import ModelRegistry
from training.metrics import update_metrics

TOKEN = "reliability-Vq3xL9-wPz2mK7rT_hY4nB8s"  # noqa: S105 - a loopback test service
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RESULTS = ROOT / "benchmarks" / "results" / "reliability.json"
SECTIONS = ("fuzz", "bad_inputs", "worst_request", "soak", "worker_kill", "swap", "redis_down")
MB = 1 << 20


def images(n: int, seed: int = 0) -> list[str]:
    x, _ = digit_like_images(n, seed=seed)
    return [png_base64(img / 255.0) for img in x]


def server_counts(url: str, route_prefix: str = "") -> tuple[int, int]:
    """(requests answered, 5xx answers) from the server's own ``cama_requests_total``, of the
    routes whose template starts with ``route_prefix`` (templates hold braces: ``{name}``)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = fives = 0
    for m in re.finditer(r"^cama_requests_total\{(.*)\} ([0-9.e+]+)$", text, re.M):
        if f'route="{route_prefix}' not in m.group(1):
            continue
        n = int(float(m.group(2)))
        total += n
        if re.search(r'status="5', m.group(1)):
            fives += n
    return total, fives


class RssSampler:
    """The peak resident memory of a process while it runs (sampled every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tiny_stores(work: Path) -> tuple[Path, Path]:
    """(seed dir, store) with the tiny image model ``tiny`` and the tiny measurement model ``meas``."""
    seed = make_seed_dir(work / "seed", "tiny")
    make_measurement_seed_dir(seed, "meas")
    store = work / "store"
    build_store(store, seed, ["tiny", "meas"])
    return seed, store


def v2_requests(seed: int = 0) -> list[tuple[str, dict[str, Any], bytes]]:
    """Valid Open Inference Protocol requests as (path, JSON header, binary tensor data): FP32
    and BYTES (PNG) images in JSON and binary form, and a measurement model's three tensors."""
    x, _ = digit_like_images(2, seed=seed)
    pixels = (x[:, None] / 255.0).astype("<f4")
    files = [base64.b64decode(png) for png in images(2, seed)]
    rng = np.random.default_rng(seed)
    meas = {"x": 10, "a": 5, "c": 5}
    cols = {name: rng.standard_normal((2, d)).astype("<f4") for name, d in meas.items()}
    params = {"k": 3, "seed": seed}

    def tensor(name: str, shape: list[int], datatype: str, size: int | None = None, data: Any = None) -> Any:
        out: dict[str, Any] = {"name": name, "shape": shape, "datatype": datatype}
        if size is None:
            out["data"] = data
        else:
            out["parameters"] = {"binary_data_size": size}
        return out

    framed = b"".join(struct.pack("<I", len(f)) + f for f in files)
    pixel_json = tensor("x", [2, 1, 28, 28], "FP32", data=pixels.ravel().tolist())
    pixel_binary = tensor("x", [2, 1, 28, 28], "FP32", pixels.nbytes)
    png_json = tensor("x", [2], "BYTES", data=images(2, seed))
    meas_binary = [tensor(n, [2, d], "FP32", cols[n].nbytes) for n, d in meas.items()]
    as_binary = [{"name": "probabilities", "parameters": {"binary_data": True}}]
    binary_out = {**params, "binary_data_output": True}
    return [
        ("/v2/models/tiny/infer", {"inputs": [pixel_json], "parameters": params}, b""),
        ("/v2/models/tiny/infer", {"inputs": [pixel_binary], "parameters": binary_out}, pixels.tobytes()),
        ("/v2/models/tiny/versions/1/infer", {"inputs": [tensor("x", [2], "BYTES", len(framed))],
                                              "outputs": [{"name": "label"}]}, framed),
        ("/v2/models/tiny/infer", {"inputs": [png_json], "outputs": as_binary}, b""),
        ("/v2/models/meas/infer", {"inputs": meas_binary, "parameters": params},
         b"".join(cols[n].tobytes() for n in meas)),
    ]  # fmt: skip


ODD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    2**64,
    1e308,
    0.5,
    "",
    "x" * 300,
    "FP32",
    "BYTES",
    [],
    [[]],
    {},
    [-1],
]


def mutate_json(value: Any, rng: random.Random) -> Any:
    """``value`` with one node replaced by an odd value, deleted, or given an unknown key."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        roll = rng.random()
        if roll < 0.15:
            return {k: v for k, v in value.items() if k != key}
        if roll < 0.25:
            return {**value, "unknown": rng.choice(ODD_VALUES)}
        return {**value, key: mutate_json(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.7:
        i = rng.randrange(len(value))
        return [*value[:i], mutate_json(value[i], rng), *value[i + 1 :]]
    return rng.choice(ODD_VALUES)


def v2_mutations(url: str, n: int, seed: int = 0) -> dict[str, Any]:
    """``n`` mutations of :func:`v2_requests`: a JSON node changed, body bytes flipped, cut or added,
    the ``Inference-Header-Content-Length``, content type or path changed. Returns how many were
    sent and which came back 5xx (or reset the connection)."""
    rng = random.Random(seed)
    bases = v2_requests(seed)
    paths = ["/v2/models/tiny/infer", "/v2/models/meas/infer", "/v2/models/tiny/versions/9/infer",
             "/v2/models/nope/infer", "/v2/models/tiny/versions/1/infer"]  # fmt: skip
    sent, bad = 0, []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(n):
            path, header, data = rng.choice(bases)
            for _ in range(rng.randint(1, 3)):
                header = mutate_json(header, rng) if rng.random() < 0.6 else header
            text = json.dumps(header).encode()
            body = text + data
            headers = (
                {"content-type": "application/octet-stream"} if data else {"content-type": "application/json"}
            )
            if data:
                headers["inference-header-content-length"] = str(len(text))
            roll = rng.random()
            if roll < 0.15 and body:
                cut = rng.randrange(len(body))
                body = (
                    body[:cut]
                    if rng.random() < 0.5
                    else body[:cut] + rng.randbytes(rng.randint(1, 64)) + body[cut:]
                )
            elif roll < 0.3 and body:
                flipped = bytearray(body)
                for _ in range(rng.randint(1, 8)):
                    flipped[rng.randrange(len(flipped))] = rng.randrange(256)
                body = bytes(flipped)
            elif roll < 0.4:
                headers["inference-header-content-length"] = rng.choice(
                    ["-1", "0", "x", str(len(body) + 1), "1e3"]
                )
            elif roll < 0.45:
                headers["content-type"] = rng.choice(["text/plain", "multipart/form-data", ""])
            elif roll < 0.5:
                path = rng.choice(paths)
            sent += 1
            try:
                status = client.post(path, content=body, headers=headers).status_code
            except httpx.HTTPError as exc:
                status = 599
                bad.append(f"{i}: {type(exc).__name__}")
            if status >= 500:
                bad.append(f"{i}: {status} {path} {body[:200]!r}")
    return {"sent": sent, "5xx": len(bad), "details": bad[:10]}


# --- sections ------------------------------------------------------------------------------------
def fuzz(work: Path, target: int, budget_s: float, v2_target: int = 1000) -> dict[str, Any]:
    """schemathesis with every check, repeated with new seeds until ``target`` requests; then
    ``v2_target`` mutated Open Inference Protocol requests (:func:`v2_mutations`)."""
    seed_dir, store = tiny_stores(work / "fuzz")
    api = ServiceProcess(
        work / "fuzz.log", model_store=str(store), seed_dir=str(seed_dir), models=["tiny", "meas"],
        token=TOKEN, max_inputs=16, max_k=20, max_adapt_inputs=64, min_adapt_inputs=10,
        finetune={"epochs": 1, "max_steps": 2},
    )  # fmt: skip
    failures: list[str] = []
    runs = timed_out = 0
    try:
        api.wait_ready()
        # the readiness polls before this point (503 while starting) are not the fuzzer's
        base_requests, base_fives = server_counts(api.url)
        deadline = time.monotonic() + budget_s
        while server_counts(api.url)[0] - base_requests < target and time.monotonic() < deadline:
            try:
                proc = subprocess.run(  # noqa: S603 - fixed command
                    [str(Path(sys.executable).parent / "schemathesis"), "run", f"{api.url}/openapi.json",
                     "--checks", "all", "--max-examples", "300", "--seed", str(runs), "--workers", "2",
                     "-H", f"Authorization: Bearer {TOKEN}", "--request-timeout", "30",
                     "--suppress-health-check", "all"],
                    capture_output=True, text=True, timeout=max(60.0, deadline - time.monotonic() + 60),
                    check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired:  # the budget ran out mid-run: what it sent is counted
                timed_out += 1
                break
            runs += 1
            if proc.returncode != 0:
                failures.append(proc.stdout[-3000:])
        schema_v2 = server_counts(api.url, "/v2")
        mutations = v2_mutations(api.url, v2_target)
        requests, fives = server_counts(api.url)
        v2, v2_fives = server_counts(api.url, "/v2")
    finally:
        api.stop()
    return {
        "requests": requests - base_requests,
        "5xx": fives - base_fives,
        "v2_requests": v2,
        "v2_5xx": v2_fives,
        "v2_schema_requests": schema_v2[0],
        "v2_mutations": mutations,
        "runs": runs,
        "timed_out_runs": timed_out,
        "failed_runs": len(failures),
        "failures": failures[:2],
    }


def bad_inputs(work: Path) -> dict[str, Any]:
    """Hand-made hostile requests; every answer must be a 4xx (503 for a bad store), none a 5xx."""
    seed_dir, store = tiny_stores(work / "bad")
    api = ServiceProcess(
        work / "bad.log", model_store=str(store), seed_dir=str(seed_dir), models=["tiny", "meas"],
        token=TOKEN, max_inputs=16, max_k=20,
    )  # fmt: skip
    good = images(1)[0]
    bomb = bomb_png()
    b64bomb = base64.b64encode(bomb).decode()
    json_cases: list[object] = [
        {},
        [],
        "x",
        1,
        None,
        {"model": 1, "images": [good]},
        {"model": "tiny", "images": good},
        {"model": "tiny", "images": [good], "k": True},
        {"model": "tiny", "images": [good], "k": "5"},
        {"model": "tiny", "images": [good], "k": 1.5},
        {"model": "tiny", "images": [good], "k": -1},
        {"model": "tiny", "images": [good], "k": 10**30},
        {"model": "tiny", "images": [good], "seed": 2**70},
        {"model": "tiny", "images": [[["0.5"] * 28] * 28]},
        {"model": "tiny", "images": [[[True] * 28] * 28]},
        {"model": "tiny", "images": [[[0.5] * 27] * 28]},
        {"model": "tiny", "images": [[[2.0] * 28] * 28]},
        {"model": "tiny", "images": [b64bomb]},
        {"model": "tiny", "images": ["data:image/png;base64,@@"]},
        {"model": "tiny", "images": [good] * 17},
        {"model": "tiny", "images": [good] * 16, "k": 20},
        {"model": "tiny", "records": [{"a": [1], "c": [1], "x": [1]}]},
        {"model": "meas", "records": [{"a": ["1"] * 5, "c": [0] * 5, "x": [0] * 10}]},
        {"model": "meas", "records": [{"a": [0] * 4, "c": [0] * 5, "x": [0] * 10}]},
        {"model": "meas", "rows": [{"a1": 1.0}]},
        {"model": "tiny", "rows": [{"x": 1}]},
        {"model": "../etc", "images": [good]},
        {"model": "x" * 65, "images": [good]},
        {"model": "tiny", "images": [good], "extra": 1},
        {"model": "tiny", "images": [], "records": []},
    ]
    raw_cases: list[tuple[str, str, bytes, dict[str, str]]] = [
        ("POST", "/predict", b'{"model": "tiny", "images": [', {"content-type": "application/json"}),
        ("POST", "/predict", b"\xff\xfe\x00", {"content-type": "application/json"}),
        ("POST", "/predict", b'{"model": "tiny", "images": [[[NaN]]]}', {"content-type": "application/json"}),
        ("POST", "/predict", b"[" * 100_000, {"content-type": "application/json"}),
        ("POST", "/predict", b"model=tiny", {"content-type": "text/plain"}),
        ("POST", "/predict", b"--x\r\nbroken", {"content-type": "multipart/form-data; boundary=x"}),
        ("POST", "/predict", b"--x\r\n", {"content-type": "multipart/form-data"}),
        ("POST", "/predict", b"a" * (9 << 20), {"content-type": "application/json"}),
        ("POST", "/models/tiny/activate", b'{"version": true}', {**AUTH, "content-type": "application/json"}),
        ("POST", "/models/tiny/activate", b'{"version": 99}', {**AUTH, "content-type": "application/json"}),
        ("POST", "/models/tiny/activate", b'{"version": 1}', {"authorization": "Bearer " + " " * 16}),
        ("GET", "/jobs/" + "0" * 32, b"", {}),
        ("GET", "/jobs/" + "0" * 32, b"", AUTH),
        ("GET", "/jobs/nope", b"", AUTH),
        ("POST", "/jobs/" + "0" * 32 + "/cancel", b"", AUTH),
        ("BREW", "/predict", b"", {}),
        ("DELETE", "/models", b"", {}),
        ("GET", "/models/nope", b"", {}),
        ("GET", "/" + "a" * 5000, b"", {}),
    ]
    tried = fives = 0
    details: list[str] = []
    try:
        api.wait_ready()
        with httpx.Client(base_url=api.url, timeout=60) as client:

            def record(label: str, send: Callable[[], httpx.Response]) -> None:
                nonlocal tried, fives
                tried += 1
                try:
                    status = send().status_code
                except httpx.LocalProtocolError:  # the client refused to send it: not an answer
                    tried -= 1
                    return
                except httpx.HTTPError as exc:
                    status = 599
                    details.append(f"{label}: {type(exc).__name__}")
                if status >= 500 and status != 503:
                    fives += 1
                    details.append(f"{label}: {status}")

            for i, case in enumerate(json_cases):
                record(f"predict json {i}", partial(client.post, "/predict", json=case))
                record(f"adapt json {i}", partial(client.post, "/adapt", json=case, headers=AUTH))
            for method, path, body, headers in raw_cases:
                record(
                    f"{method} {path[:30]}",
                    partial(client.request, method, path, content=body, headers=headers),
                )
            files = [("images", ("b.png", bomb, "image/png"))]
            record("multipart bomb", lambda: client.post("/predict", data={"model": "tiny"}, files=files))
            record(
                "multipart adapt k",
                lambda: client.post(
                    "/adapt", data={"model": "tiny", "k": "1"}, files=files * 10, headers=AUTH
                ),
            )
            active = store / "tiny" / "ACTIVE"
            saved = active.read_text()
            for content in ("abc", "", "-1", "99", "\x00\xff"):
                active.write_text(content)
                for path in ("/models", "/models/tiny", "/readyz"):
                    record(f"ACTIVE={content!r} {path}", partial(client.get, path))
                record(
                    f"ACTIVE={content!r} predict",
                    lambda: client.post("/predict", json={"model": "tiny", "images": [good]}),
                )
            active.write_text(saved)
    finally:
        api.stop()
    return {"tried": tried, "5xx": fives, "details": details[:20]}


def mnist_service(work: Path, name: str, **settings: object) -> ServiceProcess:
    """The committed MNIST model, served from a fresh store (seeded at start-up)."""
    checkpoint, data = seed_paths(ROOT / "models", "mnist")
    if not checkpoint.exists() or not data.exists():
        raise SystemExit(f"the memory sections need {checkpoint} and {data}")
    return ServiceProcess(
        work / f"{name}.log", model_store=str(work / f"{name}-store"), seed_dir=str(ROOT / "models"),
        models=["mnist"], token=TOKEN, **settings,
    )  # fmt: skip


def worst_request(work: Path) -> dict[str, Any]:
    """The largest RSS growth one request within the documented limits causes (peak minus before)."""
    api = mnist_service(work, "worst")
    out: dict[str, Any] = {"requests": {}}
    try:
        api.wait_ready(timeout=600)
        with httpx.Client(base_url=api.url, timeout=600) as client:
            client.post("/predict", json={"model": "mnist", "images": images(1), "k": 1})
            settings = {"max_inputs": 256, "max_k": 100, "max_work": 64000}
            shapes = [(256, 25), (64, 100), (256, 1), (128, 50)]
            for n, k in shapes:
                if n * k * 10 > settings["max_work"] or n > settings["max_inputs"]:
                    continue
                payload = {"model": "mnist", "images": [[[0.0] * 28] * 28] * n, "k": k, "seed": 0}
                before = rss_bytes(api.proc.pid)
                with RssSampler(api.proc.pid) as sampler:
                    r = client.post("/predict", json=payload)
                time.sleep(2)
                out["requests"][f"{n}x{k}"] = {
                    "status": r.status_code,
                    "before_mb": before / MB,
                    "peak_growth_mb": (sampler.peak - before) / MB,
                    "after_growth_mb": (rss_bytes(api.proc.pid) - before) / MB,
                }
            refused = client.post(
                "/predict", json={"model": "mnist", "images": [[[0.0] * 28] * 28] * 256, "k": 100}
            )
            out["over_limit_status"] = refused.status_code
    finally:
        api.stop()
    out["rss_growth_mb"] = max(v["peak_growth_mb"] for v in out["requests"].values())
    return out


def soak(work: Path, seconds: float, idle_s: float = 30.0) -> dict[str, Any]:
    """Mixed load (1/16/64 images, k up to the cost model, bad input) for ``seconds``; then idle."""
    api = mnist_service(work, "soak")
    counts = {"ok": 0, "4xx": 0, "failed": 0}
    lock = threading.Lock()
    try:
        api.wait_ready(timeout=600)
        pool = images(64, seed=5)
        with httpx.Client(base_url=api.url, timeout=600) as client:
            client.post("/predict", json={"model": "mnist", "images": pool[:1]})
        time.sleep(2)
        before = rss_bytes(api.proc.pid)
        stop = time.monotonic() + seconds

        def load(worker: int) -> None:
            rng = random.Random(worker)
            with httpx.Client(base_url=api.url, timeout=600) as client:
                while time.monotonic() < stop:
                    n = rng.choice([1, 1, 1, 16, 64])
                    k = rng.choice([1, 10, 10, 25]) if n < 64 else 10
                    body: dict[str, Any] = {"model": "mnist", "images": pool[:n], "k": k}
                    if rng.random() < 0.1:
                        body["images"] = ["not-an-image"]
                    try:
                        status = client.post("/predict", json=body).status_code
                    except httpx.HTTPError:
                        status = 599
                    with lock:
                        key = "ok" if status == 200 else "4xx" if status < 500 else "failed"
                        counts[key] += 1

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        peak = before
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_bytes(api.proc.pid))
            time.sleep(0.5)
        time.sleep(idle_s)
        after = rss_bytes(api.proc.pid)
    finally:
        api.stop()
    return {
        "seconds": seconds, "idle_s": idle_s, "before_mb": before / MB, "peak_mb": peak / MB,
        "after_mb": after / MB, "rss_growth_mb": (after - before) / MB, **counts,
    }  # fmt: skip


def redis_server(work: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    """A private Redis on a free loopback port (never the shared one)."""
    port = free_port()
    proc = subprocess.Popen(  # noqa: S603 - fixed command from PATH
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            import redis

            redis.Redis.from_url(url).ping()
            return proc, url
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{name}: redis-server did not start")


def worker_kill(work: Path) -> dict[str, Any]:
    """Kill a worker (its whole process group) mid-job; time until a new worker finishes the job."""
    seed_dir, store = tiny_stores(work / "kill")
    rproc, url = redis_server(work, "worker_kill")
    common: dict[str, object] = {
        "model_store": str(store), "seed_dir": str(seed_dir), "models": ["tiny"], "token": TOKEN,
        "redis_url": url, **ACCEPTING_GATE,
    }  # fmt: skip
    api = ServiceProcess(work / "kill-api.log", **common)
    first = WorkerProcess(work / "kill-worker1.log", **common)
    second: WorkerProcess | None = None
    try:
        api.wait_ready()
        first.wait_ready()
        with httpx.Client(base_url=api.url, timeout=60, headers=AUTH) as client:
            body = {
                "model": "tiny",
                "images": images(40, seed=9),
                "finetune": {"epochs": 40, "batch_size": 4},
            }
            job_id = client.post("/adapt", json=body).json()["job_id"]
            deadline = time.monotonic() + 120
            while client.get(f"/jobs/{job_id}").json()["state"] != "running" and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2)
            killed = time.monotonic()
            os.killpg(first.proc.pid, signal.SIGKILL)
            first.proc.wait(10)
            second = WorkerProcess(work / "kill-worker2.log", **{**common, "finetune": {"epochs": 1}})
            second.wait_ready()
            job = wait_job(client, job_id, timeout=300)
            recovered = time.monotonic() - killed
        registry = ModelRegistry(store)
        published = [v for v in registry.versions("tiny") if registry.manifest("tiny", v).job_id == job_id]
    finally:
        api.stop()
        first.stop()
        if second is not None:
            second.stop()
        rproc.terminate()
        rproc.wait(10)
    return {
        "recovery_seconds": recovered, "state": job["state"], "attempts": job.get("attempts"),
        "published_versions": len(published),
    }  # fmt: skip


def swap(work: Path, swaps: int = 20, clients: int = 8) -> dict[str, Any]:
    """``swaps`` activations (v1 <-> v2) while ``clients`` threads predict back to back."""
    seed_dir, store = tiny_stores(work / "swap")
    registry = ModelRegistry(store)
    checkpoint, data = seed_paths(seed_dir, "tiny")
    export_checkpoint(registry, "tiny", checkpoint, data, activate=False)
    api = ServiceProcess(
        work / "swap.log", model_store=str(store), seed_dir=str(seed_dir), models=["tiny"], token=TOKEN
    )
    try:
        api.wait_ready()
        payload: dict[str, object] = {"model": "tiny", "images": images(1)}
        runners = [ContinuousClient(api.url, payload).start() for _ in range(clients)]
        activation_failures = 0
        with httpx.Client(base_url=api.url, timeout=60, headers=AUTH) as client:
            for i in range(swaps):
                time.sleep(0.3)
                r = client.post("/models/tiny/activate", json={"version": 2 if i % 2 == 0 else 1})
                activation_failures += r.status_code != 200
        time.sleep(1)
        stats = [runner.stop() for runner in runners]
    finally:
        api.stop()
    return {
        "swaps": swaps, "clients": clients, "requests": sum(s["requests"] for s in stats),
        "failed_requests": sum(s["failed_requests"] for s in stats),
        "failed_activations": activation_failures,
    }  # fmt: skip


def redis_down(work: Path, n: int = 100) -> dict[str, Any]:
    """Stop the Redis of the Redis mode: ``/predict`` goes on, ``/adapt`` answers 503."""
    seed_dir, store = tiny_stores(work / "redis")
    rproc, url = redis_server(work, "redis_down")
    api = ServiceProcess(
        work / "redis-api.log", model_store=str(store), seed_dir=str(seed_dir), models=["tiny"], token=TOKEN,
        redis_url=url,
    )  # fmt: skip
    failed = 0
    try:
        api.wait_ready()
        rproc.terminate()
        rproc.wait(10)
        with httpx.Client(base_url=api.url, timeout=60) as client:
            for _ in range(n):
                try:
                    failed += (
                        client.post("/predict", json={"model": "tiny", "images": images(1)}).status_code
                        != 200
                    )
                except httpx.HTTPError:
                    failed += 1
            adapt = client.post("/adapt", json={"model": "tiny", "images": images(12)}, headers=AUTH)
    finally:
        api.stop()
        if rproc.poll() is None:
            rproc.kill()
    return {"predict_requests": n, "predict_failed": failed, "adapt_status": adapt.status_code}


# --- the command -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--fuzz-requests", type=int, default=10000)
    parser.add_argument("--fuzz-budget-s", type=float, default=1100.0)
    parser.add_argument("--fuzz-v2-requests", type=int, default=1000, help="mutated /v2 inference requests")
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--no-metrics", action="store_true", help="do not write docs/results/metrics.json")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    metric_keys = {
        "fuzz": ("requests", "5xx", "v2_requests", "v2_5xx"), "bad_inputs": ("tried", "5xx"),
        "worst_request": ("rss_growth_mb",),
        "soak": ("rss_growth_mb",), "worker_kill": ("recovery_seconds",), "swap": ("failed_requests",),
        "redis_down": ("predict_failed",),
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="cama-reliability-"))
    try:
        for section in sections:
            t0 = time.monotonic()
            print(f"== {section}", flush=True)
            if section == "fuzz":
                out = fuzz(work, args.fuzz_requests, args.fuzz_budget_s, args.fuzz_v2_requests)
            elif section == "bad_inputs":
                out = bad_inputs(work)
            elif section == "worst_request":
                out = worst_request(work)
            elif section == "soak":
                out = soak(work, args.soak_seconds)
            elif section == "worker_kill":
                out = worker_kill(work)
            elif section == "swap":
                out = swap(work)
            else:
                out = redis_down(work)
            out["wall_seconds"] = round(time.monotonic() - t0, 1)
            results[section] = out
            print(json.dumps(out, indent=2, default=str), flush=True)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
            if not args.no_metrics:
                update_metrics({f"reliability.{section}.{k}": float(out[k]) for k in metric_keys[section]})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
