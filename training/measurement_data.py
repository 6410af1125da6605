"""The synthetic measurement data of the paper (appendix C, "Measurement data generation").

Structural equations over the Markov blanket of Y (fig. 5):

    A ~ N(0, I_5)                                  parents
    Y = argmax_j [g(A)_j + sigma_y e_j],  g(A) = 0.2 A^2 - 0.8 A (elementwise)   5 classes
    C ~ N(0, I_5)                                  co-parents
    X = f(Y, C) + sigma_x e_x                      10 children

``f`` is quadratic in ``u = [onehot(Y), C]``: ``f_j(u) = w_j . u + s_q u^T Q_j u`` with ``w`` and
``Q`` drawn from N(0, 1) once per generator seed, then normalised (before the noise) to zero mean
and unit variance per child with constants measured once on a large reference sample from the clean
distribution. The constants belong to the equations, so a manipulation of C regenerates X through
the very same ``f`` (fig. 14), while a manipulation of X shifts X directly (fig. 15). The exogenous
noise of each sample is kept, so a manipulated copy differs from its original only through the
manipulation.

Shift magnitudes ``S`` are in standard deviations of the shifted variable: 1 for C, and
``sqrt(1 + sigma_x^2)`` for X (unit-variance ``f`` plus independent noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

TARGET = "y"


@dataclass(frozen=True)
class GeneratorConfig:
    """Sizes and noise levels of the generator (the appendix fixes the sizes, not the noise)."""

    num_classes: int = 5
    dim_c: int = 5
    dim_x: int = 10
    noise_y: float = 0.5
    noise_x: float = 0.5
    quad_scale: float = 0.3
    reference_size: int = 100_000

    @property
    def dim_a(self) -> int:
        """One parent per class: Y is the argmax over the elementwise g(A)."""
        return self.num_classes


@dataclass(frozen=True)
class Sample:
    """One draw: ``a (N, dA)``, ``c (N, dC)``, ``x (N, dX)`` float32, ``y (N,)`` int64, noise ``eps_x``."""

    a: np.ndarray
    c: np.ndarray
    x: np.ndarray
    y: np.ndarray
    eps_x: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray | slice) -> Sample:
        """The rows ``idx``."""
        return Sample(self.a[idx], self.c[idx], self.x[idx], self.y[idx], self.eps_x[idx])


def g(a: np.ndarray) -> np.ndarray:
    """The quadratic score of the parents, ``0.2 A^2 - 0.8 A`` elementwise."""
    return 0.2 * a**2 - 0.8 * a


@dataclass(frozen=True)
class StructuralEquations:
    """The mechanisms A -> Y and (Y, C) -> X of one generator seed."""

    config: GeneratorConfig
    w: np.ndarray  # (dX, dU), dU = num_classes + dC
    q: np.ndarray  # (dX, dU, dU)
    f_mean: np.ndarray  # (dX,)
    f_std: np.ndarray  # (dX,)

    @classmethod
    def create(cls, seed: int, config: GeneratorConfig | None = None) -> StructuralEquations:
        """Draw the parameters of ``f`` for ``seed`` and measure its normalisation constants."""
        cfg = config or GeneratorConfig()
        param_seq, ref_seq = np.random.SeedSequence([seed, 0]).spawn(2)
        rng = np.random.default_rng(param_seq)
        d_u = cfg.num_classes + cfg.dim_c
        w = rng.standard_normal((cfg.dim_x, d_u))
        q = rng.standard_normal((cfg.dim_x, d_u, d_u))
        unnormalised = cls(cfg, w, q, np.zeros(cfg.dim_x), np.ones(cfg.dim_x))
        ref_rng = np.random.default_rng(ref_seq)
        a = ref_rng.standard_normal((cfg.reference_size, cfg.dim_a))
        y = unnormalised.label(a, ref_rng)
        c = ref_rng.standard_normal((cfg.reference_size, cfg.dim_c))
        raw = unnormalised.f(y, c)
        return replace(unnormalised, f_mean=raw.mean(0), f_std=raw.std(0))

    @property
    def x_std(self) -> float:
        """Population standard deviation of each child: unit-variance ``f`` plus the noise."""
        return math.sqrt(1.0 + self.config.noise_x**2)

    @property
    def c_std(self) -> float:
        """Population standard deviation of each co-parent."""
        return 1.0

    def label(self, a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Y = argmax(g(A) + sigma_y e), ``(N,)`` int64."""
        noise = self.config.noise_y * rng.standard_normal(a.shape)
        labels: np.ndarray = np.argmax(g(a) + noise, axis=1).astype(np.int64)
        return labels

    def f(self, y: np.ndarray, c: np.ndarray) -> np.ndarray:
        """The normalised quadratic mechanism f(Y, C), ``(N, dX)``."""
        u = np.concatenate([np.eye(self.config.num_classes)[y], c], axis=1)  # (N, dU)
        quad = np.einsum("nu,juv,nv->nj", u, self.q, u)
        raw = u @ self.w.T + self.config.quad_scale * quad
        out: np.ndarray = (raw - self.f_mean) / self.f_std
        return out

    def sample(self, n: int, rng: np.random.Generator) -> Sample:
        """Draw ``n`` rows from the clean distribution."""
        cfg = self.config
        a = rng.standard_normal((n, cfg.dim_a))
        y = self.label(a, rng)
        c = rng.standard_normal((n, cfg.dim_c))
        eps_x = cfg.noise_x * rng.standard_normal((n, cfg.dim_x))
        x = self.f(y, c) + eps_x
        return Sample(
            a.astype(np.float32), c.astype(np.float32), x.astype(np.float32), y, eps_x.astype(np.float32)
        )

    # --- manipulations --------------------------------------------------------------------------
    def shift_coparents(self, data: Sample, s: float) -> Sample:
        """do(C = C + S sd(C)) for every co-parent; X is regenerated through the same f and noise."""
        c = data.c.astype(np.float64) + s * self.c_std
        x = self.f(data.y, c) + data.eps_x
        return replace(data, c=c.astype(np.float32), x=x.astype(np.float32))

    def shift_children(self, data: Sample, s: float) -> Sample:
        """X -> X + S sd(X) for every child, directly (the mechanism f is bypassed)."""
        return replace(data, x=(data.x + np.float32(s * self.x_std)).astype(np.float32))


