"""Drift on live traffic: a windowed test over the unusual scores of recent predictions.

On inputs drawn like the clean reference, the unusual score of :mod:`cama.novelty` is close to
Uniform(0, 1): mean 1/2, variance 1/12. Over the last ``window`` scores the statistic

    z = (mean(unusual) - 1/2) * sqrt(12 * window)

is close to a standard normal (the mean of uniforms converges fast and its tails are lighter than
the normal's). The state turns to ``drift`` when ``z >= alarm_z`` and back to ``normal`` when
``z <= clear_z`` (hysteresis: one alarm per episode). With ``alarm_z = 5`` one test on clean
traffic raises a false alarm with probability under 3e-7. A stream that switches to inputs of
mean unusual score ``mu`` raises it after about ``alarm_z * sqrt(window / 12) / (mu - 1/2)`` inputs,
if ``mu`` exceeds ``1/2 + alarm_z / sqrt(12 * window)`` at all.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

DriftState = Literal["warming", "normal", "drift"]


@dataclass(frozen=True)
class DriftConfig:
    """The test's window (inputs) and its thresholds on ``z``."""

    window: int = 100
    alarm_z: float = 5.0
    clear_z: float = 2.0

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError("window must hold at least 2 scores")
        if self.clear_z >= self.alarm_z:
            raise ValueError("clear_z must be below alarm_z")


@dataclass
class DriftDetector:
    """The windowed test of one model version; feed it scores with :meth:`update`."""

    config: DriftConfig = field(default_factory=DriftConfig)
    clock: Callable[[], float] = time.time
    state: DriftState = "warming"
    since: float = field(default=0.0)
    alarms: int = 0
    seen: int = 0
    _scores: deque[float] = field(default_factory=deque, repr=False)
    _sum: float = 0.0

    def __post_init__(self) -> None:
        self.since = self.clock()

    @property
    def statistic(self) -> float | None:
        """``z`` over the current window; None until the window is full."""
        n = len(self._scores)
        if n < self.config.window:
            return None
        return (self._sum / n - 0.5) * math.sqrt(12.0 * n)

    def update(self, scores: Iterable[float]) -> DriftState | None:
        """Add scores in arrival order (testing after each); returns the new state if it changed."""
        changed: DriftState | None = None
        for score in scores:
            self._scores.append(float(score))
            self._sum += float(score)
            if len(self._scores) > self.config.window:
                self._sum -= self._scores.popleft()
            self.seen += 1
            new = self._next_state()
            if new != self.state:
                self.state, self.since, changed = new, self.clock(), new
                if new == "drift":
                    self.alarms += 1
        return changed

    def _next_state(self) -> DriftState:
        z = self.statistic
        if z is None:
            return "warming"
        if self.state == "drift":
            return "normal" if z <= self.config.clear_z else "drift"
        return "drift" if z >= self.config.alarm_z else "normal"
