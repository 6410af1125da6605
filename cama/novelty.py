"""How unusual an input is to the model: log p(x) from eq. 6's weights, calibrated on clean data.

Eq. 6 already estimates the joint ``log p(x, y_c)`` for every class c; their log-sum-exp is the
evidence ``log p(x) = log sum_c p(x, y_c)``, so every prediction carries it at no extra cost. Its
scale depends on the model and on K, so it is read against the same estimate on clean held-out
inputs (the version's canary set, with the same K and noise rule): the *unusual* score of an input
is the share of those clean inputs the model explains better,

    unusual(x) = |{x' in canary : log p(x') > log p(x)}| / |canary|,

in [0, 1]; on inputs drawn like the canary it is close to uniform, which is what the drift test
(:mod:`cama.drift`) relies on. A low evidence is what a generative model flags; inputs that a
likelihood model explains *better* than clean data (Nalisnick et al., 2019) score near 0 and are
not flagged by this score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_evidence(log_w: np.ndarray) -> np.ndarray:
    """``log p(x) = logsumexp_c log p(x, y_c)`` for per-class log-weights ``(B, C)``; returns ``(B,)``."""
    top = log_w.max(axis=1, keepdims=True)
    return np.asarray((top + np.log(np.exp(log_w - top).sum(axis=1, keepdims=True)))[:, 0])


@dataclass(frozen=True)
class EvidenceReference:
    """The clean reference: ``log p(x)`` of held-out clean inputs, sorted, and the K it was taken at."""

    scores: np.ndarray  # (N,), ascending
    k: int

    @classmethod
    def from_scores(cls, scores: np.ndarray, k: int) -> EvidenceReference:
        finite = np.asarray(scores, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if finite.size == 0:
            raise ValueError("the clean reference holds no finite log p(x)")
        return cls(np.sort(finite), k)

    def unusual(self, log_px: np.ndarray) -> np.ndarray:
        """The share of the reference with a higher ``log p(x)`` than each value ``(B,)``."""
        above = self.scores.size - np.searchsorted(self.scores, np.asarray(log_px), side="right")
        return above / self.scores.size
