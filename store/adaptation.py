"""The adaptation job: the one function that both the Celery task and the embedded worker run.

1. load the active version (checkpoint + replay/canary data) and the job's unlabelled batch;
2. hold out part of the batch; evaluate the gate's evidence before (canary accuracy, ELBO(x));
3. fine-tune NN_M^p and NN_M^q on the rest with the clean replay term (eq. 8);
4. evaluate again; the promotion gate decides; a refusal ends the job ``rejected``
   (steps 2-4 are ``cama.adapt.adapt_and_judge``, which the evaluations run too);
5. export the new version, publish it and flip ACTIVE (compare-and-swap under the model lock),
   then tell the API processes.

Idempotent by job id: a finished job is left alone, and a version already published by this job
(a crash before the record was updated) is adopted rather than made twice; the check is repeated
under the model lock right before publishing, so a job is published at most once even when a
worker that was thought dead comes back. A worker holds the job's lease while it runs (a
heartbeat thread renews it); a redelivered message for a job whose lease another live worker
holds does nothing. A cancelled job, or one that fails or is rejected, never changes what is served.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from cama.adapt import (
    AdaptationCancelledError,
    FinetuneConfig,
    GateConfig,
    Labelled,
    adapt_batch,
)
from cama.checkpoint import load_checkpoint
from cama.runtime import resolve_device
from store.artifacts import build_artifacts
from store.data import Inputs, ServingData, check_shapes
from store.jobs import TERMINAL_STATES, JobRecord, JobStore, batch_path
from store.memory import release_memory
from store.registry import ActiveChangedError, ModelRegistry

log = logging.getLogger(__name__)

# progress milestones of one job (0..1): adapt-and-judge up to P_GATE_AFTER, then the export
P_GATE_AFTER, P_EXPORTED = 0.9, 0.97


class JobCancelledError(Exception):
    """The job was cancelled between two steps."""


class JobTimeoutError(Exception):
    """The job ran past ``job_timeout_s``."""


class LeaseLostError(Exception):
    """This worker no longer holds the job's lease (another worker took the job over)."""


class JobSettings(Protocol):
    """The settings a job reads (``app.core.config.Settings`` has them all)."""

    @property
    def device(self) -> str: ...
    @property
    def finetune(self) -> dict[str, Any]: ...
    @property
    def job_timeout_s(self) -> int: ...
    @property
    def job_lease_s(self) -> float: ...
    @property
    def holdout_fraction(self) -> float: ...
    @property
    def gate(self) -> GateConfig: ...
    @property
    def screen_margin(self) -> float | None: ...


@dataclass
class JobContext:
    """What a job needs from its process: the registry, the job store, settings and a notifier."""

    registry: ModelRegistry
    jobs: JobStore
    settings: JobSettings
    notify: Callable[[str, int], None] = lambda model, version: None


def finetune_config(
    settings: JobSettings, job: JobRecord, model_recipe: dict[str, Any] | None = None
) -> FinetuneConfig:
    """The job's recipe; later sources win: the core's defaults, the recipe the model was shipped
    with (``adapt_recipe`` in its checkpoint provenance), the settings the operator set
    (``CAMA_FINETUNE__*``), the job's overrides."""
    base = FinetuneConfig.from_dict(model_recipe or {})
    return FinetuneConfig.from_dict({**settings.finetune, **job.finetune}, base=base)


