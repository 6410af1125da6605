"""Selective test-time fine-tuning of NN_M^p and NN_M^q (paper eq. 8), and its promotion gate.

The shape follows tent: configure the model, collect the parameters to update, check the setup,
take steps under ``torch.enable_grad()``, reset. Everything that is not an m-dependent network
stays bit-identical. The same functions serve the evaluation scripts and the service's worker.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from cama.objectives import (
    SCREEN_MARGIN,
    Prediction,
    bayes_predict,
    finetune_objective,
    index_cond,
    marginal_elbo,
    slice_cond,
)
from cama.protocol import CamaModel, all_classes
from cama.runtime import bf16_native


@dataclass(frozen=True)
class FinetuneConfig:
    """The adaptation recipe: eq. 8, Adam on NN_M^p and NN_M^q, the one definition of its settings.

    Each checkpoint carries its model's recipe (``adapt_recipe`` in its provenance); the service,
    the evaluations and the benchmarks build it with :meth:`from_dict`. The defaults are the image
    recipe; :data:`MEASUREMENT_RECIPE` is the measurement model's.

    The number of optimiser steps is ``max(epochs * ceil(n / batch_size), min_steps)``, capped by
    ``max_steps``: a small batch still gets ``min_steps`` steps (many passes over it), a large one
    ``epochs`` passes. With ``lr_schedule="cosine"`` the step size stays at ``lr`` and then decays
    along half a cosine to zero over the last ``decay_fraction`` of the steps, so that the run ends
    on a settled iterate; ``"constant"`` is the paper's plain Adam. ``bf16``: bfloat16 autocast
    where the device computes it in hardware (:func:`cama.runtime.bf16_native`), float32 elsewhere.
    """

    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 32
    min_steps: int = 200
    max_steps: int | None = None
    alpha: float = 0.5
    bf16: bool = True
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    decay_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            (0.0 < self.lr <= 1.0, "lr must be in (0, 1]"),
            (1 <= self.epochs <= 1000, "epochs must be in [1, 1000]"),
            (1 <= self.batch_size <= 4096, "batch_size must be in [1, 4096]"),
            (0 <= self.min_steps <= 100_000, "min_steps must be in [0, 100000]"),
            (self.max_steps is None or 1 <= self.max_steps <= 1_000_000, "max_steps must be in [1, 1000000]"),
            (0.0 <= self.alpha <= 1.0, "alpha must be in [0, 1]"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be 'constant' or 'cosine'"),
            (0.0 < self.decay_fraction <= 1.0, "decay_fraction must be in (0, 1]"),
            (0 <= self.seed < 2**31, "seed must be in [0, 2**31)"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def steps(self, n: int) -> int:
        """Optimiser steps for ``n`` unlabelled inputs."""
        total = max(self.epochs * max(1, math.ceil(n / self.batch_size)), self.min_steps)
        return total if self.max_steps is None else min(total, self.max_steps)

    def as_dict(self) -> dict[str, Any]:
        """Every setting, by name (what a checkpoint's ``adapt_recipe`` stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: FinetuneConfig | None = None) -> FinetuneConfig:
        """``base`` (default: the defaults) with the settings in ``data``; unknown names, a wrong
        type or a value out of range raise ``ValueError``."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown recipe settings {unknown}; known: {sorted(known)}")
        for name, value in data.items():
            if not _recipe_type_ok(name, value):
                raise ValueError(f"{name} has the wrong type: {value!r}")
        return dataclasses.replace(base or cls(), **data)


def _recipe_type_ok(name: str, value: Any) -> bool:
    """Strict types for recipe settings: no booleans as numbers, no strings as numbers."""
    if name == "bf16":
        return isinstance(value, bool)
    if name == "lr_schedule":
        return isinstance(value, str)
    if name == "max_steps" and value is None:
        return True
    if name in ("lr", "alpha", "decay_fraction"):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool)


# the measurement model's recipe (paper section 4.2): its small tables adapt with plain Adam
MEASUREMENT_RECIPE = FinetuneConfig(
    lr=1e-3, epochs=20, batch_size=50, min_steps=0, alpha=0.9, bf16=False, lr_schedule="constant"
)


@dataclass(frozen=True)
class StepResult:
    """One step's objective (eq. 8) and its two terms."""

    objective: float
    clean_elbo: float
    test_elbo: float
    lr: float = 0.0  # the step size this step was taken with


@dataclass
class FinetuneReport:
    """What a fine-tuning run did."""

    steps: int = 0
    cancelled: bool = False
    history: list[StepResult] = field(default_factory=list)


def collect_params(model: CamaModel) -> list[nn.Parameter]:
    """The parameters of NN_M^p and NN_M^q."""
    return model.m_parameters()


def configure_model(model: CamaModel) -> None:
    """Freeze everything, then let only NN_M^p and NN_M^q learn."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in collect_params(model):
        p.requires_grad_(True)


def check_model(model: CamaModel) -> None:
    """Refuse a model whose trainable set is not exactly NN_M^p and NN_M^q."""
    selected = {id(p) for p in collect_params(model)}
    if not selected:
        raise ValueError("the model has no m-dependent parameters to fine-tune")
    for name, p in model.named_parameters():
        if p.requires_grad != (id(p) in selected):
            raise ValueError(f"parameter {name} is trainable={p.requires_grad}, expected the opposite")


def snapshot(model: CamaModel) -> dict[str, Tensor]:
    """A copy of the whole state, for :func:`reset`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reset(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Restore the state taken by :func:`snapshot`, exactly."""
    model.load_state_dict(state, strict=True)


@torch.enable_grad()
def finetune_step(
    model: CamaModel,
    optimizer: torch.optim.Optimizer,
    clean: tuple[Tensor, Tensor],
    test_x: Tensor,
    alpha: float,
    *,
    bf16: bool = False,
    clean_cond: Any = None,
    test_cond: Any = None,
) -> StepResult:
    """One gradient step on eq. 8 (clean replay term with weight alpha, ELBO(x) on test data)."""
    autocast = torch.autocast(test_x.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        objective, clean_elbo, test_elbo = finetune_objective(
            model, clean, test_x, alpha, cond_clean=clean_cond, cond_test=test_cond
        )
    optimizer.zero_grad(set_to_none=True)
    (-objective).backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return StepResult(
        objective.item(), clean_elbo.item(), test_elbo.item(), float(optimizer.param_groups[0]["lr"])
    )


def step_size_factor(total: int, decay_fraction: float, step: int) -> float:
    """The cosine schedule's factor on ``lr`` at 0-based ``step`` of ``total``: 1 until the last
    ``decay_fraction`` of the steps, then half a cosine from 1 towards 0."""
    decay = max(1, round(total * decay_fraction))
    into = step - (total - decay)
    return 1.0 if into <= 0 else 0.5 * (1.0 + math.cos(math.pi * into / decay))


def finetune(
    model: CamaModel,
    clean_x: Tensor,
    clean_y: Tensor,
    test_x: Tensor,
    cfg: FinetuneConfig,
    *,
    on_progress: Callable[[float, StepResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    clean_cond: Any = None,
    test_cond: Any = None,
) -> FinetuneReport:
    """Fine-tune NN_M^p and NN_M^q on unlabelled ``test_x`` with a clean replay sample (eq. 8).

    Each step pairs a mini-batch of ``test_x`` with a random mini-batch of the labelled clean data.
    ``clean_cond`` and ``test_cond`` carry the extra observed variables of each row (a tensor or a
    tuple of tensors, e.g. ``(a, c)`` for measurement data; ``None`` for images) and are indexed
    with the same rows. ``on_progress(fraction, step)`` reports progress; ``should_stop()``
    cancels between steps.
    """
    configure_model(model)
    check_model(model)
    params = collect_params(model)
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    n = test_x.shape[0]
    total = cfg.steps(n)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, partial(step_size_factor, total, cfg.decay_fraction))
        if cfg.lr_schedule == "cosine"
        else None
    )
    report = FinetuneReport()
    bf16 = cfg.bf16 and bf16_native(test_x.device)  # emulated bfloat16 is slower than float32
    model.train()  # type: ignore[attr-defined]
    try:
        while report.steps < total:
            order = rng.permutation(n)
            for start in range(0, n, cfg.batch_size):
                if report.steps >= total:
                    break
                if should_stop is not None and should_stop():
                    report.cancelled = True
                    return report
                idx = torch.from_numpy(order[start : start + cfg.batch_size])
                clean_idx = torch.from_numpy(rng.integers(0, clean_x.shape[0], size=idx.shape[0]))
                step = finetune_step(
                    model,
                    optimizer,
                    (clean_x[clean_idx], clean_y[clean_idx]),
                    test_x[idx],
                    cfg.alpha,
                    bf16=bf16,
                    clean_cond=index_cond(clean_cond, clean_idx),
                    test_cond=index_cond(test_cond, idx),
                )
                if scheduler is not None:
                    scheduler.step()
                report.steps += 1
                report.history.append(step)
                if on_progress is not None:
                    on_progress(report.steps / total, step)
    finally:
        model.eval()  # type: ignore[attr-defined]
        for p in model.parameters():
            p.requires_grad_(False)
    return report


# --- promotion gate -------------------------------------------------------------------------


@dataclass(frozen=True)
class GateConfig:
    """The promotion gate's settings, the one definition of them: the service's settings
    (``CAMA_GATE__<FIELD>``), its job runner, the evaluations and the docs' list of checks
    (:data:`GATE_CHECKS`) read these fields. ``None`` switches a check off.

    A new version is promoted only if every check that is on holds (:func:`promotion_gate`):

    - ``max_clean_drop``: clean canary accuracy falls by at most this fraction (0.005: half a point);
    - ``min_elbo_gain``: the held-out mean ELBO(x) (eq. 7) rises by more than this many nats;
    - ``max_label_kl_rise``: the held-out predicted-label histogram moves away from p(y) by at most
      this many nats (:func:`label_marginal_kl`; a batch whose true labels are far from p(y), e.g.
      all one class, needs it relaxed or off);
    - ``max_confidence_drop``, ``min_confidence``: the held-out mean confidence max_c p(y_c|x)
      falls by at most the first and stays at least the second: an adaptation that explains the
      batch without the label (random noise images, say) leaves the posterior flat;
    - ``max_changed_share``: at most this share of the held-out inputs changes its predicted label;
    - ``min_explained_share``: of the held-out inputs whose label changes, at least this share
      is explained better by the new version than the batch as a whole: its own ELBO(x) gain
      exceeds the held-out median gain by more than ``explain_margin`` nats;
    - ``min_confident_agreement``: on the held-out inputs the base predicted with confidence at
      least ``confident``, the new version agrees with the base on at least this share;
    - ``max_class_share_fall``: no class's share of the held-out predictions falls by more than
      this (collapse onto fewer classes).

    The per-input checks compare the two versions input by input on the held-out part; their
    thresholds are chosen on the validation suite (``python -m experiments.evaluate_mnistc --suite
    validation``, ``docs/results/gate.md``). Predictions use the served path: eq. 6 with ``k``
    samples behind the first-sample screen of ``screen`` nats (None: all K everywhere).
    """

    max_clean_drop: float | None = 0.005
    min_elbo_gain: float | None = 0.0
    max_label_kl_rise: float | None = 0.1
    max_confidence_drop: float | None = 0.2
    # a batch that no class explains (noise, another kind of image) is not a manipulation of the
    # classes: after adapting, the validation suite's manipulations keep 0.89-1.0 and a batch of
    # uniform noise 0.31-0.35
    min_confidence: float | None = 0.5
    max_changed_share: float | None = None
    # off by default: 0.5 separates the first four validation jobs (docs/m_pathway.md), but a fifth
    # validation job that gained (blobs) is refused by it; to be chosen again on the whole suite
    min_explained_share: float | None = None
    explain_margin: float = 0.0
    min_confident_agreement: float | None = None
    confident: float = 0.99
    max_class_share_fall: float | None = None
    k: int = 10
    seed: int = 0
    screen: float | None = SCREEN_MARGIN

    def __post_init__(self) -> None:
        def fraction(value: float | None) -> bool:
            return value is None or 0.0 <= value <= 1.0

        checks = (
            (fraction(self.max_clean_drop), "max_clean_drop must be in [0, 1]"),
            (self.max_label_kl_rise is None or self.max_label_kl_rise >= 0, "max_label_kl_rise must be >= 0"),
            (fraction(self.max_confidence_drop), "max_confidence_drop must be in [0, 1]"),
            (fraction(self.min_confidence), "min_confidence must be in [0, 1]"),
            (fraction(self.max_changed_share), "max_changed_share must be in [0, 1]"),
            (fraction(self.min_explained_share), "min_explained_share must be in [0, 1]"),
            (fraction(self.min_confident_agreement), "min_confident_agreement must be in [0, 1]"),
            (0.0 <= self.confident <= 1.0, "confident must be in [0, 1]"),
            (fraction(self.max_class_share_fall), "max_class_share_fall must be in [0, 1]"),
            (self.k >= 1, "k must be >= 1"),
            (self.screen is None or self.screen >= 0.0, "screen must be >= 0"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def as_dict(self) -> dict[str, Any]:
        """Every setting, by name."""
        return dataclasses.asdict(self)


# each check of :func:`promotion_gate`: the GateConfig fields it reads, and what it refuses
GATE_CHECKS: dict[str, tuple[tuple[str, ...], str]] = {
    "clean": (("max_clean_drop",), "clean canary accuracy falls by more than the margin"),
    "elbo": (("min_elbo_gain",), "the held-out mean ELBO(x) does not rise"),
    "label_kl": (("max_label_kl_rise",), "the held-out label histogram moves away from p(y)"),
    "confidence_drop": (("max_confidence_drop",), "the held-out mean confidence falls"),
    "min_confidence": (("min_confidence",), "no class explains the held-out batch"),
    "changed": (("max_changed_share",), "too many held-out labels change"),
    "explained": (
        ("min_explained_share", "explain_margin"),
        "the labels that change are mostly on inputs the new version does not explain better",
    ),
    "confident_agreement": (
        ("min_confident_agreement", "confident"),
        "the new version overturns the base where the base was confident",
    ),
    "class_share": (("max_class_share_fall",), "a class loses its share of the predictions"),
}


@dataclass(frozen=True)
class GateEvaluation:
    """Label-free and canary evidence about one model; the per-input tuples follow the held-out
    inputs' order (empty: no per-input evidence, and the per-input checks have nothing to judge)."""

    clean_accuracy: float
    heldout_elbo: float
    heldout_label_kl: float = 0.0  # KL(predicted-label histogram || p(y)) on the held-out inputs
    heldout_confidence: float = 1.0  # mean max_c p(y_c|x) on the held-out inputs (eq. 6)
    labels: tuple[int, ...] = ()  # argmax_c p(y_c|x) per held-out input (eq. 6)
    confidences: tuple[float, ...] = ()  # max_c p(y_c|x) per held-out input
    elbos: tuple[float, ...] = ()  # ELBO(x) per held-out input (eq. 7)

    def as_dict(self) -> dict[str, Any]:
        """Every field, the per-input tuples as lists (what an evaluation's cache stores)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateEvaluation:
        """The evaluation :meth:`as_dict` wrote."""
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


@dataclass(frozen=True)
class HeldoutComparison:
    """The two versions compared input by input on the held-out part (:func:`compare_heldout`)."""

    changed_share: float = 0.0  # share of held-out inputs whose predicted label changes
    explained_share: float = 1.0  # share of the changed ones whose ELBO(x) gain beats the median's
    confident_inputs: int = 0  # held-out inputs the base predicted with confidence >= ``confident``
    confident_agreement: float = 1.0  # share of those on which the new version keeps the label
    class_share_fall: float = 0.0  # the largest fall of one class's share of the predictions


def compare_heldout(before: GateEvaluation, after: GateEvaluation, cfg: GateConfig) -> HeldoutComparison:
    """Per-input evidence: with labels l, confidences c and ELBO(x) e of the base (b) and the new
    version (a) on the N held-out inputs, and gains g_i = e_a,i - e_b,i with median g~:

    changed = mean_i [l_a,i != l_b,i];
    explained = #{i: l_a,i != l_b,i and g_i - g~ > explain_margin} / #{i: l_a,i != l_b,i}
    (1 if no label changes);
    confident agreement = mean over {i: c_b,i >= confident} of [l_a,i == l_b,i];
    class-share fall = max_y (mean_i [l_b,i = y] - mean_i [l_a,i = y]).

    Without per-input evidence on either side, nothing changed."""
    if not before.labels or len(before.labels) != len(after.labels):
        return HeldoutComparison()
    lb, la = np.asarray(before.labels), np.asarray(after.labels)
    changed = la != lb
    gain = np.asarray(after.elbos, dtype=np.float64) - np.asarray(before.elbos, dtype=np.float64)
    explained = changed & (gain - np.median(gain) > cfg.explain_margin)
    confident = np.asarray(before.confidences) >= cfg.confident
    classes = int(max(lb.max(), la.max())) + 1
    share_b = np.bincount(lb, minlength=classes) / lb.size
    share_a = np.bincount(la, minlength=classes) / la.size
    return HeldoutComparison(
        changed_share=float(changed.mean()),
        explained_share=float(explained.sum() / changed.sum()) if changed.any() else 1.0,
        confident_inputs=int(confident.sum()),
        confident_agreement=float((~changed[confident]).mean()) if confident.any() else 1.0,
        class_share_fall=float((share_b - share_a).max()),
    )


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote, with the evidence and the reasons for a refusal."""

    accepted: bool
    before: GateEvaluation
    after: GateEvaluation
    reasons: tuple[str, ...]
    heldout: HeldoutComparison = field(default_factory=HeldoutComparison)
    refused_by: tuple[str, ...] = ()  # the :data:`GATE_CHECKS` that refused

    def as_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "reasons": list(self.reasons),
            "refused_by": list(self.refused_by),
            "clean_accuracy_before": self.before.clean_accuracy,
            "clean_accuracy_after": self.after.clean_accuracy,
            "heldout_elbo_before": self.before.heldout_elbo,
            "heldout_elbo_after": self.after.heldout_elbo,
            "heldout_label_kl_before": self.before.heldout_label_kl,
            "heldout_label_kl_after": self.after.heldout_label_kl,
            "heldout_confidence_before": self.before.heldout_confidence,
            "heldout_confidence_after": self.after.heldout_confidence,
            **{f"heldout_{k}": v for k, v in dataclasses.asdict(self.heldout).items()},
        }


class AdaptationCancelledError(Exception):
    """``should_stop()`` asked an adaptation to stop: nothing it changed is kept."""


@torch.no_grad()
def gate_evaluation(
    model: CamaModel,
    canary_x: Tensor,
    canary_y: Tensor,
    heldout_x: Tensor,
    cfg: GateConfig,
    cond_canary: Any = None,
    cond_heldout: Any = None,
    *,
    should_stop: Callable[[], bool] | None = None,
    chunk: int = 100,
) -> GateEvaluation:
    """Clean canary accuracy (eq. 6), held-out ELBO(x) (eq. 7), how far the held-out predictions'
    label histogram is from the prior (:func:`label_marginal_kl`) and their posterior confidence
    max_c p(y_c|x) (eq. 6), with fixed noise: means, and per held-out input its label, confidence
    and ELBO(x).

    ``should_stop()`` is asked between chunks of ``chunk`` inputs; when it says so,
    :class:`AdaptationCancelledError` is raised.
    """

    def stop_point() -> None:
        if should_stop is not None and should_stop():
            raise AdaptationCancelledError

    def predict(x: Tensor, cond: Any) -> Prediction:
        gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
        parts = []
        for i in range(0, x.shape[0], chunk):
            stop_point()
            sub = slice_cond(cond, i, i + chunk)
            parts.append(
                bayes_predict(model, x[i : i + chunk], sub, k=cfg.k, generator=gen, screen=cfg.screen)
            )
        return Prediction.concat(parts)

    pred = predict(canary_x, cond_canary)
    acc = float((pred.labels == canary_y).float().mean())
    gen = torch.Generator(device=heldout_x.device).manual_seed(cfg.seed)
    elbos = []
    for i in range(0, heldout_x.shape[0], chunk):
        stop_point()
        sub = slice_cond(cond_heldout, i, i + chunk)
        elbos.append(marginal_elbo(model, heldout_x[i : i + chunk], sub, generator=gen))
    heldout_pred = predict(heldout_x, cond_heldout)
    elbo = torch.cat(elbos).float()
    confidence = heldout_pred.probs.max(dim=1).values.float()
    return GateEvaluation(
        clean_accuracy=acc,
        heldout_elbo=float(elbo.mean()),
        heldout_label_kl=label_marginal_kl(model, heldout_pred.labels, cond_heldout),
        heldout_confidence=float(confidence.mean()),
        labels=tuple(int(v) for v in heldout_pred.labels.tolist()),
        confidences=tuple(round(float(v), 5) for v in confidence.tolist()),
        elbos=tuple(round(float(v), 3) for v in elbo.tolist()),
    )


def label_marginal_kl(model: CamaModel, labels: Tensor, cond: Any = None) -> float:
    """KL(histogram of predicted labels || p(y)) in nats, p(y) averaged over the rows' ``cond``.

    In CAMA's causal graph m has no arrow into y, so a manipulation leaves the label marginal
    where the prior puts it. An adaptation that explains the data through m alone collapses the
    predictions onto a few classes (observed: the appendix-C pathway fine-tuned on noise labels
    everything with one class); this statistic exposes that without labels. The histogram is
    smoothed with half a count per class.
    """
    c = model.num_classes
    log_prior = model.log_prior_y(all_classes(c, labels.device), cond).reshape(c, -1)  # (C, 1 or B)
    prior = log_prior.float().exp().mean(dim=1)
    prior = prior / prior.sum()
    counts = torch.bincount(labels.long(), minlength=c).float() + 0.5
    hist = counts / counts.sum()
    return float((hist * (hist.log() - prior.log())).sum())


def promotion_gate(before: GateEvaluation, after: GateEvaluation, cfg: GateConfig) -> GateDecision:
    """Promote only if every check of :data:`GATE_CHECKS` that ``cfg`` switches on holds: clean
    accuracy held, the held-out ELBO(x) (eq. 7) rose, the held-out predictions did not collapse
    onto fewer classes nor lose their confidence, and, input by input (:func:`compare_heldout`),
    few labels changed, those that changed are inputs the new version explains better, and the
    base's confident predictions stand."""
    held = compare_heldout(before, after, cfg)
    refusals: list[tuple[str, str]] = []
    drop = before.clean_accuracy - after.clean_accuracy
    if cfg.max_clean_drop is not None and drop > cfg.max_clean_drop:
        refusals.append(
            (
                "clean",
                f"clean canary accuracy fell by {drop * 100:.2f} points "
                f"(limit {cfg.max_clean_drop * 100:.2f}): "
                f"{before.clean_accuracy:.4f} -> {after.clean_accuracy:.4f}",
            )
        )
    if cfg.max_label_kl_rise is not None:
        rise = after.heldout_label_kl - before.heldout_label_kl
        if rise > cfg.max_label_kl_rise:
            refusals.append(
                (
                    "label_kl",
                    f"predicted labels on the held-out batch moved away from p(y) by {rise:.3f} nats "
                    f"(limit {cfg.max_label_kl_rise:.3f}; KL {before.heldout_label_kl:.3f} -> "
                    f"{after.heldout_label_kl:.3f}): the adaptation collapses the classes",
                )
            )
    if cfg.max_confidence_drop is not None:
        fall = before.heldout_confidence - after.heldout_confidence
        if fall > cfg.max_confidence_drop:
            refusals.append(
                (
                    "confidence_drop",
                    f"mean confidence on the held-out batch fell by {fall:.3f} (limit "
                    f"{cfg.max_confidence_drop:.3f}; {before.heldout_confidence:.3f} -> "
                    f"{after.heldout_confidence:.3f}): the adapted model explains the batch "
                    "without the label",
                )
            )
    if cfg.min_confidence is not None and after.heldout_confidence < cfg.min_confidence:
        refusals.append(
            (
                "min_confidence",
                f"mean confidence on the held-out batch is {after.heldout_confidence:.3f} after adapting "
                f"(at least {cfg.min_confidence:.3f} needed): no class explains the batch",
            )
        )
    gain = after.heldout_elbo - before.heldout_elbo
    if cfg.min_elbo_gain is not None and not gain > cfg.min_elbo_gain:
        refusals.append(
            (
                "elbo",
                f"held-out ELBO(x) did not rise by more than {cfg.min_elbo_gain:.2f} nats: "
                f"{before.heldout_elbo:.2f} -> {after.heldout_elbo:.2f}",
            )
        )
    if cfg.max_changed_share is not None and held.changed_share > cfg.max_changed_share:
        refusals.append(
            (
                "changed",
                f"{held.changed_share:.1%} of the held-out labels change (at most "
                f"{cfg.max_changed_share:.1%} allowed)",
            )
        )
    if cfg.min_explained_share is not None and held.explained_share < cfg.min_explained_share:
        refusals.append(
            (
                "explained",
                f"of the {held.changed_share:.1%} of held-out inputs whose label changes, "
                f"{held.explained_share:.1%} gain more ELBO(x) than the median input by more than "
                f"{cfg.explain_margin:.1f} nats (at least {cfg.min_explained_share:.1%} needed): the "
                "labels change where the adapted model does not explain the input better",
            )
        )
    if cfg.min_confident_agreement is not None and held.confident_agreement < cfg.min_confident_agreement:
        refusals.append(
            (
                "confident_agreement",
                f"the adapted model keeps {held.confident_agreement:.1%} of the base's labels on the "
                f"{held.confident_inputs} held-out inputs the base was at least {cfg.confident:.2f} sure "
                f"of (at least {cfg.min_confident_agreement:.1%} needed)",
            )
        )
    if cfg.max_class_share_fall is not None and held.class_share_fall > cfg.max_class_share_fall:
        refusals.append(
            (
                "class_share",
                f"a class's share of the held-out predictions falls by {held.class_share_fall:.3f} (at "
                f"most {cfg.max_class_share_fall:.3f} allowed): the predictions collapse onto fewer classes",
            )
        )
    return GateDecision(
        accepted=not refusals,
        before=before,
        after=after,
        reasons=tuple(r for _, r in refusals),
        heldout=held,
        refused_by=tuple(c for c, _ in refusals),
    )


# --- adapt, then judge ------------------------------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    """Labelled clean data: eq. 8's replay term, or the gate's canary set."""

    x: Tensor
    y: Tensor
    cond: Any = None


@dataclass(frozen=True)
class AdaptOutcome:
    """What :func:`adapt_and_judge` did: the gate's decision and the fine-tuning run."""

    decision: GateDecision
    report: FinetuneReport
    finetune_seconds: float
    train_inputs: int
    heldout_inputs: int

    @property
    def accepted(self) -> bool:
        return self.decision.accepted

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a job record or a version's manifest."""
        before, after = self.decision.before, self.decision.after
        out = {
            "steps": float(self.report.steps),
            "finetune_seconds": round(self.finetune_seconds, 3),
            "train_inputs": float(self.train_inputs),
            "heldout_inputs": float(self.heldout_inputs),
            "canary_accuracy_before": before.clean_accuracy,
            "canary_accuracy_after": after.clean_accuracy,
            "heldout_elbo_before": before.heldout_elbo,
            "heldout_elbo_after": after.heldout_elbo,
            "heldout_label_kl_before": before.heldout_label_kl,
            "heldout_label_kl_after": after.heldout_label_kl,
            "heldout_confidence_before": before.heldout_confidence,
            "heldout_confidence_after": after.heldout_confidence,
            "heldout_changed_share": self.decision.heldout.changed_share,
            "heldout_explained_share": self.decision.heldout.explained_share,
            "heldout_confident_agreement": self.decision.heldout.confident_agreement,
            "heldout_class_share_fall": self.decision.heldout.class_share_fall,
        }
        if self.report.history:
            out["final_objective"] = self.report.history[-1].objective
        return out


HOLDOUT_FRACTION = 0.2  # of an unlabelled adaptation batch, held out for the gate by default


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(heldout, train)`` of an unlabelled batch of ``n``: a seeded permutation, its
    first ``round(fraction * n)`` (at least 1) held out for the gate."""
    if n < 2:
        raise ValueError("an adaptation batch needs at least 2 inputs")
    order = np.random.default_rng(seed).permutation(n)
    n_hold = min(n - 1, max(1, round(fraction * n)))
    return order[:n_hold], order[n_hold:]


def adapt_and_judge(
    model: CamaModel,
    train_x: Tensor,
    heldout_x: Tensor,
    recipe: FinetuneConfig,
    gate: GateConfig,
    *,
    replay: Labelled,
    canary: Labelled,
    train_cond: Any = None,
    heldout_cond: Any = None,
    keep_refused: bool = False,
    on_progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AdaptOutcome:
    """Gate evidence before, selective fine-tuning on ``train_x`` (eq. 8), evidence after, and the
    promotion gate's decision: the one adapt-then-judge sequence of the service and the evaluations.

    The model is changed in place. A refused adaptation is undone (the model restored bit for bit)
    unless ``keep_refused``; a cancelled one (``should_stop()``, asked between steps and between
    chunks of the gate's evaluations) is undone and raises :class:`AdaptationCancelledError`.
    ``on_progress(fraction)`` reports progress in [0, 1].
    """
    state = snapshot(model)
    gate_share = 0.08  # the progress share of each gate evaluation

    def progress(fraction: float) -> None:
        if on_progress is not None:
            on_progress(fraction)

    def evaluate() -> GateEvaluation:
        return gate_evaluation(
            model, canary.x, canary.y, heldout_x, gate, canary.cond, heldout_cond, should_stop=should_stop
        )

    try:
        before = evaluate()
        progress(gate_share)
        t0 = time.perf_counter()
        report = finetune(
            model,
            replay.x,
            replay.y,
            train_x,
            recipe,
            on_progress=lambda f, _: progress(gate_share + (1 - 2 * gate_share) * f),
            should_stop=should_stop,
            clean_cond=replay.cond,
            test_cond=train_cond,
        )
        seconds = time.perf_counter() - t0
        if report.cancelled:
            raise AdaptationCancelledError
        after = evaluate()
    except BaseException:
        reset(model, state)  # type: ignore[arg-type]
        raise
    decision = promotion_gate(before, after, gate)
    if not decision.accepted and not keep_refused:
        reset(model, state)  # type: ignore[arg-type]
    progress(1.0)
    return AdaptOutcome(
        decision=decision,
        report=report,
        finetune_seconds=seconds,
        train_inputs=int(train_x.shape[0]),
        heldout_inputs=int(heldout_x.shape[0]),
    )


def adapt_batch(
    model: CamaModel,
    batch_x: Tensor,
    recipe: FinetuneConfig,
    gate: GateConfig,
    *,
    replay: Labelled,
    canary: Labelled,
    batch_cond: Any = None,
    holdout_fraction: float = HOLDOUT_FRACTION,
    keep_refused: bool = False,
    on_progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AdaptOutcome:
    """What ``POST /adapt`` does with one unlabelled batch: hold out ``holdout_fraction`` of it for
    the gate (:func:`holdout_split`, seeded by the recipe), adapt on the rest and judge
    (:func:`adapt_and_judge`); a refused adaptation leaves the model as it was (unless
    ``keep_refused``: an evaluation that scores what the gate refused)."""
    held, train = (
        torch.from_numpy(i) for i in holdout_split(batch_x.shape[0], holdout_fraction, recipe.seed)
    )
    held, train = held.to(batch_x.device), train.to(batch_x.device)
    return adapt_and_judge(
        model,
        batch_x[train],
        batch_x[held],
        recipe,
        gate,
        replay=replay,
        canary=canary,
        train_cond=index_cond(batch_cond, train),
        heldout_cond=index_cond(batch_cond, held),
        keep_refused=keep_refused,
        on_progress=on_progress,
        should_stop=should_stop,
    )
