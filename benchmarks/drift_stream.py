"""The service's drift test (:mod:`cama.drift`) on a benchmark stream of unusual scores: its alarms
on clean traffic and the requests it takes to alarm after a switch."""

from __future__ import annotations

import numpy as np

from cama.drift import DriftConfig, DriftDetector


def alarms_on(scores: np.ndarray, config: DriftConfig) -> int:
    detector = DriftDetector(config)
    for s in scores:
        detector.update([s])
    return detector.alarms


def requests_to_alarm(clean: np.ndarray, shifted: np.ndarray, config: DriftConfig, horizon: int) -> int:
    """A warmed-up test on clean images, then the shifted stream: inputs until the alarm."""
    detector = DriftDetector(config)
    detector.update(clean[: config.window])
    for i, s in enumerate(shifted[:horizon]):
        if detector.update([s]) == "drift":
            return i + 1
    return horizon + 1
