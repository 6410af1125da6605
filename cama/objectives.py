"""The objectives and the Bayes-rule classifier of CAMA: the single copy of the paper's math.

Every function takes any model that follows :class:`cama.protocol.CamaModel` (images or
measurement data). Noise can be passed in explicitly (``eps_m``, ``eps_z``), which makes a
prediction replayable and lets an exported graph take its noise as an input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cama.distributions import (
    kl_to_standard_normal,
    log_normal,
    log_standard_normal,
    reparameterize,
)
from cama.protocol import CamaModel, all_classes, given_labels


@dataclass(frozen=True)
class Noise:
    """Standard-normal noise for one Bayes-rule prediction: ``m (K, B, dM)``, ``z (C, K, B, dZ)``."""

    m: Tensor
    z: Tensor


def sample_noise(
    model: CamaModel,
    batch: int,
    k: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Noise:
    """Draw the noise of eq. 6's importance sampler for ``batch`` inputs and ``k`` samples per class."""
    c = model.num_classes
    m = torch.randn(k, batch, model.dim_m, generator=generator, device=device)
    z = torch.randn(c, k, batch, model.dim_z, generator=generator, device=device)
    return Noise(m=m, z=z)


def _joint_elbo_terms(
    model: CamaModel,
    x: Tensor,
    y: Tensor,
    cond: Any,
    m: Tensor,
    eps_z: Tensor,
) -> Tensor:
    """E_q(z|x,y,m)[log p(x|y,z,m) + log p(z) - log q(z|x,y,m)] + log p(y) + log f(theta(m)), ``(C', B)``.

    ``m`` is ``(K, B, dM)``; the KL of z is analytic, the expectation over z uses ``eps_z``;
    ``log f`` is the model's factor on p(m) through its mechanisms (0 at m = 0 and for models
    without one, :meth:`cama.protocol.CamaModel.log_prior_mechanisms`).
    """
    ctx = model.prepare(x, m, cond)
    mu_z, logvar_z = model.infer_z(ctx, y)  # (C', K, B, dZ)
    z = reparameterize(mu_z, logvar_z, eps_z)
    rec = model.log_likelihood(x, ctx, y, z)  # (C', K, B)
    kl_z = kl_to_standard_normal(mu_z, logvar_z)  # (C', K, B)
    log_py = model.log_prior_y(y, cond)  # broadcastable to (C', 1, B)
    log_f = model.log_prior_mechanisms(ctx).mean(0)  # (B,)
    return (rec - kl_z).mean(1) + log_py[:, 0] + log_f