@dataclass(frozen=True)
class Dataset:
    """A generator seed's equations and its train / validation / test draws."""

    seed: int
    equations: StructuralEquations
    train: Sample
    val: Sample
    test: Sample


def make_dataset(
    seed: int,
    *,
    n_train: int = 450,
    n_val: int = 50,
    n_test: int = 500,
    config: GeneratorConfig | None = None,
) -> Dataset:
    """The paper's split by default: 1000 rows, 450 train, 50 validation, 500 test."""
    eq = StructuralEquations.create(seed, config)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    data = eq.sample(n_train + n_val + n_test, rng)
    return Dataset(
        seed=seed,
        equations=eq,
        train=data.subset(slice(0, n_train)),
        val=data.subset(slice(n_train, n_train + n_val)),
        test=data.subset(slice(n_train + n_val, None)),
    )


# --- tables -------------------------------------------------------------------------------------


def column_names(config: GeneratorConfig | None = None) -> dict[str, list[str]]:
    """Column names of the synthetic table by role: ``a1..``, ``c1..``, ``x1..``."""
    cfg = config or GeneratorConfig()
    return {
        "parents": [f"a{i + 1}" for i in range(cfg.dim_a)],
        "coparents": [f"c{i + 1}" for i in range(cfg.dim_c)],
        "children": [f"x{i + 1}" for i in range(cfg.dim_x)],
    }


def schema_dict(config: GeneratorConfig | None = None) -> dict[str, object]:
    """The declared schema of the synthetic table (the format ``training.measurement_schema`` reads)."""
    return {"target": TARGET, **column_names(config)}


def to_frame(data: Sample) -> pd.DataFrame:
    """A table with one column per variable and the class index in ``y``."""
    cfg = GeneratorConfig(num_classes=data.a.shape[1], dim_c=data.c.shape[1], dim_x=data.x.shape[1])
    names = column_names(cfg)
    frame = pd.DataFrame(
        np.concatenate([data.a, data.c, data.x], axis=1).astype(np.float64),
        columns=[*names["parents"], *names["coparents"], *names["children"]],
    )
    frame[TARGET] = data.y
    return frame
