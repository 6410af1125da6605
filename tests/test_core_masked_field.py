"""The occluder-aware m pathway: covered pixels read as missing, global mechanisms kept near the
identity by a factor on p(m) that enters every ELBO and no eq. 6 weight."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cama import objectives
from cama.config import ImageCamaConfig
from cama.image_model import ImageCama, with_m_pathway
from cama.mechanisms import (
    FIELD_GRID,
    GLOBAL_TRANSFORMS,
    MASK_VISIBILITY,
    apply_mechanisms,
    canonicalize,
    identity_log_prior,
)

CELLS = FIELD_GRID * FIELD_GRID


def field(weight_logit: float, level_logit: float, n: int = 2) -> torch.Tensor:
    theta = torch.zeros(n, 2 * CELLS)
    theta[:, :CELLS] = weight_logit
    theta[:, CELLS:] = level_logit
    return theta


def test_mask_inverts_a_translucent_veil_exactly_like_divide():
    p = torch.rand(2, 1, 28, 28) * 0.9 + 0.05
    theta = field(0.5, 4.0)  # w = tanh(0.5) = 0.46: visibility 0.54 > MASK_VISIBILITY
    veiled = apply_mechanisms(p, {"field": theta}, 5)
    divided = canonicalize(veiled, {"field": theta}, None, "divide")
    masked = canonicalize(veiled, {"field": theta}, None, "mask")
    torch.testing.assert_close(masked, divided)
    torch.testing.assert_close(masked, p, atol=1e-4, rtol=1e-4)


def test_mask_reads_a_covered_pixel_as_missing_where_divide_blows_it_up():
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, :, 10:14] = 1.0  # a stroke the occluder (level ~0.98) covers
    theta = field(6.0, 4.0)  # w = tanh(6): visibility 2e-5
    divided = canonicalize(x, {"field": theta}, None, "divide")
    masked = canonicalize(x, {"field": theta}, None, "mask")
    assert float(divided.abs().max()) > 10.0  # (x - w u) / FIELD_MIN_KEEP
    assert float(masked.abs().max()) < 1e-3  # faded to the background


def test_mask_is_continuous_at_the_visibility_floor():
    x = torch.rand(1, 1, 28, 28)
    w_floor = 1.0 - MASK_VISIBILITY
    logit = float(torch.atanh(torch.tensor(w_floor)))
    below = canonicalize(x, {"field": field(logit - 1e-4, 0.0, 1)}, None, "mask")
    above = canonicalize(x, {"field": field(logit + 1e-4, 0.0, 1)}, None, "mask")
    torch.testing.assert_close(below, above, atol=2e-3, rtol=0)


def test_identity_prior_is_zero_at_the_identity_and_ignores_the_field():
    params = {name: torch.zeros(3, 4) for name in GLOBAL_TRANSFORMS} | {"field": torch.ones(3, 2 * CELLS)}
    torch.testing.assert_close(identity_log_prior(params, 0.1), torch.zeros(3))
    params["warp"] = torch.full((3, 4), 0.2)
    params["outlier"] = torch.full((3, 4), -0.1)
    expected = -(4 * 0.04 + 4 * 0.01) / (2 * 0.01)
    torch.testing.assert_close(identity_log_prior(params, 0.1), torch.full((3,), expected))


def transform_model(std: float | None) -> ImageCama:
    torch.manual_seed(0)
    model = with_m_pathway(ImageCama(ImageCamaConfig.tiny()), "transform")
    assert model.mechanisms is not None
    with torch.no_grad():  # mechanisms away from the identity, q(m|x) away from a constant
        model.mechanisms.head.weight.normal_(0.0, 0.5)
    model.reinit_m_inference(seed=1)
    model.config = dataclasses.replace(model.config, theta_prior_std=std)
    return model.eval()


def test_the_prior_enters_the_joint_elbo_as_log_f_of_the_sampled_m():
    x = torch.rand(4, 1, 28, 28)
    labels = torch.tensor([0, 1, 2, 3])
    with_prior, without = transform_model(0.3), transform_model(None)
    with torch.no_grad():
        a = objectives.labelled_joint_elbo(with_prior, x, labels, generator=torch.Generator().manual_seed(5))
        b = objectives.labelled_joint_elbo(without, x, labels, generator=torch.Generator().manual_seed(5))
        mu, logvar = without.infer_m(x)
        eps = torch.randn(1, 4, without.dim_m, generator=torch.Generator().manual_seed(5))
        assert without.mechanisms is not None
        params = without.mechanisms(mu + torch.exp(0.5 * logvar) * eps)
        log_f = identity_log_prior(params, 0.3)[0]
    assert float(log_f.max()) < -0.01  # the mechanisms are away from the identity
    torch.testing.assert_close(a - b, log_f, atol=1e-3, rtol=1e-4)


def test_the_prior_leaves_do_m0_training_and_eq6_unchanged():
    x = torch.rand(4, 1, 28, 28)
    labels = torch.tensor([0, 1, 2, 3])
    with_prior, without = transform_model(0.3), transform_model(None)
    with torch.no_grad():
        for fn in (
            lambda m: objectives.intervention_elbo(m, x, labels, generator=torch.Generator().manual_seed(1)),
            lambda m: objectives.bayes_log_weights(m, x, k=3, generator=torch.Generator().manual_seed(1)),
        ):
            torch.testing.assert_close(fn(with_prior), fn(without))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"field_inverse": "cut"}, "field_inverse"),
        ({"theta_prior_std": 0.0}, "theta_prior_std"),
        ({"theta_prior_std": -1.0}, "theta_prior_std"),
    ],
)
def test_config_refuses_an_unknown_inverse_or_a_non_positive_scale(overrides, message):
    with pytest.raises(ValueError, match=message):
        ImageCamaConfig.tiny(**overrides)


def test_older_checkpoints_keep_the_exact_inverse_and_no_prior():
    config = ImageCamaConfig()
    assert config.field_inverse == "divide"
    assert config.theta_prior_std is None