class Lease:
    """The job's lease, renewed by a heartbeat thread every third of its time to live."""

    def __init__(self, jobs: JobStore, job_id: str, ttl_s: float) -> None:
        self.jobs, self.job_id, self.ttl_s = jobs, job_id, ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lost = False
        self._stop = threading.Event()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.jobs.renew(self.job_id, self.owner, self.ttl_s):
                    log.error("job %s: lease lost (another worker took it over)", self.job_id)
                    self.lost = True
                    return
            except Exception as exc:  # the store is briefly unreachable: try again at the next beat
                log.warning("job %s: could not renew the lease: %s", self.job_id, exc)

    @contextmanager
    def held(self) -> Iterator[None]:
        thread = threading.Thread(target=self._beat, name=f"lease-{self.job_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(timeout=5)
            try:
                self.jobs.release(self.job_id, self.owner)
            except Exception as exc:
                log.warning("job %s: could not release the lease: %s", self.job_id, exc)


def run_job(job_id: str, ctx: JobContext) -> JobRecord | None:
    """Run one adaptation job to a terminal state (see the module docstring)."""
    job = ctx.jobs.get(job_id)
    if job is None:
        log.error("job %s: no such job record (expired?)", job_id)
        return None
    if job.state in TERMINAL_STATES:
        log.info("job %s already %s: nothing to do", job.id, job.state)
        return job
    lease = Lease(ctx.jobs, job_id, ctx.settings.job_lease_s)
    if not ctx.jobs.claim(job_id, lease.owner, lease.ttl_s):
        log.info("job %s is held by a live worker: this delivery does nothing", job_id)
        return ctx.jobs.get(job_id)
    try:
        with lease.held():
            return _run_claimed(job, ctx, lease)
    finally:
        release_memory()


def _run_claimed(job: JobRecord, ctx: JobContext, lease: Lease) -> JobRecord | None:
    job_id = job.id
    settled = _settled(job, ctx)
    if settled is not None:
        return settled
    job = ctx.jobs.update(
        job_id, state="running", started=time.time(), progress=0.0, attempts=job.attempts + 1
    )
    try:
        return _adapt(job, ctx, lease)
    except LeaseLostError:
        return ctx.jobs.get(job_id)  # the worker that took over owns the record now
    except JobCancelledError:
        return _finish(ctx, job_id, "cancelled")
    except JobTimeoutError:
        return _finish(ctx, job_id, "failed", error=f"timed out after {ctx.settings.job_timeout_s} s")
    except Exception as exc:
        log.exception("job %s failed", job_id)
        return _finish(ctx, job_id, "failed", error=f"{type(exc).__name__}: {exc}")


def _settled(job: JobRecord, ctx: JobContext) -> JobRecord | None:
    """The job's final record if nothing (more) must run: finished, cancelled, or already published."""
    if job.state in TERMINAL_STATES:
        log.info("job %s already %s: nothing to do", job.id, job.state)
        return job
    if ctx.jobs.cancel_requested(job.id):
        return _finish(ctx, job.id, "cancelled")
    produced = ctx.registry.find_by_job(job.model, job.id)
    if produced is not None:
        log.info("job %s: adopting v%d it published before a restart", job.id, produced.version)
        return _finish(ctx, job.id, "succeeded", version=produced.version, metrics=produced.metrics)
    return None


def _finish(ctx: JobContext, job_id: str, state: str, **fields: Any) -> JobRecord:
    job = ctx.jobs.update(job_id, state=state, finished=time.time(), **fields)
    if job.state in TERMINAL_STATES:
        batch_path(ctx.registry.root, job_id).unlink(missing_ok=True)
    log.info("job %s %s %s", job_id, job.state, job.reasons or job.error or "")
    return job


# what every adapted version keeps of its parent's provenance
CARRIED_PROVENANCE = ("encoding", "class_names")


def carried_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    """The parts of a parent's provenance an adapted version carries (the table encoding, the class
    names)."""
    return {key: provenance[key] for key in CARRIED_PROVENANCE if key in provenance}


class _Progress:
    """Throttled progress reporting and cancellation checks."""

    def __init__(self, ctx: JobContext, job_id: str, lease: Lease | None = None) -> None:
        self.ctx, self.job_id, self.lease = ctx, job_id, lease
        self.start = time.monotonic()
        self._last_report = 0.0
        self._last_check = 0.0
        self._cancelled = False

    def report(self, fraction: float, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_report >= 0.25:
            self._last_report = now
            self.ctx.jobs.update(self.job_id, progress=round(min(max(fraction, 0.0), 1.0), 4))

    def should_stop(self) -> bool:
        if time.monotonic() - self.start > self.ctx.settings.job_timeout_s:
            raise JobTimeoutError
        if self.lease is not None and self.lease.lost:
            raise LeaseLostError
        now = time.monotonic()
        if not self._cancelled and now - self._last_check >= 0.2:
            self._last_check = now
            self._cancelled = self.ctx.jobs.cancel_requested(self.job_id)
        return self._cancelled

    def check(self) -> None:
        self._last_check = 0.0
        if self.should_stop():
            raise JobCancelledError


def _tensors(inputs: Inputs, device: torch.device) -> tuple[torch.Tensor, Any]:
    x = torch.from_numpy(inputs.x).to(device)
    cond = tuple(torch.from_numpy(c).to(device) for c in inputs.cond) if inputs.cond else None
    return x, cond


def _adapt(job: JobRecord, ctx: JobContext, lease: Lease | None = None) -> JobRecord:
    settings, registry = ctx.settings, ctx.registry
    progress = _Progress(ctx, job.id, lease)
    device = resolve_device(settings.device)
    base = registry.active(job.model)
    if base is None:
        raise RuntimeError(f"model {job.model} has no active version")
    manifest = registry.verify(job.model, base)
    base_dir = registry.version_dir(job.model, base)
    model, meta = load_checkpoint(base_dir / "checkpoint.pt", map_location=device)
    shipped_recipe = meta.provenance.get("adapt_recipe")
    data = ServingData.load(base_dir / "replay.npz")
    batch = Inputs.load(batch_path(registry.root, job.id))
    check_shapes(batch, manifest.kind, manifest.inputs)
    cfg = finetune_config(settings, job, shipped_recipe)
    ctx.jobs.update(job.id, base_version=base, finetune={**job.finetune, **cfg.as_dict()})

    batch_x, batch_cond = _tensors(batch, device)
    canary_x, canary_cond = _tensors(data.canary, device)
    replay_x, replay_cond = _tensors(data.replay, device)
    gate_cfg = dataclasses.replace(settings.gate, screen=settings.screen_margin)
    try:
        outcome = adapt_batch(
            model,  # type: ignore[arg-type]
            batch_x,
            cfg,
            gate_cfg,
            replay=Labelled(replay_x, torch.from_numpy(data.replay_y).to(device), replay_cond),
            canary=Labelled(canary_x, torch.from_numpy(data.canary_y).to(device), canary_cond),
            batch_cond=batch_cond,
            holdout_fraction=settings.holdout_fraction,
            on_progress=lambda f: progress.report(P_GATE_AFTER * f),
            should_stop=progress.should_stop,
        )
    except AdaptationCancelledError as exc:
        raise JobCancelledError from exc
    decision, metrics = outcome.decision, outcome.metrics()
    progress.report(P_GATE_AFTER, force=True)
    if not decision.accepted:
        return _finish(
            ctx, job.id, "rejected", reasons=list(decision.reasons), gate=decision.as_dict(), metrics=metrics
        )
    progress.check()
    with tempfile.TemporaryDirectory(dir=registry.root, prefix=".job-") as tmp:
        files, _ = build_artifacts(
            model,
            base_dir / "replay.npz",
            Path(tmp),
            provenance={
                "job_id": job.id,
                "parent_version": base,
                "data_hash": job.data_hash,
                "adapt_recipe": FinetuneConfig.from_dict(shipped_recipe or {}).as_dict(),
                **carried_provenance(meta.provenance),
            },
            metrics=metrics,
        )
        progress.report(P_EXPORTED, force=True)
        with registry.lock(job.model):
            progress.check()  # a cancel that arrived during the export still wins: nothing published
            produced = registry.find_by_job(job.model, job.id)
            if produced is not None:  # another delivery of this job published it meanwhile
                return _finish(ctx, job.id, "succeeded", version=produced.version, metrics=produced.metrics)
            published = registry.publish(
                job.model,
                files,
                kind=manifest.kind,
                inputs=manifest.inputs,
                num_classes=manifest.num_classes,
                parent=base,
                data_hash=job.data_hash,
                job_id=job.id,
                metrics=metrics,
                gate=decision.as_dict(),
                provenance={"finetune": cfg.as_dict(), **carried_provenance(manifest.provenance)},
            )
            try:
                registry.activate(job.model, published.version, expect=base)
            except ActiveChangedError as exc:
                return _finish(
                    ctx,
                    job.id,
                    "rejected",
                    version=published.version,
                    reasons=[f"{exc} while the job ran: v{published.version} published but not activated"],
                    gate=decision.as_dict(),
                    metrics=metrics,
                )
    ctx.notify(job.model, published.version)
    return _finish(
        ctx,
        job.id,
        "succeeded",
        version=published.version,
        progress=1.0,
        gate=decision.as_dict(),
        metrics=metrics,
    )
