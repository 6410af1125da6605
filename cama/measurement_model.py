"""Deep CAMA for generic measurement data (paper section 3.2, fig. 6, eq. 9-11, appendix C).

p(x, y, z, m, a, c) = p(a) p(m) p(z) p(c) p(y|a) p(x|y, c, z, m)                      (eq. 9)
    p(y|a) = softmax(MLP[dA, 500, 500, dY](a)), p(z) = N(0, I), p(m) = N(0, I),
    p(x|y, c, z, m) = N(x; mean(y, c, z, m), diag(exp(obs_logvar))),
    mean = NN_merge^p([NN_Y^p(y), NN_C^p(c), NN_Z^p(z), NN_M^p(m)]).
q(z, m|x, y, a, c) = q(z|x, y, m, a, c) q(m|x), both diagonal Gaussians                  (eq. 10)

Prediction is eq. 11, p(y|a, x, c) ∝ p(y|a) p(x|y, c), computed by ``cama.objectives``'
importance sampler (eq. 6) with ``log_prior_y`` returning log p(y|a); p(a) and p(c) cancel.
The extra observed variables travel as ``cond = (a, c)``.

Two m pathways (``MeasurementCamaConfig.m_pathway``):

- ``"appendix"``: NN_M^p(m)'s features are concatenated with the others before NN_merge^p, as
  in appendix C.
- ``"affine"``: NN_merge^p sees NN_M^p at its do(m=0) value, and m acts through an affine
  observation mechanism per child, ``mean' = mean * exp(g(m)) + b(m)``, with
  ``(g_raw, b) = head(trunk(m)) - head(trunk(0))`` and ``g = g_max tanh(g_raw / g_max)``: exactly
  zero at m = 0, and zero for every m before fine-tuning because the head starts at zero. The
  log-scale is bounded (``mechanism_max_log_scale``, 2 by default) because an unbounded ``exp(g)``
  overflows when q(m|x) widens during fine-tuning. q(z|x, y, m, a, c) then sees x mapped back through
  the mechanism, ``(x - b(m)) / exp(g(m))``. The observation variance is never m-dependent.

The observation log-variance is one learned parameter per child (``learn_obs_logvar=True``,
the default) or a fixed constant; it does not depend on m in either pathway.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cama.distributions import log_normal
from cama.layers import mlp

MeasurementPathway = Literal["appendix", "affine"]
CoparentMechanism = Literal["mlp", "mlp_quadratic", "quadratic"]
OBS_LOGVAR_RANGE = (-7.0, 5.0)


@dataclass(frozen=True)
class MeasurementCamaConfig:
    """Widths and dimensions of the measurement CAMA (appendix C, "Measurement data experiments").

    A dimension of 0 for the parents or the co-parents is allowed (a table without them): the
    network then sees one constant zero input in their place.
    """

    kind: Literal["measurement"] = "measurement"
    num_classes: int = 5
    dim_a: int = 5
    dim_c: int = 5
    dim_x: int = 10
    dim_z: int = 64
    dim_m: int = 32
    prior_layers: tuple[int, ...] = (500, 500)
    y_layers: tuple[int, ...] = (500, 500)
    c_layers: tuple[int, ...] = (500, 500)
    z_layers: tuple[int, ...] = (500, 500)
    m_layers: tuple[int, ...] = (500, 500, 500, 500)
    merge_hidden: int = 500
    q_m_layers: tuple[int, ...] = (500, 500)
    q_z_layers: tuple[int, ...] = (500, 500)
    m_pathway: MeasurementPathway = "affine"
    mechanism_layers: tuple[int, ...] = (500, 500, 500, 500)
    mechanism_max_log_scale: float = 2.0
    coparent_mechanism: CoparentMechanism = "mlp"
    learn_obs_logvar: bool = True
    obs_logvar_init: float = 0.0
    q_m_logvar_init: float = -6.0

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError("a classifier needs at least 2 classes")
        if self.dim_x < 1:
            raise ValueError("the model needs at least one child variable x")
        if min(self.dim_a, self.dim_c) < 0:
            raise ValueError("dimensions cannot be negative")
        if self.mechanism_max_log_scale <= 0:
            raise ValueError("mechanism_max_log_scale must be positive")
        if self.coparent_mechanism not in ("mlp", "mlp_quadratic", "quadratic"):
            known = "mlp, mlp_quadratic, quadratic"
            raise ValueError(f"unknown coparent_mechanism {self.coparent_mechanism!r}; known: {known}")
        if self.m_pathway not in ("appendix", "affine"):
            raise ValueError(f"unknown m pathway {self.m_pathway!r}; known: appendix, affine")

    @classmethod
    def tiny(cls, **overrides: object) -> MeasurementCamaConfig:
        """A few-thousand-parameter model with the same structure, for fast tests."""
        base: dict[str, object] = {
            "dim_z": 3,
            "dim_m": 2,
            "prior_layers": (16,),
            "y_layers": (16,),
            "c_layers": (16,),
            "z_layers": (16,),
            "m_layers": (16, 16),
            "merge_hidden": 16,
            "q_m_layers": (16,),
            "q_z_layers": (16,),
            "mechanism_layers": (16,),
        }
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]


@dataclass
class MeasurementContext:
    """What depends on (x, m, a, c) but not on y or z."""

    m: Tensor  # (K, B, dM)
    h_c: Tensor  # NN_C^p(c), (1, B, H)
    h_m: Tensor  # NN_M^p(m) (K, B, H), or NN_M^p(0) (1, 1, H) in the affine pathway
    quad_c: Tensor | None  # the quadratic head's c-only and per-class c-linear parts, (B, C, dX)
    q_base: Tensor  # the x, m, a, c part of q(z)'s first layer, (K or 1, B, Hq)
    affine: tuple[Tensor, Tensor] | None  # log-scale g(m), offset b(m), (K, B, dX) each


class QuadraticHead(nn.Module):
    """An exact quadratic function of ``u = [onehot(y), c]`` added to the mean of p(x|y, c, z, m).

    ``q(y, c) = b_y + V_y c + P [c, upper(c c^T)]``: every monomial of degree <= 2 in u (y is
    one-hot, so y_i y_j and y_i reduce to b_y). A ReLU decoder extrapolates a curved mechanism
    linearly outside the training rows; this head extrapolates a mechanism of degree <= 2 exactly
    (docs/measurement.md, "Does a decoder that can extrapolate f meet it?"). It depends on y and c
    only, never on m.
    """

    def __init__(self, num_classes: int, dim_c: int, dim_x: int) -> None:
        super().__init__()
        self.rows: Tensor
        self.cols: Tensor
        rows, cols = torch.triu_indices(dim_c, dim_c)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.class_bias = nn.Parameter(torch.zeros(num_classes, dim_x))
        self.class_slope = nn.Parameter(torch.zeros(num_classes, dim_x, dim_c))
        self.c_part = nn.Linear(dim_c + rows.numel(), dim_x, bias=False)
        nn.init.zeros_(self.c_part.weight)

    def per_class(self, c: Tensor) -> Tensor:
        """``q(y_j, c)`` for every class j, ``(B, C, dX)``."""
        square = c[:, self.rows] * c[:, self.cols]
        shared = self.c_part(torch.cat([c, square], dim=-1))  # (B, dX)
        slope = torch.einsum("bk,jxk->bjx", c, self.class_slope)  # (B, C, dX)
        out: Tensor = shared.unsqueeze(1) + slope + self.class_bias
        return out


class AffineMechanism(nn.Module):
    """NN_M^p of the affine pathway: m -> (g(m), b(m)), zero at m = 0 and at initialisation."""

    def __init__(self, dim_m: int, layers: tuple[int, ...], dim_x: int, max_log_scale: float) -> None:
        super().__init__()
        self.max_log_scale = max_log_scale
        self.trunk = mlp((dim_m, *layers), final_activation=True)
        self.head = nn.Linear(layers[-1], 2 * dim_x)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, m: Tensor) -> tuple[Tensor, Tensor]:
        """``m (..., dM)`` -> log-scale and offset, ``(..., dX)`` each."""
        raw = self.head(self.trunk(m)) - self.head(self.trunk(m.new_zeros(m.shape[-1])))
        g, b = raw.chunk(2, dim=-1)
        return self.max_log_scale * torch.tanh(g / self.max_log_scale), b


def _width(dim: int) -> int:
    """Input width of a network for a variable of ``dim`` dimensions (one constant input if 0)."""
    return max(dim, 1)


def _nonempty(t: Tensor) -> Tensor:
    """``t`` itself, or one zero column when it has no columns (a table without that role)."""
    return t if t.shape[-1] > 0 else t.new_zeros(*t.shape[:-1], 1)


def split_cond(cond: Any) -> tuple[Tensor, Tensor]:
    """``cond = (a, c)`` with ``a (B, dA)`` and ``c (B, dC)``; refuses anything else."""
    if not (isinstance(cond, tuple) and len(cond) == 2):
        raise TypeError("the measurement CAMA needs cond = (a, c), parents and co-parents")
    a, c = cond
    return _nonempty(a), _nonempty(c)


class MeasurementCama(nn.Module):
    """The appendix-C measurement networks with an appendix or affine m pathway."""

    def __init__(self, config: MeasurementCamaConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.dim_z = config.dim_z
        self.dim_m = config.dim_m
        widths = {config.y_layers[-1], config.c_layers[-1], config.z_layers[-1], config.m_layers[-1]}
        if len(widths) != 1:
            raise ValueError("NN_Y^p, NN_C^p, NN_Z^p and NN_M^p must end in the same width")
        hidden = widths.pop()
        dim_a, dim_c = _width(config.dim_a), _width(config.dim_c)
        # p(y|a)
        self.prior = mlp((dim_a, *config.prior_layers, config.num_classes), final_activation=False)
        # p(x|y,c,z,m)
        self.nn_y = mlp((config.num_classes, *config.y_layers), final_activation=True)
        self.nn_c = mlp((dim_c, *config.c_layers), final_activation=True)
        self.nn_z = mlp((config.dim_z, *config.z_layers), final_activation=True)
        self.nn_m = mlp((config.dim_m, *config.m_layers), final_activation=True)
        self.merge = mlp((4 * hidden, config.merge_hidden, config.dim_x), final_activation=False)
        self.quadratic: QuadraticHead | None = None
        if config.coparent_mechanism != "mlp":
            self.quadratic = QuadraticHead(config.num_classes, dim_c, config.dim_x)
        logvar = torch.full((config.dim_x,), config.obs_logvar_init)
        if config.learn_obs_logvar:
            self.obs_logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("obs_logvar", logvar)
        self.mechanism: AffineMechanism | None = None
        if config.m_pathway == "affine":
            self.mechanism = AffineMechanism(
                config.dim_m, config.mechanism_layers, config.dim_x, config.mechanism_max_log_scale
            )
        # q(m|x): NN_M^q, starting at q(m|x) = N(0, exp(q_m_logvar_init)) for every x
        self.q_m = mlp((config.dim_x, *config.q_m_layers, 2 * config.dim_m), final_activation=False)
        last = self.q_m[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.zero_()
            last.bias[config.dim_m :] = config.q_m_logvar_init
        # q(z|x,y,m,a,c): an MLP on the concatenation, its first layer split by input so that the
        # m part (part of NN_M^q, zero at initialisation) can be fine-tuned on its own
        hq = config.q_z_layers[0]
        self.q_z_in_x = nn.Linear(config.dim_x, hq)
        self.q_z_in_y = nn.Linear(config.num_classes, hq, bias=False)
        self.q_z_in_m = nn.Linear(config.dim_m, hq, bias=False)
        nn.init.zeros_(self.q_z_in_m.weight)
        self.q_z_in_a = nn.Linear(dim_a, hq, bias=False)
        self.q_z_in_c = nn.Linear(dim_c, hq, bias=False)
        self.q_z_out = mlp((*config.q_z_layers, 2 * config.dim_z), final_activation=False)

    # --- q(m|x) -------------------------------------------------------------------------------
    def infer_m(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """q(m|x) = N(mu, diag(exp(logvar))), ``(B, dM)`` each; depends on x only (eq. 10)."""
        out = self.q_m(x)
        return out[:, : self.dim_m], out[:, self.dim_m :]

    # --- work shared by every class hypothesis ---------------------------------------------------
    def prepare(self, x: Tensor, m: Tensor, cond: Any) -> MeasurementContext:
        """NN_C^p(c), the m features or mechanism, and the x, m, a, c part of q(z)."""
        a, c = split_cond(cond)
        c_mlp = c if self.config.coparent_mechanism != "quadratic" else torch.zeros_like(c)
        h_c = self.nn_c(c_mlp).unsqueeze(0)  # (1, B, H); c enters the head only, for "quadratic"
        x_q = x.unsqueeze(0)  # (1, B, dX)
        affine = None
        if self.mechanism is None:
            h_m = self.nn_m(m)  # (K, B, H)
        else:
            h_m = self.nn_m(m.new_zeros(1, 1, m.shape[-1]))  # (1, 1, H), do(m=0)
            affine = self.mechanism(m)  # (K, B, dX) each
            x_q = (x_q - affine[1]) * torch.exp(-affine[0])  # x mapped back through the mechanism
        q_base = self.q_z_in_x(x_q) + self.q_z_in_m(m) + (self.q_z_in_a(a) + self.q_z_in_c(c)).unsqueeze(0)
        quad_c = None if self.quadratic is None else self.quadratic.per_class(c)
        return MeasurementContext(m=m, h_c=h_c, h_m=h_m, quad_c=quad_c, q_base=q_base, affine=affine)

    # --- q(z|x,y,m,a,c) -------------------------------------------------------------------------
    def infer_z(self, ctx: MeasurementContext, y: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x, y, m, a, c) = N(mu, diag(exp(logvar))), ``(C, K, B, dZ)`` each."""
        h = F.relu(ctx.q_base.unsqueeze(0) + self.q_z_in_y(y))  # (C, K, B, Hq)
        out = self.q_z_out(h)
        return out[..., : self.dim_z], out[..., self.dim_z :]

    # --- p(x|y,c,z,m) ---------------------------------------------------------------------------
    def mean_x(self, ctx: MeasurementContext, y: Tensor, z: Tensor) -> Tensor:
        """Mean of p(x|y, c, z, m), ``(C, K, B, dX)``."""
        h_z = self.nn_z(z)  # (C, K, B, H)
        parts = (self.nn_y(y), ctx.h_c.unsqueeze(0), h_z, ctx.h_m.unsqueeze(0))
        h = torch.cat([p.expand(*h_z.shape[:-1], p.shape[-1]) for p in parts], dim=-1)  # (C, K, B, 4H)
        mean: Tensor = self.merge(h)
        if ctx.quad_c is not None:  # each hypothesis' class: y (C', K', B or 1, C), quad_c (B, C, dX)
            y_b = y.expand(*y.shape[:-2], ctx.quad_c.shape[0], y.shape[-1])
            mean = mean + torch.einsum("skbi,bix->skbx", y_b, ctx.quad_c)
        if ctx.affine is not None:
            g, b = ctx.affine
            mean = mean * torch.exp(g) + b
        return mean

    def observation_logvar(self) -> Tensor:
        """log-variance of p(x|y, c, z, m) per child, ``(dX,)``, the same for every m."""
        return self.obs_logvar.clamp(*OBS_LOGVAR_RANGE)

    def log_likelihood(self, x: Tensor, ctx: MeasurementContext, y: Tensor, z: Tensor) -> Tensor:
        """log p(x|y, c, z, m) = sum_children log N(x; mean, exp(obs_logvar)), ``(C, K, B)``."""
        return log_normal(x, self.mean_x(ctx, y, z), self.observation_logvar())

    def log_prior_y(self, y: Tensor, cond: Any) -> Tensor:
        """log p(y|a) = log softmax(MLP(a)) at the one-hot ``y``, ``(C', 1, B)``."""
        a, _ = split_cond(cond)
        log_p = torch.log_softmax(self.prior(a), dim=-1)  # (B, C)
        return (y * log_p.view(1, 1, *log_p.shape)).sum(-1)

    def log_prior_mechanisms(self, ctx: MeasurementContext) -> Tensor:
        """No factor on p(m) beyond N(0, I): 0, ``(K, B)``."""
        return ctx.m.new_zeros(ctx.m.shape[:2])

    # --- selective fine-tuning ------------------------------------------------------------------
    def m_parameters(self) -> list[nn.Parameter]:
        """NN_M^p (or the affine mechanism) and NN_M^q (q(m|x) and q(z)'s m input)."""
        modules: list[nn.Module] = [self.q_m, self.q_z_in_m]
        modules.append(self.nn_m if self.mechanism is None else self.mechanism)
        return [p for module in modules for p in module.parameters()]


def with_m_pathway(model: MeasurementCama, pathway: MeasurementPathway) -> MeasurementCama:
    """A copy of ``model`` with another m pathway; a new affine mechanism starts at the identity.

    The do(m=0) training objective is the same for both pathways, so one clean-trained model
    serves both.
    """
    new = MeasurementCama(replace(model.config, m_pathway=pathway))
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if any(not key.startswith("mechanism.") for key in (*missing, *unexpected)):
        raise ValueError(f"incompatible state: missing={missing} unexpected={unexpected}")
    new.train(model.training)
    return new
