"""Micro-batching: bounded batches, one version per batch, answers independent of batching."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from app.batching import MicroBatcher
from app.serving import NoiseArrays
from store.data import Inputs


class FakeVersion:
    """Log-weights that depend on each input, its own noise, and the version number."""

    num_classes, dim_m, dim_z = 3, 2, 2

    def __init__(self, version: int) -> None:
        self.version = version
        self.batches: list[int] = []

    def noise(self, n: int, k: int, seed: int) -> NoiseArrays:
        rng = np.random.default_rng(seed)
        return NoiseArrays(
            rng.standard_normal((k, n, self.dim_m), dtype=np.float32),
            rng.standard_normal((self.num_classes, k, n, self.dim_z), dtype=np.float32),
        )

    def log_weights(
        self, inputs: Inputs, noise: NoiseArrays, backend: str = "onnx", *, screen=None
    ) -> np.ndarray:
        self.batches.append(len(inputs))
        per_row = (
            inputs.x.reshape(len(inputs), -1).sum(1) + noise.m.sum(axis=(0, 2)) + noise.z.sum(axis=(0, 1, 3))
        )
        return per_row[:, None] + np.arange(self.num_classes)[None, :] + 1000.0 * self.version


def inputs(n: int, value: float) -> Inputs:
    return Inputs(np.full((n, 1, 2, 2), value, np.float32))


async def run_requests(batcher: MicroBatcher, requests: list[tuple[int, int, int]]):
    batcher.start()
    try:
        return await asyncio.gather(
            *(batcher.submit(inputs(n, i), k, seed) for i, (n, k, seed) in enumerate(requests))
        )
    finally:
        await batcher.stop()


@pytest.mark.parametrize(("max_inputs", "max_wait"), [(8, 0.05), (1, 0.0), (64, 0.0)])
def test_batched_answers_equal_one_at_a_time_answers(max_inputs, max_wait):
    version = FakeVersion(1)
    requests = [(1 + i % 3, 2, 100 + i) for i in range(20)]
    batcher = MicroBatcher(lambda: version, max_inputs=max_inputs, max_wait_s=max_wait)  # type: ignore[arg-type,return-value]
    results = asyncio.run(run_requests(batcher, requests))
    for i, ((n, k, seed), (log_w, used)) in enumerate(zip(requests, results, strict=True)):
        alone = version.log_weights(inputs(n, i), version.noise(n, k, seed))
        np.testing.assert_allclose(log_w, alone, rtol=1e-6)
        assert used is version
    assert max(version.batches[: -len(requests)] or [0]) <= max(max_inputs, 3)


def test_a_large_request_runs_in_bounded_chunks_with_the_same_answer():
    version = FakeVersion(1)
    # work = inputs x k x classes: 36 per pass at k=3 and 3 classes is 4 inputs
    batcher = MicroBatcher(lambda: version, max_inputs=64, max_wait_s=0.0, chunk_work=36)  # type: ignore[arg-type,return-value]
    ((log_w, _),) = asyncio.run(run_requests(batcher, [(10, 3, 9)]))
    assert version.batches == [4, 4, 2]
    np.testing.assert_allclose(log_w, version.log_weights(inputs(10, 0), version.noise(10, 3, 9)), rtol=1e-6)


def test_small_requests_are_served_between_the_chunks_of_a_large_one():
    """Fair scheduling: a request that arrives while a large one runs waits for one chunk, not all."""
    first_pass, release = threading.Event(), threading.Event()

    class Gated(FakeVersion):
        def log_weights(self, inputs, noise, backend="onnx", *, screen=None):
            first_pass.set()
            release.wait(5)
            return super().log_weights(inputs, noise, backend)

    version = Gated(1)
    finished: list[str] = []

    async def scenario():
        batcher = MicroBatcher(lambda: version, max_inputs=64, max_wait_s=0.0, chunk_work=12)  # type: ignore[arg-type,return-value]
        batcher.start()
        try:

            async def ask(name: str, n: int, value: float):
                out = await batcher.submit(inputs(n, value), 1, 7)
                finished.append(name)
                return out

            large = asyncio.ensure_future(ask("large", 20, 0.0))  # 5 passes of 4 inputs
            await asyncio.to_thread(first_pass.wait, 5)  # its first chunk is running
            small = asyncio.ensure_future(ask("small", 1, 1.0))
            await asyncio.sleep(0.05)
            release.set()
            return await asyncio.gather(large, small)
        finally:
            await batcher.stop()

    (large_w, _), (_small_w, _) = asyncio.run(scenario())
    assert finished == ["small", "large"]
    assert version.batches[:2] == [4, 1]  # one chunk of the large request, then the small one
    assert max(version.batches) == 4
    np.testing.assert_allclose(
        large_w, version.log_weights(inputs(20, 0.0), version.noise(20, 1, 7)), rtol=1e-6
    )


def test_concurrent_requests_share_forward_passes():
    version = FakeVersion(1)
    batcher = MicroBatcher(lambda: version, max_inputs=16, max_wait_s=0.05)  # type: ignore[arg-type,return-value]
    asyncio.run(run_requests(batcher, [(1, 2, i) for i in range(32)]))
    assert sum(version.batches) == 32
    assert len(version.batches) <= 4
    assert max(version.batches) == 16


def test_the_wait_is_spent_only_while_requests_overlap():
    """A lone client's requests close their batch at once; once requests overlap, a batch waits for
    the next one (max_wait long enough that either behaviour is unmistakable)."""
    version = FakeVersion(1)

    async def scenario() -> float:
        batcher = MicroBatcher(lambda: version, max_inputs=8, max_wait_s=2.0)  # type: ignore[arg-type,return-value]
        batcher.start()
        try:
            await asyncio.gather(*(batcher.submit(inputs(1, i), 1, i) for i in range(2)))  # overlapping
            assert version.batches == [2]
            first = asyncio.ensure_future(batcher.submit(inputs(1, 2), 1, 2))
            await asyncio.sleep(0.2)  # the batch it opened is still waiting for company
            assert not first.done()
            await batcher.submit(inputs(1, 3), 1, 3)  # joins it: two requests, one pass
            await first
            assert version.batches == [2, 2]
            version.batches.clear()
            for _ in range(2):  # the next pass answers one request ...
                await batcher.submit(inputs(1, 4), 1, 4)
            t0 = asyncio.get_running_loop().time()
            for i in range(3):  # ... and from then on a lone request never waits
                await batcher.submit(inputs(1, i), 1, i)
            return asyncio.get_running_loop().time() - t0
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) < 1.0  # three waits of max_wait would take 6 s
    assert version.batches == [1] * 5


def test_requests_with_different_k_are_not_mixed():
    version = FakeVersion(1)
    batcher = MicroBatcher(lambda: version, max_inputs=64, max_wait_s=0.05)  # type: ignore[arg-type,return-value]
    results = asyncio.run(run_requests(batcher, [(1, 1 + i % 2, i) for i in range(10)]))
    assert len(results) == 10
    assert len(version.batches) >= 2


def test_each_batch_is_answered_by_the_version_captured_when_it_starts():
    started, release = threading.Event(), threading.Event()

    class Gated(FakeVersion):
        def log_weights(self, inputs, noise, backend="onnx", *, screen=None):
            started.set()
            release.wait(5)
            return super().log_weights(inputs, noise, backend)

    versions = [Gated(1), Gated(2)]
    state = {"current": versions[0]}

    async def scenario():
        batcher = MicroBatcher(lambda: state["current"], max_inputs=4, max_wait_s=0.01)  # type: ignore[arg-type,return-value]
        batcher.start()
        try:
            futures = [asyncio.ensure_future(batcher.submit(inputs(1, i), 1, i)) for i in range(12)]
            await asyncio.to_thread(started.wait, 5)  # the first batch is running on version 1
            state["current"] = versions[1]  # the hot-swap
            release.set()
            return await asyncio.gather(*futures)
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    for log_w, used in results:
        assert round(float(log_w[0, 0]) / 1000) == used.version  # the rows came from the version named
    assert [used.version for _, used in results] == [1] * 4 + [2] * 8


def test_a_failed_forward_pass_fails_only_its_requests():
    class Broken(FakeVersion):
        def log_weights(self, inputs, noise, backend="onnx", *, screen=None):
            raise RuntimeError("boom")

    async def scenario():
        batcher = MicroBatcher(lambda: Broken(1), max_inputs=4, max_wait_s=0.0)  # type: ignore[arg-type,return-value]
        batcher.start()
        try:
            with pytest.raises(RuntimeError, match="boom"):
                await batcher.submit(inputs(1, 0), 1, 0)
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_memory_is_given_back_when_idle_after_a_heavy_pass_and_only_then():
    """After a pass of at least half the chunk work the idle queue releases memory once; a stream of
    small requests (work far below it) never pays for a release."""
    version = FakeVersion(1)
    released: list[int] = []

    def run(requests: list[tuple[int, int, int]]) -> int:
        released.clear()
        batcher = MicroBatcher(
            lambda: version,  # type: ignore[arg-type,return-value]
            max_inputs=64,
            max_wait_s=0.0,
            chunk_work=36,
            on_idle=lambda: released.append(1),
        )

        async def scenario() -> None:
            batcher.start()
            try:
                for n, k, seed in requests:  # one after another: the queue empties between them
                    await batcher.submit(inputs(n, 0.0), k, seed)
                await asyncio.sleep(0.05)  # the loop reaches the empty queue again
            finally:
                await batcher.stop()

        asyncio.run(scenario())
        return len(released)

    assert run([(1, 1, s) for s in range(5)]) == 0  # work 3 each: small
    assert run([(3, 2, 0)]) == 1  # work 18 = chunk_work / 2: one release when idle
    assert run([(10, 3, 1)]) == 1  # chunked (work 90): one release after its last chunk


def test_the_chunks_of_a_large_request_give_memory_back_between_them():
    """Each chunk's freed pass is returned before the next, so chunks do not pile up fragments."""
    version = FakeVersion(1)
    trims: list[int] = []
    batcher = MicroBatcher(
        lambda: version,  # type: ignore[arg-type,return-value]
        max_inputs=64,
        max_wait_s=0.0,
        chunk_work=36,
        on_chunk=lambda: trims.append(len(version.batches)),
    )
    asyncio.run(run_requests(batcher, [(10, 3, 1), (1, 1, 2)]))
    assert len(trims) == 3  # once after each of the 3 chunks, never for the small request