def intervention_elbo(
    model: CamaModel,
    x: Tensor,
    labels: Tensor,
    cond: Any = None,
    *,
    m0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Eq. 3, the intervention ELBO under do(m = m0) (m0 = 0 by default), ``(B,)``.

    ELBO(x, y, do(m=m0)) = E_q(z|x,y,m0)[log p(x|y,z,m0) + log p(y) + log p(z) - log q(z|x,y,m0)].
    """
    b = x.shape[0]
    m = torch.zeros(1, b, model.dim_m, device=x.device) if m0 is None else m0.expand(1, b, -1)
    y = given_labels(labels, model.num_classes).to(x.device)
    eps_z = torch.randn(1, 1, b, model.dim_z, generator=generator, device=x.device)
    return _joint_elbo_terms(model, x, y, cond, m, eps_z)[0]


def joint_elbo(
    model: CamaModel,
    x: Tensor,
    y: Tensor,
    cond: Any = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Eq. 4, ELBO(x, y) = E_q(z,m|x,y)[log p(x, y, z, m) - log q(z, m|x, y)], ``(C', B)``.

    q(z, m|x, y) = q(z|x, y, m) q(m|x); one sample of m and of z, both KLs analytic.
    ``y`` is one-hot, ``(1, 1, B, C)`` for given labels or ``(C, 1, 1, C)`` for every class.
    """
    b = x.shape[0]
    mu_m, logvar_m = model.infer_m(x, cond)  # (B, dM)
    eps_m = torch.randn(1, b, model.dim_m, generator=generator, device=x.device)
    m = reparameterize(mu_m, logvar_m, eps_m)  # (1, B, dM)
    eps_z = torch.randn(y.shape[0], 1, b, model.dim_z, generator=generator, device=x.device)
    kl_m = kl_to_standard_normal(mu_m, logvar_m)  # (B,)
    return _joint_elbo_terms(model, x, y, cond, m, eps_z) - kl_m


def labelled_joint_elbo(
    model: CamaModel,
    x: Tensor,
    labels: Tensor,
    cond: Any = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Eq. 4 for given labels, ``(B,)``."""
    y = given_labels(labels, model.num_classes).to(x.device)
    return joint_elbo(model, x, y, cond, generator=generator)[0]


def marginal_elbo(
    model: CamaModel,
    x: Tensor,
    cond: Any = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Eq. 7, ELBO(x) = log sum_c exp ELBO(x, y_c), computed in log space, ``(B,)``."""
    y = all_classes(model.num_classes, x.device)
    return torch.logsumexp(joint_elbo(model, x, y, cond, generator=generator), dim=0)


def augmented_objective(
    model: CamaModel,
    clean: tuple[Tensor, Tensor],
    manipulated: tuple[Tensor, Tensor],
    lam: float,
    *,
    cond_clean: Any = None,
    cond_manipulated: Any = None,
) -> Tensor:
    """Eq. 5, L_aug = lam E_D[ELBO(x, y, do(m=0))] + (1 - lam) E_D'[ELBO(x, y)] (to maximise)."""
    clean_term = intervention_elbo(model, clean[0], clean[1], cond_clean).mean()
    manip_term = labelled_joint_elbo(model, manipulated[0], manipulated[1], cond_manipulated).mean()
    return lam * clean_term + (1.0 - lam) * manip_term


def finetune_objective(
    model: CamaModel,
    clean: tuple[Tensor, Tensor],
    test_x: Tensor,
    alpha: float,
    *,
    cond_clean: Any = None,
    cond_test: Any = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 8, L_ft = alpha E_D[ELBO(x, y)] + (1 - alpha) E_D~[ELBO(x)] (to maximise).

    Returns ``(objective, mean clean ELBO(x, y), mean test ELBO(x))``.
    """
    clean_term = labelled_joint_elbo(model, clean[0], clean[1], cond_clean).mean()
    test_term = marginal_elbo(model, test_x, cond_test).mean()
    return alpha * clean_term + (1.0 - alpha) * test_term, clean_term, test_term


def _sample_log_weights(
    model: CamaModel, x: Tensor, cond: Any, y: Tensor, noise_m: Tensor, noise_z: Tensor
) -> Tensor:
    """log p(x|y,z_k,m_k) + log p(y) + log p(z_k) - log q(z_k|x,y,m_k) per sample, ``(C', K, B)``.

    m_k ~ q(m|x) is shared by every class hypothesis of ``y`` (``(C, 1, 1, C)`` for every class,
    ``(1, 1, B, C)`` for one class per input); z ~ q(z|x, y, m_k).
    """
    mu_m, logvar_m = model.infer_m(x, cond)  # (B, dM)
    m = reparameterize(mu_m, logvar_m, noise_m)  # (K, B, dM)
    ctx = model.prepare(x, m, cond)
    mu_z, logvar_z = model.infer_z(ctx, y)  # (C', K, B, dZ)
    z = reparameterize(mu_z, logvar_z, noise_z)
    return (
        model.log_likelihood(x, ctx, y, z)
        + model.log_prior_y(y, cond)
        + log_standard_normal(z)
        - log_normal(z, mu_z, logvar_z)
    )


def bayes_log_weights(
    model: CamaModel,
    x: Tensor,
    cond: Any = None,
    *,
    k: int = 10,
    noise: Noise | None = None,
    generator: torch.Generator | None = None,
    screen: float | None = None,
) -> Tensor:
    """Eq. 6, per-class log importance weights ``log (1/K) sum_k p(x|y_c,z_k,m)p(y_c)p(z_k)/q(z_k|x,y_c,m)``.

    m ~ q(m|x) once per sample k and shared by every class; z_c^k ~ q(z|x, y_c, m).
    Returns ``(B, C)``: un-normalised log p(x, y_c), usable as logits (also for attacks).
    ``screen`` (nats): the first-sample screen of :func:`screened_log_weights`.
    """
    b = x.shape[0]
    if noise is None:
        noise = sample_noise(model, b, k, generator=generator, device=x.device)
    if screen is not None:

        def every_class(part: Noise) -> Tensor:
            return bayes_log_weights(model, x, cond, noise=part)

        def one_class(idx: Tensor, labels: Tensor, part: Noise) -> Tensor:
            return class_log_weights(model, x[idx], labels, index_cond(cond, idx), noise=part)

        return screened_log_weights(every_class, one_class, noise, screen)
    k = noise.m.shape[0]
    y = all_classes(model.num_classes, x.device)  # (C, 1, 1, C)
    log_w = _sample_log_weights(model, x, cond, y, noise.m, noise.z)  # (C, K, B)
    return (torch.logsumexp(log_w, dim=1) - math.log(k)).transpose(0, 1)


def class_log_weights(
    model: CamaModel, x: Tensor, labels: Tensor, cond: Any = None, *, noise: Noise
) -> Tensor:
    """Eq. 6's log-weights of a few classes per input, ``(S, B)``: ``labels (S, B)`` names the
    classes (any may repeat), ``noise.m (K, B, dM)`` is shared by them and ``noise.z (S, K, B, dZ)``
    is each one's; the same numbers as :func:`bayes_log_weights`' for those classes, given the same
    noise. q(m|x) and the x-features of q(z) are computed once per input and sample."""
    y = nn.functional.one_hot(labels.long(), model.num_classes).float().unsqueeze(1)  # (S, 1, B, C)
    log_w = _sample_log_weights(model, x, cond, y.to(x.device), noise.m, noise.z)  # (S, K, B)
    return torch.logsumexp(log_w, dim=1) - math.log(noise.m.shape[0])


# The first-sample screen's default margin (nats), chosen on the validation split of MNIST's
# training set with the served model (``python -m benchmarks.predict --calibrate``): at this margin
# the first sample settles 85% of the inputs, and 1 in 3000 of those would have taken another
# label with all K samples.
SCREEN_MARGIN = 15.0


def undecided(first: Tensor, margin: float) -> Tensor:
    """Rows ``(B,)`` whose best and second-best first-sample log-weights are within ``margin``."""
    if first.shape[1] < 2:
        return torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
    top2 = torch.topk(first, 2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) < margin


def screened_log_weights(
    every_class: Callable[[Noise], Tensor],
    one_class: Callable[[Tensor, Tensor, Noise], Tensor],
    noise: Noise,
    margin: float,
    max_work: int | None = None,
) -> Tensor:
    """Eq. 6 that spends the K importance samples only on the classes that can still win.

    Stage 1 estimates every class's log-weight with the first sample of ``noise`` (K = 1). An input
    whose best class leads the second by at least ``margin`` nats is answered there. For every other
    input, each class within ``margin`` of its best gets the other K - 1 samples of the same noise,
    so its log-weight is exactly :func:`bayes_log_weights`'s; the other classes keep their
    first-sample estimate. The label differs from the K-sample one only if the later samples raise
    a class that was ``margin`` behind above the leader; the margin is chosen on validation data
    where that happens for almost none of the inputs (:data:`SCREEN_MARGIN`).

    ``every_class(noise)``: log-weights ``(B, C)`` of all inputs with ``noise``;
    ``one_class(rows, labels, noise)``: the log-weights ``(S, B')`` of classes ``labels (S, B')``
    of the inputs ``rows (B',)``, with ``noise.m (K', B', dM)`` and ``noise.z (S, K', B', dZ)``
    (:func:`class_log_weights`, any backend). ``max_work``: the most decoder passes
    (contenders x (K - 1) x inputs) of one ``one_class`` call; the open inputs are split into calls
    of at most that many, which bounds the memory of stage 2 and leaves every weight unchanged.
    """
    k = noise.m.shape[0]
    out = every_class(Noise(m=noise.m[:1], z=noise.z[:, :1]))  # (B, C), K = 1
    if k == 1:
        return out
    open_rows = torch.nonzero(undecided(out, margin)).flatten()  # (B',)
    if not open_rows.numel():
        return out
    first = out[open_rows]  # (B', C)
    contenders = first >= first.max(dim=1, keepdim=True).values - margin  # (B', C)
    s = int(contenders.sum(dim=1).max())
    # each open input's contenders, best first, padded with its best class: (S, B')
    order = torch.argsort(
        torch.where(contenders, first, torch.full_like(first, -torch.inf)), dim=1, descending=True
    )
    labels = order[:, :s].clone()
    valid = torch.arange(s, device=out.device).unsqueeze(0) < contenders.sum(dim=1, keepdim=True)
    labels[~valid] = labels[:, :1].expand_as(labels)[~valid]
    labels = labels.T  # (S, B')
    step = len(open_rows) if max_work is None else max(1, max_work // (s * (k - 1)))
    parts = []
    for start in range(0, len(open_rows), step):
        rows, part_labels = open_rows[start : start + step], labels[:, start : start + step]
        rest = Noise(m=noise.m[1:, rows], z=noise.z[part_labels, 1:, rows.unsqueeze(0)].permute(0, 2, 1, 3))
        parts.append(one_class(rows, part_labels, rest).to(out.dtype))  # (S, b): mean of samples 2..K
    later = torch.cat(parts, dim=1)  # (S, B')
    combined = torch.logaddexp(torch.gather(first, 1, labels.T).T, later + math.log(k - 1)) - math.log(k)
    out = out.clone()
    rows = open_rows.unsqueeze(0).expand_as(labels)
    out[rows[valid.T], labels[valid.T]] = combined[valid.T]
    return out


def index_cond(cond: Any, idx: Tensor) -> Any:
    """The rows ``idx`` of ``cond`` (a tensor, a tuple of tensors, or None)."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[idx]
    if isinstance(cond, tuple):
        return tuple(index_cond(part, idx) for part in cond)
    raise TypeError(f"unsupported cond type {type(cond).__name__}")


@dataclass(frozen=True)
class Prediction:
    """Bayes-rule prediction: per-class log-weights (logits), probabilities and labels."""

    log_weights: Tensor  # (B, C)
    probs: Tensor  # (B, C)
    labels: Tensor  # (B,)

    @staticmethod
    def concat(parts: list[Prediction]) -> Prediction:
        """The predictions of consecutive chunks as one."""
        return Prediction(
            log_weights=torch.cat([p.log_weights for p in parts]),
            probs=torch.cat([p.probs for p in parts]),
            labels=torch.cat([p.labels for p in parts]),
        )


@torch.no_grad()
def bayes_predict(
    model: CamaModel,
    x: Tensor,
    cond: Any = None,
    *,
    k: int = 10,
    chunk: int = 100,
    generator: torch.Generator | None = None,
    screen: float | None = None,
) -> Prediction:
    """Eq. 6, p(y|x) = softmax_c log-weights, in chunks of ``chunk`` inputs to bound memory
    (``screen``: :func:`screened_log_weights`' margin)."""
    logits = []
    for start in range(0, x.shape[0], chunk):
        sub_cond = slice_cond(cond, start, start + chunk)
        logits.append(
            bayes_log_weights(
                model, x[start : start + chunk], sub_cond, k=k, generator=generator, screen=screen
            )
        )
    log_w = torch.cat(logits)
    probs = torch.softmax(log_w, dim=1)
    return Prediction(log_weights=log_w, probs=probs, labels=probs.argmax(1))


def slice_cond(cond: Any, start: int, stop: int) -> Any:
    """Slice the per-example tensors of ``cond`` (a tensor, a tuple of tensors, or None)."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[start:stop]
    if isinstance(cond, tuple):
        return tuple(slice_cond(part, start, stop) for part in cond)
    raise TypeError(f"unsupported cond type {type(cond).__name__}")
