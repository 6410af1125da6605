"""A stream posted to the running service in auto-adapt mode, at a fixed rate, scored by its answers.

Part of ``python -m benchmarks.streams`` (method ``cama_service``). One real service
(``python -m app``, embedded worker, ``CAMA_AUTO_ADAPT=mnist``) answers the stream's batches as
``POST /predict`` requests, one request per batch, sent open-loop at ``rate`` images per second (a
request leaves at its time whether or not the ones before it were answered). Each image is scored
by the label the service answered, with the version that answered it; nothing else is sent: no
``/adapt``, no labels. The service raises drift, keeps the unusual inputs and starts jobs as it
does for any user; the gate decides, an accepted version is hot-swapped in.
``GET /models/mnist/drift`` is polled every second for the jobs it starts. Besides
``CAMA_AUTO_ADAPT`` the only setting changed is ``CAMA_AUTO_ADAPT_COOLDOWN_S`` (below).

One process serves every stream. Before each stream it is brought back to its start: the jobs
still running are cancelled, v1 is activated again (a new drift test starts with it, the buffer is
emptied) and ``WARMUP`` clean images (in no stream) warm the drift test up; if it is still in
``drift`` after them, the process is replaced by a new one on a fresh copy of the seeded store.
``CAMA_AUTO_ADAPT_COOLDOWN_S`` is 0 so that a job cancelled at the end of one stream does not
hold the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness.processes import ServiceProcess
from harness.stores import clone_store
from training.streams import Stream

TOKEN = "stream-bench-" + "c" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WARMUP = 100
WARMUP_REQUEST = 10
POLL_S = 1.0
TERMINAL = ("succeeded", "rejected", "failed", "cancelled")


@dataclass
class ServiceRun:
    """What the service answered on one stream."""

    protocol: str
    rate: float  # images per second, as scheduled
    labels: np.ndarray  # (N,) the label each image was answered with
    versions: np.ndarray  # (N,) the version that answered it
    starts: np.ndarray  # (R,) the first image of each request
    sent: np.ndarray  # (R,) seconds from the stream's start when each request left
    answered: np.ndarray  # (R,) seconds from the stream's start when its answer came
    jobs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    fresh_process: bool = True

    def missed(self, job: dict[str, Any], t0: float) -> int:
        """Requests that left after the job took its inputs and were answered before its version
        answered any (to the end of the stream when it never did, e.g. a job still running when the
        stream ended); -1 for a job that ended without publishing."""
        if job.get("version") is None and job["state"] in TERMINAL:
            return -1
        created = float(job["created"]) - t0
        served = self.versions[self.starts] == (job.get("version") or -1)
        first = float(self.answered[served].min()) if served.any() else np.inf
        return int(((self.sent >= created) & (self.answered < first)).sum())


def _payload(x: np.ndarray, seed: int) -> dict[str, Any]:
    images = np.round(x.reshape(len(x), 28, 28), 4).tolist()
    return {"model": "mnist", "images": images, "seed": seed}


class StreamService:
    """One service process for every stream, brought back to its start between streams."""

    def __init__(self, template: Path, work: Path, log_dir: Path, threads: int) -> None:
        self.template = template
        self.work = work
        self.log_dir = log_dir
        self.threads = threads
        self.svc: ServiceProcess | None = None
        self.starts = 0
        self.open_jobs: list[str] = []

    def _start(self) -> ServiceProcess:
        self.stop()
        self.starts += 1
        store = self.work / f"store{self.starts}"
        shutil.rmtree(store, ignore_errors=True)
        clone_store(self.template, store)
        svc = ServiceProcess(
            self.log_dir / f"streams_api_{self.starts}.log",
            model_store=str(store),
            models=["mnist"],
            token=TOKEN,
            auto_adapt="mnist",
            auto_adapt_cooldown_s=0,  # a job cancelled at the end of one stream must not hold the next
            torch_threads=self.threads,
        )
        svc.wait_ready(timeout=1800)
        self.svc = svc
        return svc

    def stop(self) -> None:
        if self.svc is not None:
            self.svc.stop()
            self.svc = None

    def run(self, stream: Stream, x: np.ndarray, warmup: np.ndarray, rate: float) -> ServiceRun:
        """Post ``stream`` (images ``x``) after the reset and the warm-up, at ``rate`` images per
        second."""
        fresh = self.svc is None
        if self.svc is None:
            self._start()
        assert self.svc is not None
        state = asyncio.run(_reset(self.svc.url, self.open_jobs, warmup))
        if state == "drift":  # the clean warm-up did not clear it: start afresh
            self._start()
            fresh = True
            asyncio.run(_reset(self.svc.url, [], warmup))
        run = asyncio.run(_post_stream(self.svc.url, stream, x, rate))
        run.fresh_process = fresh
        self.open_jobs = [job["id"] for job in run.jobs if job["state"] not in TERMINAL]
        return run


async def _reset(url: str, open_jobs: list[str], warmup: np.ndarray) -> str:
    """Cancel the jobs still open, serve v1 again, warm the drift test up with clean images; the
    drift state after them."""
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=AUTH) as client:
        await _cancel(client, open_jobs)
        if (await client.get("/models/mnist/drift")).json()["version"] != 1:
            r = await client.post("/models/mnist/activate", json={"version": 1})
            r.raise_for_status()
            while (await client.get("/models/mnist/drift")).json()["version"] != 1:
                await asyncio.sleep(0.5)
        state = await _warm_up(client, warmup)
        await asyncio.sleep(2 * POLL_S)  # a job on inputs kept before the warm-up starts by now
        await _cancel(client, [])
        return state


async def _cancel(client: httpx.AsyncClient, open_jobs: list[str]) -> None:
    """Cancel ``open_jobs`` and the drift-started job running now (one may start after a stream, on
    its inputs); wait until each has ended. A job ended this way empties the buffer."""
    current = (await client.get("/models/mnist/drift")).json().get("auto_job")
    for job_id in {*open_jobs, *([current] if current else [])}:
        await client.post(f"/jobs/{job_id}/cancel")
        while (await client.get(f"/jobs/{job_id}")).json()["state"] not in TERMINAL:
            await asyncio.sleep(1.0)


async def _warm_up(client: httpx.AsyncClient, warmup: np.ndarray) -> str:
    """Post the clean warm-up images, one request at a time; the drift state after them."""
    for i in range(0, len(warmup), WARMUP_REQUEST):
        r = await client.post("/predict", json=_payload(warmup[i : i + WARMUP_REQUEST], 10**6 + i))
        r.raise_for_status()
    drift = (await client.get("/models/mnist/drift")).json()
    return str(drift["state"])


async def _post_stream(url: str, stream: Stream, x: np.ndarray, rate: float) -> ServiceRun:
    n = len(stream)
    labels = np.full(n, -1, np.int64)
    versions = np.zeros(n, np.int64)
    requests = list(stream.batches())
    sent = np.zeros(len(requests))
    answered = np.zeros(len(requests))
    job_ids: list[str] = []
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=AUTH, limits=limits) as client:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        wall0 = time.time()

        async def post(i: int, start: int, stop: int) -> None:
            sent[i] = loop.time() - t0
            r = await client.post("/predict", json=_payload(x[start:stop], start))
            if r.status_code != 200:
                raise RuntimeError(f"/predict answered {r.status_code}: {r.text[:500]}")
            body = r.json()
            answered[i] = loop.time() - t0
            labels[start:stop] = [p["label"] for p in body["predictions"]]
            versions[start:stop] = body["version"]

        async def poll() -> None:
            while not done.is_set():
                drift = (await client.get("/models/mnist/drift")).json()
                job = drift.get("auto_job")
                if job is not None and job not in job_ids:
                    job_ids.append(job)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), POLL_S)

        poller = asyncio.create_task(poll())
        tasks = []
        for i, (start, stop) in enumerate(requests):
            delay = t0 + start / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(i, start, stop)))
        await asyncio.gather(*tasks)
        done.set()
        await poller
        seconds = loop.time() - t0
        jobs = [(await client.get(f"/jobs/{job_id}")).json() for job_id in job_ids]
    starts = np.array([start for start, _ in requests], np.int64)
    run = ServiceRun(stream.protocol, rate, labels, versions, starts, sent, answered, seconds=seconds)
    run.jobs = [{**job, "stream_t0": wall0} for job in jobs]
    return run


def describe_jobs(run: ServiceRun) -> list[dict[str, Any]]:
    """Per job: state, inputs, when it started and ended (seconds into the stream), requests missed."""
    out = []
    for job in run.jobs:
        t0 = float(job["stream_t0"])
        finished = job.get("finished")
        out.append(
            {
                "id": job["id"],
                "state": job["state"],
                "inputs": job.get("n_inputs"),
                "base_version": job.get("base_version"),
                "version": job.get("version"),
                "created_s": float(job["created"]) - t0,
                "finished_s": None if finished is None else float(finished) - t0,
                "requests_missed": run.missed(job, t0),
                "gate_reasons": (job.get("gate") or {}).get("reasons"),
            }
        )
    return out