class ScreeningVersion(FakeVersion):
    """Reports, like the screened path, how many inputs each pass leaves open (a fixed share)."""

    num_classes = 10

    def __init__(self, open_share: float) -> None:
        super().__init__(1)
        self.open_share = open_share
        self.max_work: list[int | None] = []

    def log_weights(self, inputs, noise, backend="onnx", *, screen=None, max_work=None, on_open=None):
        self.max_work.append(max_work)
        if screen is not None and on_open is not None:
            on_open(round(self.open_share * len(inputs)))
        return super().log_weights(inputs, noise, backend)


@pytest.mark.parametrize(("open_share", "largest"), [(0.0, (50, 52)), (1.0, (10, 10))])
def test_a_screened_pass_is_sized_by_the_work_the_screen_leaves(open_share, largest):
    """Expected work = inputs x classes x (1 + (k-1) x open share): passes grow towards
    chunk_work / (classes x (1 + (k-1) x MIN_OPEN_SHARE)) inputs when the screen settles everything
    and stay at chunk_work / (k x classes) when it settles nothing; stage 2 is bounded by chunk_work."""
    version = ScreeningVersion(open_share)
    batcher = MicroBatcher(lambda: version, max_inputs=256, max_wait_s=0.0, chunk_work=1000, screen=15.0)  # type: ignore[arg-type,return-value]
    ((log_w, _),) = asyncio.run(run_requests(batcher, [(1000, 10, 3)]))
    assert version.batches[0] == 10  # the open share starts at 1: the unscreened cost
    assert largest[0] <= max(version.batches) <= largest[1]
    assert set(version.max_work) == {1000}
    alone = FakeVersion.log_weights(version, inputs(1000, 0), version.noise(1000, 10, 3))
    np.testing.assert_allclose(log_w, alone, rtol=1e-6)
