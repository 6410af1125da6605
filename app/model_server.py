"""The models an API process serves, and their hot-swap.

Each model has one slot holding a reference to its current :class:`LoadedVersion`. A watcher
polls each model's ACTIVE file (and wakes at once on a Redis pub/sub notice); when ACTIVE names a
new version, that version is loaded and checked beside the old one in a worker thread, then the
slot's reference is replaced in one assignment. Requests in flight keep the version their batch
captured, so no request fails or waits during a swap. A version that fails to load is logged,
remembered and never served; the old one stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from app.batching import MicroBatcher
from app.core.config import Settings
from app.metrics import ServiceMetrics
from app.serving import EvidenceSettings, LoadedVersion, ServedModel, load_version
from cama.drift import DriftConfig, DriftDetector, DriftState
from store.data import Inputs
from store.errors import NotFoundError, UnavailableError
from store.memory import release_memory, trim_memory
from store.registry import ModelRegistry, RegistryError

log = logging.getLogger(__name__)

DRIFT_CODES: dict[DriftState, int] = {"warming": 0, "normal": 1, "drift": 2}  # cama_drift_state


@dataclass
class ModelSlot:
    """What one process serves for one model."""

    name: str
    current: LoadedVersion | None = None
    problem: str | None = "not loaded yet"
    seed_problem: str | None = None  # why the store could not be seeded, if it could not
    refused: dict[int, str] = field(default_factory=dict)  # version -> why it was refused
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    batcher: MicroBatcher | None = None
    drift: DriftDetector | None = None  # the drift test of the served version
    drift_version: int | None = None


class ModelServer:
    """Loads, serves and hot-swaps every configured model of one API process."""

    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: ServiceMetrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.slots = {name: ModelSlot(name) for name in settings.models}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start batchers and the watcher (which loads every model on its first pass)."""
        s = self.settings
        for slot in self.slots.values():
            slot.batcher = MicroBatcher(
                self._getter(slot),
                max_inputs=s.batch_max_inputs if s.batching else 1,
                max_wait_s=s.batch_max_wait_ms / 1000.0 if s.batching else 0.0,
                chunk_work=s.chunk_work,
                backend=s.backend,
                screen=s.screen_margin,
                on_batch=self._batch_observer(slot.name),
                on_idle=release_memory,
                on_chunk=trim_memory,
                name=slot.name,
            )
            slot.batcher.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch()))
        if s.redis_url:
            self._tasks.append(loop.create_task(self._listen(s.redis_url)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for slot in self.slots.values():
            if slot.batcher is not None:
                await slot.batcher.stop()

    def wake(self) -> None:
        """Re-read every ACTIVE file now (called after an activation in this process)."""
        self._wake.set()

    # --- serving ------------------------------------------------------------------------------
    def slot(self, name: str) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            raise NotFoundError(
                f"unknown model {name!r}; served: {sorted(self.slots)}", reason="unknown_model"
            )
        return slot

    def current(self, name: str) -> LoadedVersion:
        slot = self.slot(name)
        if slot.current is None:
            raise UnavailableError(
                f"model {name!r} is not loaded: {slot.problem}", reason="model_unavailable"
            )
        return slot.current

    def served_model(self, name: str) -> ServedModel:
        """What request parsing needs of a served model (404 unknown, 503 not loaded)."""
        current = self.current(name)
        return ServedModel(current.num_classes, current.encoding)

    async def predict(self, name: str, inputs: Inputs, k: int, seed: int) -> tuple[np.ndarray, LoadedVersion]:
        """Eq. 6 log-weights ``(B, C)`` through the model's micro-batcher, and the version used."""
        slot = self.slot(name)
        self.current(name)
        if slot.batcher is None:
            raise UnavailableError(f"model {name!r} is not started", reason="model_unavailable")
        return await slot.batcher.submit(inputs, k, seed)

    def observe(self, name: str, version: LoadedVersion, unusual: np.ndarray) -> None:
        """Feed the unusual scores of one response to the drift test of ``version`` (a new test
        starts with each served version); log and count a change of state."""
        slot = self.slot(name)
        if slot.current is not version:
            return  # answered by a version already swapped out: its test has ended
        if slot.drift is None or slot.drift_version != version.version:
            s = self.settings
            slot.drift = DriftDetector(DriftConfig(s.drift_window, s.drift_alarm_z, s.drift_clear_z))
            slot.drift_version = version.version
        detector = slot.drift
        changed = detector.update(unusual.tolist())
        z = detector.statistic
        if z is not None:
            self.metrics.drift_statistic.labels(model=name).set(z)
        if changed is not None:
            self.metrics.drift_state.labels(model=name).set(DRIFT_CODES[changed])
            record = {
                "event": "drift_state",
                "model": name,
                "version": version.version,
                "state": changed,
                "statistic": None if z is None else round(z, 3),
                "window": detector.config.window,
                "seen": detector.seen,
            }
            log.warning("%s", json.dumps(record), extra=record)

    def ready(self) -> tuple[bool, dict[str, int | None], dict[str, str]]:
        """(every model loaded, served version per model, problems per model)."""
        versions = {n: (s.current.version if s.current else None) for n, s in self.slots.items()}
        problems = {n: s.problem for n, s in self.slots.items() if s.problem}
        return all(v is not None for v in versions.values()), versions, problems

    def _getter(self, slot: ModelSlot) -> Callable[[], LoadedVersion]:
        def current() -> LoadedVersion:
            if slot.current is None:
                raise UnavailableError(f"model {slot.name!r} is not loaded", reason="model_unavailable")
            return slot.current

        return current

    def _batch_observer(self, name: str) -> Callable[[int, int], None]:
        def observe(inputs: int, requests: int) -> None:
            self.metrics.batch_inputs.labels(model=name).observe(inputs)
            self.metrics.batch_requests.labels(model=name).observe(requests)

        return observe

    # --- hot-swap -----------------------------------------------------------------------------
    async def refresh(self, name: str) -> None:
        """Load the version ACTIVE names, if new, beside the current one; then swap the reference."""
        slot = self.slot(name)
        async with slot.lock:
            try:
                active = await asyncio.to_thread(self.registry.active, name)
            except (OSError, RegistryError) as exc:
                slot.problem = f"cannot read ACTIVE: {exc}"
                return
            if active is None:
                if slot.current is None:
                    slot.problem = (
                        slot.seed_problem or f"no active version in {self.registry.model_dir(name)}"
                    )
                return
            if slot.current is not None and slot.current.version == active:
                return
            if active in slot.refused:
                return
            try:
                loaded = await asyncio.to_thread(
                    load_version,
                    self.registry,
                    name,
                    active,
                    device=self.settings.device,
                    threads=self.settings.torch_threads,
                    evidence=EvidenceSettings(
                        self.settings.evidence_inputs,
                        self.settings.k,
                        self.settings.screen_margin,
                        self.settings.chunk_work,
                    ),
                )
            except (RegistryError, OSError) as exc:
                slot.refused[active] = str(exc)
                kept = f"; still serving v{slot.current.version}" if slot.current else ""
                slot.problem = f"refused v{active}: {exc}{kept}"
                self.metrics.load_failures.labels(model=name).inc()
                log.error("REFUSED %s v%d, not served: %s%s", name, active, exc, kept)
                return
            old = slot.current
            slot.current = loaded  # the atomic swap: new batches take the new version
            slot.problem = None
            self.metrics.active_version.labels(model=name).set(loaded.version)
            if old is not None:
                self.metrics.swaps.labels(model=name).inc()
                log.info("swapped %s v%d -> v%d", name, old.version, loaded.version)
            else:
                log.info("serving %s v%d", name, loaded.version)

    async def refresh_all(self) -> None:
        for name in self.slots:
            try:
                await self.refresh(name)
            except Exception:
                log.exception("refreshing %s failed", name)

    async def _watch(self) -> None:
        """Poll the ACTIVE files; a pub/sub notice or :meth:`wake` cuts the wait short."""
        while True:
            self._wake.clear()
            await self.refresh_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_s)

    async def _listen(self, url: str) -> None:
        """Wake the watcher on every ``<prefix>versions`` message; reconnect with back-off."""
        channel = f"{self.settings.redis_prefix}versions"
        delay = 0.5
        while True:
            client = aioredis.Redis.from_url(url, socket_connect_timeout=2)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    delay = 0.5
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            log.info("version notice: %s", _decode(message.get("data")))
                            self._wake.set()
            except (RedisError, OSError) as exc:
                log.warning("pub/sub on %s unavailable (%s); polling ACTIVE meanwhile", channel, exc)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def _decode(data: object) -> object:
    if isinstance(data, bytes):
        with contextlib.suppress(ValueError):
            return json.loads(data)
    return data
