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
from cama.novelty import route
from store.data import Inputs
from store.errors import NotFoundError, UnavailableError
from store.memory import release_pass_memory, trim_memory
from store.registry import ModelRegistry, RegistryError

log = logging.getLogger(__name__)

DRIFT_CODES: dict[DriftState, int] = {"warming": 0, "normal": 1, "drift": 2}  # cama_drift_state


@dataclass(frozen=True)
class Answer:
    """One request's eq. 6 log-weights ``(B, C)``, the served version, and with routing on the
    version that answered each input (``routes``; None without routing)."""

    log_w: np.ndarray
    version: LoadedVersion
    routes: list[LoadedVersion] | None
    unusual: np.ndarray | None = None  # (B,): against the version that answered each input


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
    # routing: other versions answering beside the served one, each with its own batcher
    adapters: dict[int, tuple[LoadedVersion, MicroBatcher]] = field(default_factory=dict)


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
        for slot in self.slots.values():
            slot.batcher = self._batcher(slot.name, self._getter(slot))
            slot.batcher.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch()))
        if self.settings.redis_url:
            self._tasks.append(loop.create_task(self._listen(self.settings.redis_url)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for slot in self.slots.values():
            if slot.batcher is not None:
                await slot.batcher.stop()
            for _, batcher in slot.adapters.values():
                await batcher.stop()
            slot.adapters.clear()

    def _batcher(self, name: str, current: Callable[[], LoadedVersion]) -> MicroBatcher:
        s = self.settings
        return MicroBatcher(
            current,
            max_inputs=s.batch_max_inputs if s.batching else 1,
            max_wait_s=s.batch_max_wait_ms / 1000.0 if s.batching else 0.0,
            chunk_work=s.chunk_work,
            backend=s.backend,
            screen=s.screen_margin,
            on_batch=self._batch_observer(name),
            on_idle=release_pass_memory,
            on_chunk=trim_memory,
            name=name,
        )

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
        return ServedModel(current.num_classes, current.encoding, current.manifest.inputs)

    async def predict(self, name: str, inputs: Inputs, k: int, seed: int) -> Answer:
        """Eq. 6 log-weights ``(B, C)`` through the model's micro-batcher, the served version and,
        with routing on, each input's route: the version that explains it best (cama.novelty.route)."""
        slot = self.slot(name)
        self.current(name)
        if slot.batcher is None:
            raise UnavailableError(f"model {name!r} is not started", reason="model_unavailable")
        adapters = [batcher for _, batcher in slot.adapters.values()]
        if not adapters:
            log_w, version = await slot.batcher.submit(inputs, k, seed)
            answered, routes = [version] * len(inputs), None
        else:
            answers = await asyncio.gather(
                slot.batcher.submit(inputs, k, seed), *(b.submit(inputs, k, seed) for b in adapters)
            )
            chosen, log_w = route([w for w, _ in answers])
            versions = [v for _, v in answers]
            version = versions[0]
            answered = routes = [versions[i] for i in chosen]
        unusual = None
        if all(v.evidence is not None and v.evidence.k == k for v in answered):  # calibrated K only
            unusual = await asyncio.to_thread(_unusual, answered, log_w, inputs)
        return Answer(log_w, version, routes, unusual)

    def observe(self, name: str, version: LoadedVersion, unusual: np.ndarray) -> DriftState | None:
        """Feed the unusual scores of one response to the drift test of ``version`` (a new test
        starts with each served version); log and count a change of state. Returns the test's
        state after these scores (None for a version already swapped out)."""
        slot = self.slot(name)
        if slot.current is not version:
            return None  # answered by a version already swapped out: its test has ended
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
        return detector.state

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
                loaded = await asyncio.to_thread(self._load, name, active)
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

    async def sync_adapters(self, name: str) -> None:
        """Routing: load the ``route_versions`` most recent versions other than the served one (never
        a refused one), each beside its own batcher; stop those no longer among them."""
        slot = self.slot(name)
        if self.settings.route_versions == 0 and not slot.adapters:
            return
        async with slot.lock:
            wanted: list[int] = []
            if self.settings.route_versions > 0 and slot.current is not None:
                try:
                    versions = await asyncio.to_thread(self.registry.versions, name)
                except (OSError, RegistryError) as exc:
                    log.warning("routing %s: cannot list versions: %s", name, exc)
                    return
                served = slot.current.version
                others = [v for v in reversed(versions) if v != served and v not in slot.refused]
                wanted = others[: self.settings.route_versions]
            for version in [v for v in slot.adapters if v not in wanted]:
                _, batcher = slot.adapters.pop(version)
                await batcher.stop()
                log.info("routing %s: v%d leaves the route", name, version)
            for version in wanted:
                if version in slot.adapters:
                    continue
                try:
                    loaded = await asyncio.to_thread(self._load, name, version)
                except (RegistryError, OSError) as exc:
                    slot.refused[version] = str(exc)
                    log.error("routing %s: v%d refused: %s", name, version, exc)
                    continue
                batcher = self._batcher(name, _fixed(loaded))
                batcher.start()
                slot.adapters[version] = (loaded, batcher)
                log.info("routing %s: v%d joins the route", name, version)

    def _load(self, name: str, version: int) -> LoadedVersion:
        s = self.settings
        return load_version(
            self.registry,
            name,
            version,
            device=s.device,
            threads=s.torch_threads,
            evidence=EvidenceSettings(s.evidence_inputs, s.k, s.screen_margin, s.chunk_work, s.unusual_rule),
        )

    async def refresh_all(self) -> None:
        for name in self.slots:
            try:
                await self.refresh(name)
                await self.sync_adapters(name)
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


def _unusual(answered: list[LoadedVersion], log_w: np.ndarray, inputs: Inputs) -> np.ndarray:
    """Each input's unusual score against the version that answered it (one call per version)."""
    out = np.empty(len(inputs))
    for version in {id(v): v for v in answered}.values():
        rows = np.flatnonzero([v is version for v in answered])
        out[rows] = version.unusual(log_w[rows], inputs.take(rows))
    return out


def _fixed(version: LoadedVersion) -> Callable[[], LoadedVersion]:
    """A batcher's getter for one version that never swaps (a route's adapter)."""

    def get() -> LoadedVersion:
        return version

    return get


def _decode(data: object) -> object:
    if isinstance(data, bytes):
        with contextlib.suppress(ValueError):
            return json.loads(data)
    return data
