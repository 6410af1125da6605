"""The client half of ``scripts/compose_smoke.sh --scale``: two API replicas and two workers.

    python scripts/compose_scale.py --urls http://127.0.0.1:P1,http://127.0.0.1:P2 \\
        --workers CONTAINER1,CONTAINER2 --token "$CAMA_TOKEN"

One thread per replica sends ``/predict`` requests back to back for the whole run. An ``/adapt``
job goes to the first replica; once it runs, the worker container that took it (the one whose
log names the job) is killed with SIGKILL. The job's lease then lapses, a replica queues the job
again (``CAMA_JOB_LEASE_S`` + ``CAMA_REAP_INTERVAL_S``) and the other worker runs it to the end.
Exits non-zero unless: the job succeeded on the other worker, both replicas answered with the new
version within ``--swap-timeout`` seconds of the job's end, no request failed, and ``/models``
agrees on both replicas. Prints the times and counts.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from compose_smoke import as_json_images, follow_job, make_batch


@dataclass
class Traffic:
    """A thread posting ``/predict`` to one replica back to back: when, what version, how long."""

    url: str
    body: dict[str, Any]
    answers: list[tuple[float, int, float]] = field(default_factory=list)  # (time, version, seconds)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60.0) as client:
            while not self._stop.is_set():
                t0 = time.time()
                try:
                    r = client.post("/predict", json=self.body)
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    self.answers.append((time.time(), int(r.json()["version"]), time.time() - t0))

    def first_answer(self, version: int) -> float | None:
        """When this replica first answered with ``version`` (epoch seconds), if it did."""
        return next((t for t, v, _ in self.answers if v == version), None)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        versions = [v for _, v, _ in self.answers]
        seconds = np.array([s for _, _, s in self.answers]) * 1000
        return {
            "requests": len(self.answers) + len(self.failures),
            "failed": len(self.failures),
            "by_version": {v: versions.count(v) for v in sorted(set(versions))},
            "backwards": sum(1 for a, b in itertools.pairwise(versions) if b < a),
            "p50_ms": float(np.percentile(seconds, 50)) if len(seconds) else float("nan"),
            "p99_ms": float(np.percentile(seconds, 99)) if len(seconds) else float("nan"),
            "failures": self.failures[:5],
        }


def docker(*args: str) -> str:
    """A docker command's output, stdout and stderr (a container's log is both)."""
    done = subprocess.run(["docker", *args], check=True, capture_output=True, text=True)  # noqa: S603, S607
    return done.stdout + done.stderr


def worker_with(job_id: str, workers: list[str], timeout_s: float) -> str:
    """The worker container whose log shows it received the job (Celery logs the task id)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for container in workers:
            if job_id in docker("logs", container):
                return container
        time.sleep(0.5)
    raise TimeoutError(f"no worker log names job {job_id} after {timeout_s:.0f} s")


def models(client: httpx.Client, model: str) -> tuple[int | None, int | None]:
    """``GET /models/{model}`` of one replica: (the registry's active version, the one it serves)."""
    body = client.get(f"/models/{model}").json()
    return body["active_version"], body["served_version"]


