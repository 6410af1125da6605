"""Deep CAMA for images (paper section 3.1, fig. 4, appendix C).

p(x, y, z, m) = p(m) p(z) p(y) p(x | y, z, m) with p(y) uniform, p(z) = N(0, I), p(m) = N(0, I),
p(x | y, z, m) = Bernoulli(mean(y, z, m)) over every pixel of every channel (x in [0, 1]);
q(z, m | x, y) = q(z | x, y, m) q(m | x), both diagonal Gaussians.

Images are ``(B, C, H, W)`` with the shape of ``ImageCamaConfig.image_shape`` (MNIST 1 x 28 x 28,
CIFAR-binary 3 x 32 x 32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cama.config import ImageCamaConfig, Transform
from cama.layers import ConvEncoder, DeconvDecoder, mlp
from cama.mechanisms import (
    PROB_EPS,
    Cleaner,
    MechanismNetwork,
    apply_mechanisms,
    bernoulli_mean,
    canonicalize,
    identity_log_prior,
)


@dataclass
class ImageContext:
    """What depends on (x, m) only: m ``(K, B, dM)``, mechanism parameters, x-features of q(z)."""

    m: Tensor
    features: Tensor  # (K or 1, B, F)
    params: dict[Transform, Tensor] | None  # (K, B, size) each, transform pathway only


class ImageCama(nn.Module):
    """The appendix-C networks, plus the optional transform pathway of ``cama.mechanisms``."""

    def __init__(self, config: ImageCamaConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.dim_z = config.dim_z
        self.dim_m = config.dim_m
        hidden = config.y_layers[-1]
        if config.z_layers[-1] != hidden or config.m_layers[-1] != hidden:
            raise ValueError("NN_Y^p, NN_Z^p and NN_M^p must end in the same width (they are summed)")
        # p networks
        self.nn_y = mlp((config.num_classes, *config.y_layers), final_activation=True)
        self.nn_z = mlp((config.dim_z, *config.z_layers), final_activation=True)
        self.nn_m = mlp((config.dim_m, *config.m_layers), final_activation=True)
        size = (config.height, config.width)
        self.merge = DeconvDecoder(
            hidden, config.merge_channels, config.channels, size, config.decoder_stride1_layers
        )
        # q(m|x): NN_M^q
        self.q_m_cnn = ConvEncoder(
            config.encoder_channels, kernel=3, in_channels=config.channels, image_size=size
        )
        self.q_m_mlp = mlp(
            (self.q_m_cnn.out_features, *[config.encoder_hidden] * config.q_m_depth, 2 * config.dim_m),
            final_activation=False,
        )
        last = self.q_m_mlp[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.zero_()
            last.bias[config.dim_m :] = config.q_m_logvar_init
        # q(z|x,y,m): NN_Z^q, the m input kept as its own layer (part of NN_M^q). Its first layer on
        # the concatenation (x-features, y, m) is written as the sum of one linear map per part.
        self.q_z_cnn: ConvEncoder | None = None
        self.q_z_x: nn.Module = nn.Identity()  # shared encoder: the CNN's features go in directly
        x_features = self.q_m_cnn.out_features
        if not config.share_encoder:
            self.q_z_cnn = ConvEncoder(
                config.encoder_channels, kernel=5, in_channels=config.channels, image_size=size
            )
            self.q_z_x = mlp((self.q_z_cnn.out_features, config.encoder_hidden), final_activation=True)
            x_features = config.encoder_hidden
        self.q_z_in_x = nn.Linear(x_features, config.z_head_hidden)
        self.q_z_in_y = nn.Linear(config.num_classes, config.z_head_hidden, bias=False)
        self.q_z_in_m = nn.Linear(config.dim_m, config.z_head_hidden, bias=False)
        nn.init.zeros_(self.q_z_in_m.weight)
        # further hidden layers of NN_Z^q's MLP (none for MNIST)
        self.q_z_hidden = mlp([config.z_head_hidden] * config.z_head_depth, final_activation=True)
        self.q_z_out = nn.Linear(config.z_head_hidden, 2 * config.dim_z)
        # transform pathway: NN_M^p mechanisms (+ the inference-side cleaner, part of NN_M^q)
        self.mechanisms: MechanismNetwork | None = None
        self.cleaner: Cleaner | None = None
        if config.m_pathway == "transform":
            self.mechanisms = MechanismNetwork(
                config.dim_m, config.transform_layers, config.transforms, config.channels
            )
            if "clean" in config.transforms:
                self.cleaner = Cleaner(config.cleaner_channels, config.channels)

    def reinit_m_inference(self, seed: int = 0) -> None:
        """Give q(m|x) a randomly initialised output layer (mean) before fine-tuning.

        do(m=0) training never trains q(m|x); its output layer starts at zero so that the clean
        model is unchanged, but an m that is the same for every x is a saddle point of eq. 8 (the
        mechanisms cannot learn to use an m that carries no information, and q(m|x) gets no
        gradient through mechanisms that ignore m). A random projection of x's features breaks
        the tie; with mechanisms that start at the identity the model's outputs do not change.
        """
        last = self.q_m_mlp[-1]
        assert isinstance(last, nn.Linear)
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(last.in_features)
        with torch.no_grad():
            w = torch.empty(last.weight.shape).uniform_(-bound, bound, generator=gen)  # same on any device
            last.weight[: self.dim_m] = w[: self.dim_m].to(last.weight)
            last.bias[: self.dim_m] = 0.0
            last.bias[self.dim_m :] = self.config.q_m_logvar_init

    # --- q(m|x) -------------------------------------------------------------------------------
    def infer_m(self, x: Tensor, cond: Any = None) -> tuple[Tensor, Tensor]:
        """q(m|x) = N(mu, diag(exp(logvar))), ``(B, dM)`` each."""
        out = self.q_m_mlp(self.q_m_cnn(x)).float()
        return out[:, : self.dim_m], out[:, self.dim_m :]

    # --- work shared by every class hypothesis ---------------------------------------------------
    def x_features(self, x: Tensor) -> Tensor:
        """The x-part of q(z|x,y,m): its own CNN and MLP, or NN_M^q's CNN when shared, ``(N, F)``."""
        cnn = self.q_m_cnn if self.q_z_cnn is None else self.q_z_cnn
        features: Tensor = self.q_z_x(cnn(x))
        return features

    def prepare(self, x: Tensor, m: Tensor, cond: Any = None) -> ImageContext:
        """x-features of q(z|x,y,m); in the transform pathway, of x mapped back to canonical form."""
        if self.mechanisms is None:
            return ImageContext(m=m, features=self.x_features(x).unsqueeze(0), params=None)
        k, b = m.shape[0], x.shape[0]
        with torch.autocast(x.device.type, enabled=False):  # geometry in float32, also under bf16
            params = self.mechanisms(m.float())  # (K, B, size)
            flat = {name: value.reshape(k * b, -1) for name, value in params.items()}
            xs = x.float().unsqueeze(0).expand(k, *x.shape).reshape(k * b, *x.shape[1:])
            canonical = canonicalize(xs, flat, self.cleaner, self.config.field_inverse)
        features = self.x_features(canonical).view(k, b, -1)
        return ImageContext(m=m, features=features, params=params)

    # --- q(z|x,y,m) -------------------------------------------------------------------------------
    def infer_z(self, ctx: ImageContext, y: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x,y,m) = N(mu, diag(exp(logvar))), ``(C, K, B, dZ)`` each."""
        h = F.relu(
            self.q_z_in_x(ctx.features).unsqueeze(0)  # (1, K, B, H)
            + self.q_z_in_y(y)  # (C, 1, 1 or B, H)
            + self.q_z_in_m(ctx.m).unsqueeze(0)  # (1, K, B, H)
        )
        out = self.q_z_out(self.q_z_hidden(h)).float()
        return out[..., : self.dim_z], out[..., self.dim_z :]

    # --- p(x|y,z,m) -------------------------------------------------------------------------------
    def canonical_logits(self, y: Tensor, z: Tensor, m: Tensor) -> Tensor:
        """Bernoulli logits of p(x|y,z,m) before mechanisms, ``(C', K, B, C, H, W)``.

        NN_merge^p(NN_Y^p(y) + NN_Z^p(z) + NN_M^p(m)); in the transform pathway NN_M^p stays at
        its do(m=0) value, m acting through the mechanisms instead.
        """
        m_in = m if self.mechanisms is None else m.new_zeros(m.shape[-1])
        h = self.nn_y(y) + self.nn_z(z) + self.nn_m(m_in).unsqueeze(0)  # (C, K, B, H)
        lead = h.shape[:-1]
        logits: Tensor = self.merge(h.reshape(-1, h.shape[-1])).view(*lead, *self.config.image_shape)
        return logits.float()  # the likelihood is summed in float32, also under bf16 autocast

    def mean_image(self, ctx: ImageContext, y: Tensor, z: Tensor) -> Tensor:
        """Bernoulli mean of p(x|y,z,m), ``(C', K, B, C, H, W)``."""
        logits = self.canonical_logits(y, z, ctx.m)
        if ctx.params is None:
            return bernoulli_mean(logits).clamp(PROB_EPS, 1.0 - PROB_EPS)
        lead = logits.shape[:3]
        flat = {
            name: value.unsqueeze(0).expand(*lead, value.shape[-1]).reshape(-1, value.shape[-1])
            for name, value in ctx.params.items()
        }
        with torch.autocast(logits.device.type, enabled=False):
            means = bernoulli_mean(logits).reshape(-1, *self.config.image_shape)
            p = apply_mechanisms(means, flat, self.config.blur_kernel)
        return p.view_as(logits)

    def log_likelihood(self, x: Tensor, ctx: ImageContext, y: Tensor, z: Tensor) -> Tensor:
        """log p(x|y,z,m) = sum_pixels x log p + (1 - x) log(1 - p), ``(C, K, B)``."""
        p = self.mean_image(ctx, y, z).flatten(-3)  # (C', K, B, C * H * W)
        xf = x.flatten(1)  # (B, C * H * W)
        return (xf * torch.log(p) + (1.0 - xf) * torch.log1p(-p)).sum(-1)

    def log_prior_y(self, y: Tensor, cond: Any = None) -> Tensor:
        """log p(y) = -log C (uniform), ``(C', 1, 1)``."""
        return y.new_full((y.shape[0], 1, 1), -math.log(self.num_classes))

    def log_prior_mechanisms(self, ctx: ImageContext) -> Tensor:
        """log f(theta(m)), the identity factor on p(m) (``cama.mechanisms.identity_log_prior`` with
        ``theta_prior_std``; 0 without it or without mechanisms), ``(K, B)``."""
        if ctx.params is None or self.config.theta_prior_std is None:
            return ctx.m.new_zeros(ctx.m.shape[:2])
        return identity_log_prior(ctx.params, self.config.theta_prior_std)

    # --- selective fine-tuning ------------------------------------------------------------------
    def m_parameters(self) -> list[nn.Parameter]:
        """NN_M^p and NN_M^q: the networks that depend on m (fig. 4, shaded).

        NN_M^q includes its CNN; with ``share_encoder`` (appendix C, CIFAR) NN_Z^q reads x through
        that CNN too, so fine-tuning also moves q(z|x,y,m)'s x-features, as in the paper; p's
        networks other than NN_M^p stay fixed either way.
        """
        modules: list[nn.Module] = [self.q_m_cnn, self.q_m_mlp, self.q_z_in_m]
        if self.mechanisms is None:
            modules.append(self.nn_m)
        else:
            modules.append(self.mechanisms)
            if self.cleaner is not None:
                modules.append(self.cleaner)
        return [p for module in modules for p in module.parameters()]


def with_m_pathway(model: ImageCama, pathway: str, **overrides: Any) -> ImageCama:
    """A copy of ``model`` with another m pathway; new mechanism networks start at the identity."""
    config = replace(model.config, m_pathway=pathway, **overrides)  # type: ignore[arg-type]
    new = ImageCama(config)
    allowed = ("mechanisms.", "cleaner.")
    target = new.state_dict()
    # mechanisms whose shape changes (another set of transforms) start again at the identity
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not (k.startswith(allowed) and k in target and target[k].shape != v.shape)
    }
    missing, unexpected = new.load_state_dict(state, strict=False)
    if any(not key.startswith(allowed) for key in [*missing, *unexpected]):
        raise ValueError(f"incompatible state: missing={missing} unexpected={unexpected}")
    if pathway == "transform" and model.config.m_pathway != "transform":
        new.reinit_m_inference()
    return new
