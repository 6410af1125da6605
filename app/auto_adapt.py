"""Adaptation from live traffic, opt-in per model (``CAMA_AUTO_ADAPT``).

While a model's drift test (:mod:`cama.drift`) is in ``drift``, the inputs whose unusual score is at
least ``auto_adapt_min_unusual`` are kept in a buffer held in memory only: at most
``auto_adapt_inputs`` of them, none older than ``auto_adapt_max_age_s``, emptied when the drift
clears or the served version changes. When the buffer is full, one adaptation job starts on it,
exactly as ``POST /adapt`` would start it (same recipe, same gate) with the served version as its
base, and its record says ``trigger: "drift"``. One such job runs per model at a time; after a job
that published nothing (gate refusal, failure, cancellation) none starts for
``auto_adapt_cooldown_s``. Each API process keeps its own buffer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from app.core.config import Settings
from app.jobs import JobService
from cama.drift import DriftState
from store.data import Inputs
from store.errors import DomainError
from store.jobs import TERMINAL_STATES

log = logging.getLogger(__name__)


class LiveBuffer:
    """The newest ``capacity`` kept inputs, each dropped ``max_age_s`` after it arrived."""

    def __init__(self, capacity: int, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.max_age_s = max_age_s
        self.clock = clock
        self._parts: deque[tuple[float, Inputs]] = deque()
        self._size = 0

    def __len__(self) -> int:
        self.expire()
        return self._size

    def add(self, inputs: Inputs) -> None:
        if len(inputs) == 0:
            return
        if len(inputs) > self.capacity:
            inputs = inputs.take(slice(len(inputs) - self.capacity, None))
        self._parts.append((self.clock(), inputs))
        self._size += len(inputs)
        while self._size > self.capacity:  # drop the oldest rows
            stamp, oldest = self._parts.popleft()
            excess = self._size - self.capacity
            self._size -= len(oldest)
            if len(oldest) > excess:
                rest = oldest.take(slice(excess, None))
                self._parts.appendleft((stamp, rest))
                self._size += len(rest)

    def expire(self) -> None:
        limit = self.clock() - self.max_age_s
        while self._parts and self._parts[0][0] < limit:
            self._size -= len(self._parts.popleft()[1])

    def drain(self) -> Inputs | None:
        """Everything kept, oldest first, and an empty buffer."""
        self.expire()
        parts = [inputs for _, inputs in self._parts]
        self.clear()
        return Inputs.concat(parts) if parts else None

    def clear(self) -> None:
        self._parts.clear()
        self._size = 0


class AutoAdapter:
    """The buffers of the opted-in models and the one drift-started job each may have running."""

    def __init__(
        self, settings: Settings, jobs: JobService, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.clock = clock
        self.buffers = {
            name: LiveBuffer(settings.auto_adapt_inputs, settings.auto_adapt_max_age_s, clock)
            for name in settings.auto_adapt
        }
        self.versions: dict[str, int] = {}  # the served version the kept inputs were scored by
        self.running: dict[str, str] = {}  # model -> id of its drift-started job
        self.cooldown_until: dict[str, float] = {}

    def offer(
        self, model: str, version: int, inputs: Inputs, unusual: np.ndarray, state: DriftState | None
    ) -> None:
        """One response's inputs, their unusual scores and the drift state after them."""
        buffer = self.buffers.get(model)
        if buffer is None or state is None:
            return
        if state != "drift" or self.versions.get(model) != version:
            buffer.clear()
            self.versions[model] = version
        if state != "drift" or model in self.running:
            return
        keep = np.flatnonzero(np.asarray(unusual) >= self.settings.auto_adapt_min_unusual)
        if keep.size:
            buffer.add(inputs.take(keep))

    async def run(self, interval_s: float) -> None:
        """Check every ``interval_s``: follow running jobs, start one where a buffer is full."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except Exception:
                log.exception("auto-adapt check failed")

    async def tick(self) -> list[str]:
        """One check; returns the ids of the jobs it started."""
        started = []
        for model, buffer in self.buffers.items():
            job_id = self.running.get(model)
            if job_id is not None:
                try:
                    job = await asyncio.to_thread(self.jobs.get, job_id)
                except DomainError as exc:
                    log.warning("auto-adapt %s: cannot read job %s: %s", model, job_id, exc)
                    continue
                if job.state not in TERMINAL_STATES:
                    continue
                del self.running[model]
                if job.version is None:
                    self.cooldown_until[model] = self.clock() + self.settings.auto_adapt_cooldown_s
                buffer.clear()
                continue
            if len(buffer) < buffer.capacity or self.clock() < self.cooldown_until.get(model, 0.0):
                continue
            inputs = buffer.drain()
            if inputs is None:
                continue
            base = self.versions.get(model)
            try:
                job = await asyncio.to_thread(self.jobs.submit, model, inputs, base, None, "drift")
            except DomainError as exc:
                log.warning("auto-adapt %s: cannot start a job: %s", model, exc)
                continue
            self.running[model] = job.id
            started.append(job.id)
            record = {"event": "auto_adapt", "model": model, "job": job.id, "base_version": base}
            record["inputs"] = len(inputs)
            log.warning("%s", json.dumps(record), extra=record)
        return started