def run(args: argparse.Namespace) -> int:
    urls, workers = args.urls.split(","), args.workers.split(",")
    x, _ = make_batch(args.n, args.manipulation, args.level, args.seed)
    auth = {"authorization": f"Bearer {args.token}"}
    clients = [httpx.Client(base_url=u, timeout=120.0) for u in urls]
    before = [models(c, args.model) for c in clients]
    print(f"replicas: {len(urls)} ({', '.join(urls)}); workers: {len(workers)}; /models before: {before}")
    body = {"model": args.model, "images": as_json_images(x[: args.per_request]), "seed": 0}
    traffic = [Traffic(u, body).start() for u in urls]
    payload: dict[str, Any] = {"model": args.model, "images": as_json_images(x)}
    if args.max_steps is not None:
        payload["finetune"] = {"max_steps": args.max_steps}
    t_submit = time.time()
    r = clients[0].post("/adapt", json=payload, headers=auth)
    r.raise_for_status()
    job_id = r.json()["job_id"]
    print(f"adapt: {args.n} images posted to replica 1, job {job_id}")
    while (job := clients[1].get(f"/jobs/{job_id}", headers=auth).json())["state"] == "queued":
        time.sleep(0.2)  # replica 2 reads the same job record
    taken = worker_with(job_id, workers, 60)
    time.sleep(args.kill_after)
    job = clients[1].get(f"/jobs/{job_id}", headers=auth).json()
    if job["state"] != "running":
        print(f"job {job['state']} before the kill; the test needs it running (raise --max-steps)")
        return 1
    t_kill = time.time()
    docker("kill", taken)
    others = [w for w in workers if w != taken]
    print(
        f"kill: worker {taken[:12]} took the job; SIGKILL {t_kill - t_submit:.1f} s after submission "
        f"(job running, progress {job['progress']:.2f}, attempt {job['attempts']})"
    )
    job = follow_job(clients[1], f"/jobs/{job_id}", auth, args.timeout)
    t_end = job["finished"] or time.time()
    finished_by = [w for w in others if f"[{job_id}] succeeded" in docker("logs", w)]  # Celery's line
    print(
        f"job: {job['state']} after {job['attempts']} attempts, v{job['version']}, finished by worker "
        f"{', '.join(w[:12] for w in finished_by) or 'none of the others'} {t_end - t_kill:.1f} s after the "
        f"kill ({t_end - t_submit:.1f} s after submission)"
    )
    new = job["version"]
    deadline = time.monotonic() + args.swap_timeout
    while new is not None and time.monotonic() < deadline:
        if all(t.first_answer(new) is not None for t in traffic):
            break
        time.sleep(0.2)
    time.sleep(args.after)  # traffic on the new version, both replicas
    stats = [t.stop() for t in traffic]
    after = [models(c, args.model) for c in clients]
    ok = job["state"] == "succeeded" and bool(finished_by) and job["attempts"] >= 2
    for i, (t, s) in enumerate(zip(traffic, stats, strict=True)):
        first = t.first_answer(new) if new is not None else None
        swap = f"{first - t_end:+.1f} s from the job's end" if first is not None else "never"
        print(
            f"replica {i + 1}: {s['requests']} requests, {s['failed']} failed, by version {s['by_version']}, "
            f"p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms; first answer from v{new}: {swap}"
        )
        ok &= s["failed"] == 0 and s["backwards"] == 0 and first is not None
        ok &= first is not None and first - t_end <= args.swap_timeout
        for failure in s["failures"]:
            print(f"  failed: {failure}")
    print(f"/models after (active, served) per replica: {after}")
    ok &= all(a == (new, new) for a in after)
    restarts = docker("inspect", "-f", "{{.RestartCount}} {{.State.Status}}", taken).strip()
    print(f"killed worker now: restarts, state = {restarts}")
    print("scale: " + ("passed" if ok else "FAILED"))
    for c in clients:
        c.close()
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--urls", required=True, help="the API replicas, comma-separated")
    parser.add_argument("--workers", required=True, help="the worker containers, comma-separated")
    parser.add_argument("--token", required=True, help="CAMA_TOKEN of the stack")
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--n", type=int, default=300, help="images posted to /adapt")
    parser.add_argument("--per-request", type=int, default=8, help="images per /predict of the traffic")
    parser.add_argument("--manipulation", default="vshift")
    parser.add_argument("--level", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="bound the job's fine-tuning steps")
    parser.add_argument("--kill-after", type=float, default=3.0, help="seconds of the job before the kill")
    parser.add_argument("--swap-timeout", type=float, default=30.0, help="seconds for both replicas to swap")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of traffic after both swapped")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds to wait for the job")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    raise SystemExit(run(parse_args(argv)))


if __name__ == "__main__":
    main()
