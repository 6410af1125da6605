"""How unusual an input is to the model: log p(x) and q(m|x), each calibrated on clean data.

Eq. 6 already estimates the joint ``log p(x, y_c)`` for every class c; their log-sum-exp is the
evidence ``log p(x) = log sum_c p(x, y_c)``. Its scale depends on the model and on K, so it is read
against the same estimate on clean held-out inputs (the version's canary set, same K and noise
rule): ``u_e(x)``, the share of those clean inputs with a higher ``log p(x)``. A likelihood alone
misses what a model explains *better* than clean data (Nalisnick et al., 2019: here, shrunken or
shifted digits); the manipulation posterior sees those. q(m|x) = N(mu(x), diag exp(logvar(x))) is
summarised by ``f(x) = (mu, logvar)`` and its squared Mahalanobis distance ``d(x)`` from a Gaussian
fitted to f on clean inputs (:class:`MGaussian`); ``u_m(x)`` is the share of the canary with a
smaller distance. Clean digits of different classes sit in different places of f, so a second
Gaussian has one mean per class and a covariance shared by the classes (fitted on labelled clean
inputs), and its distance is the smallest over the class means, ``d_c(x) = min_y (f - mu_y)^T
Sigma^{-1} (f - mu_y)``: no label is needed to score an input. ``u_mc(x)`` is the share of the
canary with a smaller ``d_c``. Four rules give the unusual score:

- ``evidence``: ``u_e(x)``;
- ``m``: ``u_m(x)``;
- ``m_class``: ``u_mc(x)`` (the default: the best mean AUROC on the validation split's
  manipulations, ``python -m benchmarks.drift --suite validation``, which measures every rule
  and the class Gaussian's ridge);
- ``max``: ``s(x) = max(u_e(x), u_m(x))`` ranked on the canary,
  ``|{x' in canary : s(x') < s(x)}| / |canary|``.

Each is in [0, 1] and close to uniform on inputs drawn like the canary, which is what the drift
test (:mod:`cama.drift`) relies on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

Rule = Literal["evidence", "m", "m_class", "max"]
RULES: tuple[Rule, ...] = ("evidence", "m", "m_class", "max")
DEFAULT_RULE: Rule = "m_class"  # the best mean AUROC on the validation split (benchmarks.drift)
RIDGE = 1e-3  # added to the covariance's diagonal, relative to its mean variance
CLASS_RIDGE = 0.1  # the same for the class Gaussian (chosen on the validation split)


def log_evidence(log_w: np.ndarray) -> np.ndarray:
    """``log p(x) = logsumexp_c log p(x, y_c)`` for per-class log-weights ``(B, C)``; returns ``(B,)``."""
    top = log_w.max(axis=1, keepdims=True)
    return np.asarray((top + np.log(np.exp(log_w - top).sum(axis=1, keepdims=True)))[:, 0])


def m_features(model: nn.Module, x: np.ndarray, cond: tuple[np.ndarray, ...] = ()) -> np.ndarray:
    """``f(x) = (mu, logvar)`` of q(m|x) for a batch, ``(B, 2 dM)`` (float64)."""
    with torch.inference_mode():
        conds = tuple(torch.from_numpy(c) for c in cond) if cond else None
        mu, logvar = model.infer_m(torch.from_numpy(x), conds)  # type: ignore[operator]
    return np.concatenate([mu.double().numpy(), logvar.double().numpy()], axis=1)


@dataclass(frozen=True)
class MGaussian:
    """A Gaussian over q(m|x)'s summary f(x), fitted on clean inputs, with one mean or one mean per
    class and one covariance; ``distance`` is the smallest squared Mahalanobis distance over the
    means, ``min_g (f - mean_g)^T precision (f - mean_g)``. With fewer than four inputs per
    dimension the covariance is diagonal; ``ridge`` times its mean variance is added to its
    diagonal."""

    means: np.ndarray  # (G, D)
    precision: np.ndarray  # (D, D)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray | None = None, ridge: float = RIDGE) -> MGaussian:
        """One mean (``labels`` None) or one per label present, and the covariance of the inputs
        around their own mean."""
        f = np.asarray(features, dtype=np.float64)
        keep = np.isfinite(f).all(axis=1)
        f = f[keep]
        n, dims = f.shape
        if n < 2:
            raise ValueError("q(m|x) needs at least two clean inputs")
        groups = np.zeros(n, np.int64) if labels is None else np.asarray(labels)[keep]
        names, index = np.unique(groups, return_inverse=True)
        means = np.stack([f[index == g].mean(axis=0) for g in range(len(names))])
        resid = f - means[index]
        cov = np.atleast_2d(resid.T @ resid / max(n - len(names), 1))
        if n < 4 * dims:
            cov = np.diag(np.diag(cov))
        cov = cov + (ridge * float(np.mean(np.diag(cov))) + 1e-12) * np.eye(dims)
        return cls(means, np.linalg.inv(cov))

    def distance(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        out = np.full(len(f), np.inf)
        for mean in self.means:
            d = f - mean
            out = np.minimum(out, ((d @ self.precision) * d).sum(axis=1))
        return np.where(np.isfinite(out), out, np.inf)


def share_below(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The share of a sorted reference strictly below each value."""
    return np.asarray(np.searchsorted(reference, np.asarray(values), side="left") / reference.size)


