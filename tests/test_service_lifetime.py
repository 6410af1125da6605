"""A long-lived API process: a version swapped out is freed at once, and what a pass gives back
costs no full garbage collection (benchmarks/predict.py measures the service after many jobs)."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import numpy as np

from app.core.config import Settings
from app.metrics import ServiceMetrics
from app.model_server import ModelServer
from harness.inputs import digit_like_images
from store.artifacts import export_checkpoint
from store.data import Inputs
from store.memory import release_pass_memory
from store.registry import ModelRegistry


async def _until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_a_version_swapped_out_is_freed_without_a_collection(tiny_template, tiny_store):
    """After the swap and the next pass, nothing holds the old version (its torch model and ONNX
    sessions): it is freed by reference counting, with the collector off, so no reference cycle
    keeps a version alive until a full collection."""
    seed_dir, _ = tiny_template
    registry = ModelRegistry(tiny_store)
    export_checkpoint(
        registry, "tiny", seed_dir / "tiny_cama.pt", seed_dir / "tiny_serving_data.npz", activate=False
    )
    settings = Settings(model_store=tiny_store, seed_dir=seed_dir, models=["tiny"], poll_interval_s=0.1, k=2)
    x, _ = digit_like_images(6, seed=5)
    inputs = Inputs((x[:, None] / 255.0).astype(np.float32))

    async def scenario() -> tuple[object, int, int]:
        server = ModelServer(registry, settings, ServiceMetrics())
        await server.start()
        try:
            await _until(lambda: server.ready()[0])
            old = weakref.ref(server.current("tiny"))
            first = (await server.predict("tiny", inputs, 2, 0)).version.version
            gc.collect()
            gc.disable()
            try:
                registry.activate("tiny", 2)
                server.wake()
                await _until(lambda: server.current("tiny").version == 2)
                second = (await server.predict("tiny", inputs, 2, 0)).version.version
                await asyncio.sleep(0.2)  # the batcher's idle work after the pass
                return old(), first, second
            finally:
                gc.enable()
        finally:
            await server.stop()

    left, first, second = asyncio.run(scenario())
    assert (first, second) == (1, 2)
    assert left is None, "the swapped-out version is still referenced"


def test_the_release_after_a_pass_collects_only_the_young_generations():
    generations: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            generations.append(info["generation"])

    gc.callbacks.append(record)
    try:
        release_pass_memory()
    finally:
        gc.callbacks.remove(record)
    assert generations, "no collection ran"
    assert max(generations) <= 1, generations
