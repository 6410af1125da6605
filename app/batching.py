"""Micro-batching and fair chunking: concurrent requests share forward passes, large ones take turns.

The cost of a forward pass is its *work*, ``inputs x k x classes`` decoder passes (eq. 6). With
the first-sample screen (:func:`cama.objectives.screened_log_weights`) a pass costs
``inputs x classes`` for the screen plus ``K - 1`` samples of the contenders of the inputs it
leaves open, so its expected work is ``inputs x classes x (1 + (k - 1) x open share)``, where the
open share is a running average over this model's recent passes (it starts at 1, the unscreened
cost, and is never taken below ``MIN_OPEN_SHARE``, which bounds how much longer than expected a
pass of unexpectedly hard inputs runs). Every pass of the screen's second stage is split into
calls of at most ``chunk_work`` decoder passes, so the memory of a pass stays bounded however many
inputs the screen leaves open.

Small requests (expected work up to ``chunk_work``) are micro-batched: the first queued one opens a
batch and others with the same K join until ``max_wait`` has passed or the batch holds
``max_inputs`` inputs or ``chunk_work`` expected work. The wait is only spent while requests
overlap: when the previous pass answered a single request and nothing else is queued, a batch
closes at once, so a lone client never pays ``max_wait`` on each request.

A larger request runs as chunks of at most ``chunk_work`` expected work, one chunk per turn: after
each chunk it goes to the back of the queue, so small requests that arrived meanwhile are answered
between its chunks.

A request's version is captured when its first pass starts and kept for all its chunks, so every
prediction of a response comes from one version. Each request's noise is drawn from its own seed
before it is chunked, so batching and chunking never change an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from app.serving import Backend, LoadedVersion, NoiseArrays
from store.data import Inputs

log = logging.getLogger(__name__)

# the open share a pass is sized with never falls below this: a pass of inputs the screen
# unexpectedly leaves all open costs at most 1 / MIN_OPEN_SHARE times its expected time
MIN_OPEN_SHARE = 0.1
# how fast the open share follows recent passes (the step of a pass of 16 inputs or more)
OPEN_SHARE_RATE = 0.3


@dataclass
class _Pending:
    inputs: Inputs
    k: int
    seed: int
    future: asyncio.Future[tuple[np.ndarray, LoadedVersion]] = field(repr=False)
    version: LoadedVersion | None = None  # captured at the first pass
    noise: NoiseArrays | None = None
    done: int = 0  # inputs answered so far (chunked requests)
    parts: list[np.ndarray] = field(default_factory=list)


class MicroBatcher:
    """One per model: an asyncio queue drained by one loop that runs passes on one thread."""

    def __init__(
        self,
        current: Callable[[], LoadedVersion],
        *,
        max_inputs: int,
        max_wait_s: float,
        chunk_work: int | None = None,
        backend: Backend = "onnx",
        screen: float | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        on_chunk: Callable[[], None] | None = None,
        name: str = "model",
    ) -> None:
        self._current = current
        self.max_inputs = max_inputs
        self.max_wait_s = max_wait_s
        self.chunk_work = chunk_work
        self.backend: Backend = backend
        self.screen = screen
        self._on_batch = on_batch
        self._on_idle = on_idle
        self._on_chunk = on_chunk
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._task: asyncio.Task[None] | None = None
        self._heavy_since_idle = False
        self._open_share = 1.0  # running share of inputs the screen leaves open (1: no screen)
        self._overlapping = True  # the previous pass answered more than one request

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, inputs: Inputs, k: int, seed: int) -> tuple[np.ndarray, LoadedVersion]:
        """Per-class log-weights ``(B, C)`` for ``inputs`` and the version that computed them."""
        future: asyncio.Future[tuple[np.ndarray, LoadedVersion]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(inputs, k, seed, future))
        return await future

    def expected_k(self, k: int) -> float:
        """The decoder passes per input and class a pass at ``k`` samples is expected to cost."""
        if self.screen is None or k == 1:
            return float(k)
        return 1.0 + (k - 1) * max(self._open_share, MIN_OPEN_SHARE)

    def _chunk_inputs(self, item: _Pending, num_classes: int) -> int:
        """How many inputs of ``item`` one pass may take (at least one)."""
        if self.chunk_work is None:
            return max(self.max_inputs, len(item.inputs))
        return max(1, int(self.chunk_work / (self.expected_k(item.k) * num_classes)))

    def _is_large(self, item: _Pending, num_classes: int) -> bool:
        return item.done > 0 or len(item.inputs) > self._chunk_inputs(item, num_classes)

    async def _next(self) -> _Pending:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if self._queue.empty() and self._on_idle is not None and self._heavy_since_idle:
            self._heavy_since_idle = False
            await asyncio.get_running_loop().run_in_executor(self._executor, self._on_idle)
        return await self._queue.get()

    async def _collect(self, num_classes: int) -> list[_Pending]:
        """One batch of small requests: the first, then compatible ones until the wait or a size
        runs out. A large request is a batch of its own (one chunk of it runs)."""
        first = await self._next()
        if self._is_large(first, num_classes):
            return [first]
        batch, size = [first], len(first.inputs)
        limit = min(self.max_inputs, self._chunk_inputs(first, num_classes))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.max_wait_s if self._overlapping else 0.0)
        while size < limit:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item.k != first.k or size + len(item.inputs) > limit or self._is_large(item, num_classes):
                self._carry = item
                break
            batch.append(item)
            size += len(item.inputs)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                num_classes = self._current().num_classes
            except Exception:
                num_classes = 1
            batch = await self._collect(num_classes)
            live = [p for p in batch if not p.future.done()]
            if not live:
                continue
            try:
                current = self._current()
                for p in live:  # the one version that answers each request, fixed at its first pass
                    p.version = p.version or current
                first = live[0].version or current
                if len(live) == 1 and self._is_large(live[0], first.num_classes):
                    await self._run_chunk(live[0])
                    continue
                if any(p.version is not first for p in live):
                    for p in live:  # a swap between joins: answer each on its own version
                        await self._finish_small(loop, [p])
                    continue
                await self._finish_small(loop, live)
            except Exception as exc:
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)

    async def _finish_small(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        version = batch[0].version or self._current()
        self._overlapping = len(batch) > 1
        work = sum(len(p.inputs) for p in batch) * self.expected_k(batch[0].k) * version.num_classes
        if self.chunk_work is not None and 2 * work >= self.chunk_work:
            self._heavy_since_idle = True  # a pass near the largest: give its memory back when idle
        log_w = await loop.run_in_executor(self._executor, self._infer, version, batch)
        start = 0
        for p in batch:
            n = len(p.inputs)
            if not p.future.done():
                p.future.set_result((log_w[start : start + n], version))
            start += n

    async def _run_chunk(self, item: _Pending) -> None:
        """One chunk of a large request; then it queues again behind what arrived meanwhile."""
        version = item.version or self._current()
        self._heavy_since_idle = True
        loop = asyncio.get_running_loop()
        if item.noise is None:
            item.noise = version.noise(len(item.inputs), item.k, item.seed)
        n = self._chunk_inputs(item, version.num_classes)
        idx = slice(item.done, min(item.done + n, len(item.inputs)))
        noise = NoiseArrays(item.noise.m[:, idx], item.noise.z[:, :, idx])
        part = await loop.run_in_executor(
            self._executor, self._pass, version, item.inputs.take(idx), noise, 1
        )
        item.parts.append(part)
        item.done = idx.stop
        if self._on_chunk is not None:  # between chunks: the freed pass goes back before the next
            await loop.run_in_executor(self._executor, self._on_chunk)
        if item.future.done():
            return  # the client went away: drop the rest
        if item.done >= len(item.inputs):
            item.future.set_result((np.concatenate(item.parts), version))
            item.noise, item.parts = None, []
            return
        await self._queue.put(item)  # fair: behind every request that arrived during this chunk

    def _pass(self, version: LoadedVersion, inputs: Inputs, noise: NoiseArrays, requests: int) -> np.ndarray:
        if self._on_batch is not None:
            self._on_batch(len(inputs), requests)
        if self.screen is None:
            return version.log_weights(inputs, noise, self.backend)
        opened = [0]

        def on_open(n: int) -> None:
            opened[0] += n

        out = version.log_weights(
            inputs, noise, self.backend, screen=self.screen, max_work=self.chunk_work, on_open=on_open
        )
        if noise.m.shape[0] > 1:  # a running average, weighted by the inputs of the pass
            weight = min(1.0, len(inputs) / 16)
            share = opened[0] / len(inputs)
            self._open_share += OPEN_SHARE_RATE * weight * (share - self._open_share)
        return out

    def _infer(self, version: LoadedVersion, batch: list[_Pending]) -> np.ndarray:
        inputs = Inputs.concat([p.inputs for p in batch])
        noise = NoiseArrays.concat([version.noise(len(p.inputs), p.k, p.seed) for p in batch])
        return self._pass(version, inputs, noise, len(batch))