@dataclass(frozen=True)
class EvidenceReference:
    """The clean reference: the canary's ``log p(x)`` (sorted) at K samples and, where q(m|x) is
    used, the Gaussian over f(x), the canary's distances and its combined scores (sorted)."""

    scores: np.ndarray  # (N,) log p(x), ascending
    k: int
    m_model: MGaussian | None = None
    m_scores: np.ndarray | None = None  # (N,) distances, ascending
    combined: np.ndarray | None = None  # (N,) s(x') of the canary, ascending
    rule: Rule = DEFAULT_RULE
    class_model: MGaussian | None = None  # one mean per class (needs labelled clean inputs)
    class_scores: np.ndarray | None = None  # (N,) its distances, ascending

    @classmethod
    def from_scores(
        cls,
        scores: np.ndarray,
        k: int,
        *,
        features: np.ndarray | None = None,
        fit_features: np.ndarray | None = None,
        fit_labels: np.ndarray | None = None,
        rule: Rule = DEFAULT_RULE,
        class_ridge: float = CLASS_RIDGE,
    ) -> EvidenceReference:
        """From the canary's ``log p(x)`` and, optionally, its q(m|x) summaries ``features`` (same
        rows) with the Gaussian fitted on ``fit_features`` (other clean inputs; default the same)
        and, given their labels ``fit_labels``, the class Gaussian fitted on them too."""
        values = np.asarray(scores, dtype=np.float64)
        keep = np.isfinite(values)
        if not keep.any():
            raise ValueError("the clean reference holds no finite log p(x)")
        ref = cls(np.sort(values[keep]), k, rule=rule)
        if features is None:
            return ref
        feats = np.asarray(features, dtype=np.float64)[keep]
        fit = feats if fit_features is None else fit_features
        m_model = MGaussian.fit(fit)
        m_scores = np.sort(m_model.distance(feats))
        with_m = cls(ref.scores, k, m_model, m_scores, rule=rule)
        combined = np.sort(with_m._raw(values[keep], feats))
        class_model = class_scores = None
        if fit_labels is not None:
            class_model = MGaussian.fit(fit, fit_labels, class_ridge)
            class_scores = np.sort(class_model.distance(feats))
        return cls(ref.scores, k, m_model, m_scores, combined, rule, class_model, class_scores)

    def _evidence_share(self, log_px: np.ndarray) -> np.ndarray:
        above = self.scores.size - np.searchsorted(self.scores, np.asarray(log_px), side="right")
        return np.asarray(above / self.scores.size)

    def _raw(self, log_px: np.ndarray, features: np.ndarray) -> np.ndarray:
        assert self.m_model is not None
        assert self.m_scores is not None
        u_m = share_below(self.m_scores, self.m_model.distance(features))
        return np.asarray(np.maximum(self._evidence_share(log_px), u_m))

    def unusual(
        self, log_px: np.ndarray, features: np.ndarray | None = None, rule: Rule | None = None
    ) -> np.ndarray:
        """The unusual score ``(B,)`` of inputs with evidence ``log_px`` and q(m|x) summaries
        ``features`` by ``rule`` (default the reference's own); the evidence rule where the
        reference or the call has no q(m|x), the ``m`` rule for ``m_class`` where it has no class
        Gaussian."""
        rule = rule or self.rule
        if rule == "evidence" or self.m_model is None or features is None:
            return self._evidence_share(log_px)
        assert self.m_scores is not None
        assert self.combined is not None
        if rule == "m_class" and self.class_model is not None and self.class_scores is not None:
            return share_below(self.class_scores, self.class_model.distance(features))
        if rule in ("m", "m_class"):
            return share_below(self.m_scores, self.m_model.distance(features))
        return share_below(self.combined, self._raw(log_px, features))


def route(log_ws: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Answer each input with the version that explains it best.

    The paper's manipulation m is per input; with one adapted version per manipulation, the input's
    version is the one with the highest evidence, ``argmax_v log p_v(x)`` with
    ``log p_v(x) = logsumexp_c log p_v(x, y_c)`` (eq. 6's weights under version v). Takes each
    version's per-class log-weights ``(B, C)``; returns the chosen version's index per input ``(B,)``
    and the chosen rows ``(B, C)``. Ties go to the earliest version (the served one comes first).
    """
    if not log_ws:
        raise ValueError("routing needs at least one version")
    evidence = np.stack([log_evidence(w) for w in log_ws])  # (V, B)
    evidence = np.where(np.isfinite(evidence), evidence, -np.inf)
    chosen = evidence.argmax(axis=0)
    rows = np.stack(log_ws)[chosen, np.arange(chosen.size)]
    return chosen, rows
