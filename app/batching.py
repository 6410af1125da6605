"""Micro-batching: concurrent requests for one model share one forward pass.

The first queued request opens a batch; more join until ``max_wait`` has passed or the batch holds
``max_inputs`` inputs (a request is never split across batches; one with a different K waits for
the next batch; a batch larger than ``chunk_inputs`` runs as several bounded forward passes).
The model version is captured once when the batch is formed, so every request in it, and every
input of every request, is answered by that one version. Each request's noise comes from its own
seed, so batching never changes an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from app.data import Inputs
from app.serving import Backend, LoadedVersion, NoiseArrays

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    inputs: Inputs
    k: int
    seed: int
    future: asyncio.Future[tuple[np.ndarray, LoadedVersion]] = field(repr=False)


class MicroBatcher:
    """One per model: an asyncio queue drained by one loop that runs batches on one thread."""

    def __init__(
        self,
        current: Callable[[], LoadedVersion],
        *,
        max_inputs: int,
        max_wait_s: float,
        chunk_inputs: int | None = None,
        backend: Backend = "onnx",
        screen: float | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        name: str = "model",
    ) -> None:
        self._current = current
        self.max_inputs = max_inputs
        self.max_wait_s = max_wait_s
        self.chunk_inputs = chunk_inputs or max_inputs
        self.backend: Backend = backend
        self.screen = screen
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._carry: _Pending | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._task: asyncio.Task[None] | None = None

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

    async def _next(self) -> _Pending:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        return await self._queue.get()

    async def _collect(self) -> list[_Pending]:
        """One batch: the first request, then compatible ones until the wait or the size runs out."""
        first = await self._next()
        batch, size = [first], len(first.inputs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while size < self.max_inputs:
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
            if item.k != first.k or size + len(item.inputs) > self.max_inputs:
                self._carry = item
                break
            batch.append(item)
            size += len(item.inputs)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [p for p in batch if not p.future.done()]
            if not live:
                continue
            try:
                version = self._current()  # the one version that answers this whole batch
                log_w = await loop.run_in_executor(self._executor, self._infer, version, live)
            except Exception as exc:
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            start = 0
            for p in live:
                n = len(p.inputs)
                if not p.future.done():
                    p.future.set_result((log_w[start : start + n], version))
                start += n

    def _infer(self, version: LoadedVersion, batch: list[_Pending]) -> np.ndarray:
        inputs = Inputs.concat([p.inputs for p in batch])
        noise = NoiseArrays.concat([version.noise(len(p.inputs), p.k, p.seed) for p in batch])
        if self._on_batch is not None:
            self._on_batch(len(inputs), len(batch))
        if len(inputs) <= self.chunk_inputs:
            return version.log_weights(inputs, noise, self.backend, screen=self.screen)
        parts = []  # a large request runs in bounded chunks (memory), still on this one version
        for start in range(0, len(inputs), self.chunk_inputs):
            idx = slice(start, start + self.chunk_inputs)
            part = NoiseArrays(noise.m[:, idx], noise.z[:, :, idx])
            parts.append(version.log_weights(inputs.take(idx), part, self.backend, screen=self.screen))
        return np.concatenate(parts)
