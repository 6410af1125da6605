"""How far eq. 11 can carry a co-parent shift when the mechanism's form is known (fig. 14's ceiling).

    python -m experiments.measurement_oracles              # 5 generator seeds, S in {0, 0.5, 1, 2, 3}

Two Bayes-rule classifiers p(y|a, x, c) ∝ p(y|a) p(x|y, c) (eq. 11) on the synthetic data of
``training.measurement_data``, both with the true p(y|a) (Monte Carlo over the label noise):

- ``true_f``: the true mechanism f and noise level: the best any model can do.
- ``least_squares``: the true *form* of f (every monomial of degree <= 2 in [onehot(y), c]) with
  its coefficients and the noise level estimated by least squares from the 450 training rows: the
  best a correctly specified decoder can do from the paper's training set.

Co-parents are shifted as in fig. 14 (C -> C + S sd(C), X regenerated through f). Writes
``docs/results/measurement_oracles.json``; not part of ``metrics.json`` (no model of the product).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cama.runtime import atomic_write
from training.measurement_data import Sample, StructuralEquations, g, make_dataset


def label_prior(eq: StructuralEquations, a: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """The true p(y|a) = P(argmax_j [g(a)_j + sigma_y e_j] = y), ``(N, C)``, by Monte Carlo."""
    scores = g(a)[:, None, :] + eq.config.noise_y * rng.standard_normal((a.shape[0], draws, a.shape[1]))
    counts = np.stack([(scores.argmax(-1) == j).mean(1) for j in range(a.shape[1])], axis=1)
    prior: np.ndarray = np.clip(counts, 1.0 / draws, None)
    return prior


def quadratic_features(y: np.ndarray, c: np.ndarray, num_classes: int) -> np.ndarray:
    """Every monomial of degree <= 2 in u = [onehot(y), c] (one-hot squares folded in), ``(N, F)``."""
    onehot = np.eye(num_classes)[y]
    rows, cols = np.triu_indices(c.shape[1])
    cross = (onehot[:, :, None] * c[:, None, :]).reshape(len(y), -1)
    return np.concatenate([onehot, c, cross, c[:, rows] * c[:, cols]], axis=1)


def bayes_accuracy(log_prior: np.ndarray, means: np.ndarray, var: np.ndarray, data: Sample) -> float:
    """Eq. 11 with Gaussian p(x|y, c) = N(means[:, y], diag(var)); ``means`` is ``(N, C, dX)``."""
    log_lik = -0.5 * (((data.x[:, None, :] - means) ** 2) / var + np.log(var)).sum(-1)
    return float(((log_prior + log_lik).argmax(1) == data.y).mean())


def evaluate_seed(seed: int, shifts: list[float], draws: int) -> dict[str, float]:
    """Both classifiers' accuracy on the clean and co-parent-shifted test rows of one seed."""
    ds = make_dataset(seed)
    eq, c_dim = ds.equations, ds.equations.config.num_classes
    phi = quadratic_features(ds.train.y, ds.train.c.astype(np.float64), c_dim)
    coef, *_ = np.linalg.lstsq(phi, ds.train.x.astype(np.float64), rcond=None)
    resid_var = ((ds.train.x - phi @ coef) ** 2).sum(0) / (len(phi) - phi.shape[1])
    true_var = np.full(eq.config.dim_x, eq.config.noise_x**2)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    log_prior = np.log(label_prior(eq, ds.test.a.astype(np.float64), draws, rng))
    out = {}
    for s in shifts:
        test = eq.shift_coparents(ds.test, s) if s else ds.test
        c = test.c.astype(np.float64)
        classes = range(c_dim)
        true_means = np.stack([eq.f(np.full(len(c), j), c) for j in classes], axis=1)
        ls_means = np.stack(
            [quadratic_features(np.full(len(c), j), c, c_dim) @ coef for j in classes], axis=1
        )
        key = "clean" if not s else f"coparent_shift.{s:g}"
        out[f"{key}.true_f"] = bayes_accuracy(log_prior, true_means, true_var, test)
        out[f"{key}.least_squares"] = bayes_accuracy(log_prior, ls_means, resid_var, test)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 3.0])
    parser.add_argument("--draws", type=int, default=4000, help="Monte Carlo draws for p(y|a)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/measurement_oracles.json"))
    args = parser.parse_args(argv)
    per_seed = [evaluate_seed(seed, args.shifts, args.draws) for seed in args.seeds]
    keys = list(per_seed[0])
    summary = {
        k: {"mean": float(np.mean([p[k] for p in per_seed])), "min": min(p[k] for p in per_seed)}
        for k in keys
    }
    print(f"{'':32}{'mean':>8}{'min':>8}")
    for k in keys:
        print(f"{k:32}{100 * summary[k]['mean']:>8.1f}{100 * summary[k]['min']:>8.1f}")
    command = "python -m experiments.measurement_oracles " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": command.strip(), "seeds": args.seeds, "per_seed": per_seed, "summary": summary}
    atomic_write(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
