"""The measurement CAMA (eq. 9-11): shapes, Bayes rule against brute force, selective FT, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cama import adapt
from cama.checkpoint import load_checkpoint, save_checkpoint
from cama.measurement_model import MeasurementCama, MeasurementCamaConfig, split_cond, with_m_pathway
from cama.objectives import (
    Noise,
    bayes_log_weights,
    bayes_predict,
    intervention_elbo,
    marginal_elbo,
    sample_noise,
)
from cama.protocol import all_classes, given_labels

THREE_VARIANTS = [("affine", "mlp"), ("appendix", "mlp"), ("affine", "quadratic")]


def make(pathway: str = "affine", **overrides: object) -> MeasurementCama:
    torch.manual_seed(0)
    return MeasurementCama(MeasurementCamaConfig.tiny(m_pathway=pathway, **overrides)).eval()


def batch(
    n: int = 6, seed: int = 0, dims: tuple[int, int, int] = (5, 5, 10)
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    da, dc, dx = dims
    x = torch.randn(n, dx, generator=gen)
    cond = (torch.randn(n, da, generator=gen), torch.randn(n, dc, generator=gen))
    return x, cond, torch.randint(0, 5, (n,), generator=gen)


def perturb(model: MeasurementCama, scale: float = 0.3, seed: int = 1) -> MeasurementCama:
    """Make every part matter: q(m|x), q(z)'s m input and the affine head start at zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def test_default_config_is_the_appendix() -> None:
    cfg = MeasurementCamaConfig()
    assert (cfg.num_classes, cfg.dim_a, cfg.dim_c, cfg.dim_z, cfg.dim_m, cfg.dim_x) == (5, 5, 5, 64, 32, 10)
    assert cfg.prior_layers == (500, 500)
    assert cfg.m_layers == (500, 500, 500, 500)
    assert cfg.kind == "measurement"
    with pytest.raises(ValueError, match="pathway"):
        MeasurementCamaConfig(m_pathway="additive")  # type: ignore[arg-type]


@pytest.mark.parametrize("pathway", ["affine", "appendix"])
def test_shapes(pathway: str) -> None:
    model = make(pathway)
    x, cond, labels = batch()
    mu, logvar = model.infer_m(x, cond)
    assert mu.shape == logvar.shape == (6, 2)
    m = torch.randn(4, 6, 2)
    ctx = model.prepare(x, m, cond)
    y = all_classes(5)
    mu_z, _ = model.infer_z(ctx, y)
    assert mu_z.shape == (5, 4, 6, 3)
    assert model.log_likelihood(x, ctx, y, mu_z).shape == (5, 4, 6)
    assert model.log_prior_y(y, cond).shape == (5, 1, 6)
    assert model.log_prior_y(given_labels(labels, 5), cond).shape == (1, 1, 6)
    assert torch.allclose(model.log_prior_y(y, cond).exp().sum(0), torch.ones(1, 6))
    assert intervention_elbo(model, x, labels, cond).shape == (6,)
    assert marginal_elbo(model, x, cond).shape == (6,)


def test_before_finetuning_m_changes_nothing_in_the_affine_pathway() -> None:
    model = make("affine")
    x, cond, _ = batch()
    assert model.mechanism is not None
    g, b = model.mechanism(torch.randn(3, 6, 2))
    assert torch.equal(g, torch.zeros_like(g))
    assert torch.equal(b, torch.zeros_like(b))
    mu, logvar = model.infer_m(x, cond)
    assert torch.equal(mu, torch.zeros_like(mu))
    assert torch.all(logvar == -6.0)
    y, z = all_classes(5), torch.randn(5, 3, 6, 3)
    at_zero = model.log_likelihood(x, model.prepare(x, torch.zeros(3, 6, 2), cond), y, z)
    anywhere = model.log_likelihood(x, model.prepare(x, 5 * torch.randn(3, 6, 2), cond), y, z)
    assert torch.equal(at_zero, anywhere)


def test_the_affine_log_scale_is_bounded() -> None:
    model = make("affine", mechanism_max_log_scale=1.5)
    assert model.mechanism is not None
    with torch.no_grad():
        model.mechanism.head.weight.normal_(0.0, 50.0)
        g, b = model.mechanism(10 * torch.randn(64, 2))
    assert g.abs().max() <= 1.5
    assert g.abs().max() > 1.0  # the bound is reached, not the raw value
    assert torch.isfinite(b).all()
    with pytest.raises(ValueError, match="max_log_scale"):
        MeasurementCamaConfig(mechanism_max_log_scale=0.0)


def brute_force_posterior(
    model: MeasurementCama, x: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor], noise: Noise
) -> torch.Tensor:
    """p(y|a, x, c) ∝ p(y|a) p̂(x|y, c) (eq. 11), one data point, class and sample at a time."""
    a, c = cond
    num_classes, k = model.num_classes, noise.m.shape[0]
    out = torch.empty(x.shape[0], num_classes, dtype=torch.float64)
    for i in range(x.shape[0]):
        xi, ci = x[i : i + 1], (a[i : i + 1], c[i : i + 1])
        p_y_given_a = torch.softmax(model.prior(a[i]), dim=-1).double()
        mu_m, logvar_m = model.infer_m(xi, ci)
        unnormalised = []
        for cls in range(num_classes):
            y = torch.nn.functional.one_hot(torch.tensor(cls), num_classes).float().view(1, 1, 1, -1)
            terms = []
            for s in range(k):
                m = (mu_m + torch.exp(0.5 * logvar_m) * noise.m[s, i]).view(1, 1, -1)
                ctx = model.prepare(xi, m, ci)
                mu_z, logvar_z = model.infer_z(ctx, y)
                sd_z = torch.exp(0.5 * logvar_z)
                z = mu_z + sd_z * noise.z[cls, s, i]
                mean = model.mean_x(ctx, y, z).double().flatten()
                var = torch.exp(model.observation_logvar()).double()
                # densities written out, not the library's helpers
                p_x = torch.prod(
                    torch.exp(-0.5 * (xi.double().flatten() - mean) ** 2 / var)
                    / torch.sqrt(2 * math.pi * var)
                )
                p_z = torch.prod(torch.exp(-0.5 * z.double().flatten() ** 2) / math.sqrt(2 * math.pi))
                q_z = torch.prod(
                    torch.exp(-0.5 * ((z - mu_z) / sd_z).double().flatten() ** 2)
                    / (math.sqrt(2 * math.pi) * sd_z.double().flatten())
                )
                terms.append(p_x * p_z / q_z)
            p_x_given_y = torch.stack(terms).mean()  # p̂(x|y, c), importance sampling
            unnormalised.append(p_y_given_a[cls] * p_x_given_y)
        probs = torch.stack(unnormalised)
        out[i] = probs / probs.sum()
    return out


@pytest.mark.parametrize(
    ("pathway", "coparents"),
    [("affine", "mlp"), ("appendix", "mlp"), ("affine", "mlp_quadratic"), ("appendix", "quadratic")],
)
@torch.no_grad()
def test_prediction_follows_eq_11_brute_force(pathway: str, coparents: str) -> None:
    model = perturb(
        make(pathway, obs_logvar_init=1.0, q_m_logvar_init=-1.0, coparent_mechanism=coparents), scale=0.1
    )
    x, cond, _ = batch(n=4, seed=3)
    k = 3
    noise = sample_noise(model, 4, k, generator=torch.Generator().manual_seed(11))
    expected = brute_force_posterior(model, x, cond, noise)
    pred = bayes_predict(model, x, cond, k=k, generator=torch.Generator().manual_seed(11))
    assert torch.allclose(pred.probs.double(), expected, atol=1e-5), (pred.probs, expected)
    assert torch.allclose(pred.probs.sum(1), torch.ones(4), atol=1e-6)
    assert torch.equal(pred.labels, expected.argmax(1))
    # chunking does not change the answer (same noise stream per chunk start)
    logits = bayes_log_weights(model, x, cond, noise=noise)
    assert torch.allclose(torch.softmax(logits, 1).double(), expected, atol=1e-5)


@torch.no_grad()
def test_the_quadratic_head_adds_every_monomial_of_degree_two_in_y_and_c() -> None:
    model = perturb(make("affine", coparent_mechanism="mlp_quadratic"))
    assert model.quadratic is not None
    head = model.quadratic
    x, cond, _ = batch(n=5, seed=7)
    c = cond[1]
    m = torch.zeros(1, 5, model.dim_m)
    ctx = model.prepare(x, m, cond)
    y = all_classes(5, x.device)  # (C, 1, 1, C)
    z = torch.randn(5, 1, 5, model.dim_z, generator=torch.Generator().manual_seed(3))
    with_head = model.mean_x(ctx, y, z)
    ctx.quad_c = None
    without = model.mean_x(ctx, y, z)
    # written out: b_y + V_y c + sum_i p_i c_i + sum_{i<=j} r_ij c_i c_j, one class at a time
    weight = head.c_part.weight  # (dX, dC + dC(dC+1)/2)
    for cls in range(5):
        expected = head.class_bias[cls] + c @ head.class_slope[cls].T + c @ weight[:, :5].T
        col = 5
        for i in range(5):
            for j in range(i, 5):
                expected = expected + (c[:, i] * c[:, j]).unsqueeze(1) * weight[:, col]
                col += 1
        torch.testing.assert_close(with_head[cls, 0] - without[cls, 0], expected, rtol=1e-5, atol=1e-5)
    # labelled hypotheses (one class per row) pick their own class's row
    labels = torch.tensor([0, 1, 2, 3, 4])
    y_rows = torch.nn.functional.one_hot(labels, 5).float().view(1, 1, 5, 5)
    ctx = model.prepare(x, m, cond)
    rows = model.mean_x(ctx, y_rows, z[labels, 0, torch.arange(5)].view(1, 1, 5, -1))
    torch.testing.assert_close(rows[0, 0], with_head[labels, 0, torch.arange(5)])


@torch.no_grad()
def test_a_quadratic_coparent_mechanism_sees_c_through_the_head_only() -> None:
    model = perturb(make("affine", coparent_mechanism="quadratic"))
    x, (a, c), _ = batch(n=4, seed=8)
    m = torch.zeros(1, 4, model.dim_m)
    y = all_classes(5, x.device)
    z = torch.randn(5, 1, 4, model.dim_z, generator=torch.Generator().manual_seed(4))
    ctx, moved = model.prepare(x, m, (a, c)), model.prepare(x, m, (a, c + 3.0))
    assert torch.equal(ctx.h_c, moved.h_c)  # NN_C^p sees a constant
    assert ctx.quad_c is not None
    assert moved.quad_c is not None
    difference = model.mean_x(moved, y, z) - model.mean_x(ctx, y, z)
    head = (moved.quad_c - ctx.quad_c).permute(1, 0, 2).unsqueeze(1)  # (C, 1, B, dX)
    torch.testing.assert_close(difference, head, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="coparent_mechanism"):
        MeasurementCamaConfig(coparent_mechanism="cubic")  # type: ignore[arg-type]


def test_missing_parents_or_coparents_are_allowed() -> None:
    model = make("affine", dim_a=0, dim_c=0)
    x, cond, labels = batch(dims=(0, 0, 10))
    assert cond[0].shape == (6, 0)
    assert torch.isfinite(intervention_elbo(model, x, labels, cond)).all()
    probs = bayes_predict(model, x, cond, k=2).probs
    assert probs.shape == (6, 5)
    with pytest.raises(TypeError, match="cond"):
        split_cond(None)


@pytest.mark.parametrize(("pathway", "coparents"), THREE_VARIANTS)
def test_selective_finetuning_leaves_other_parameters_bit_identical(pathway: str, coparents: str) -> None:
    model = make(pathway, coparent_mechanism=coparents)
    before = adapt.snapshot(model)
    selected = {id(p) for p in adapt.collect_params(model)}
    names = {n for n, p in model.named_parameters() if id(p) in selected}
    m_net = "mechanism." if pathway == "affine" else "nn_m."
    assert any(n.startswith("q_m.") for n in names)
    assert "q_z_in_m.weight" in names
    assert any(n.startswith(m_net) for n in names)
    assert not any(
        n.startswith(("prior.", "nn_y.", "nn_c.", "nn_z.", "merge.", "q_z_in_x", "q_z_out", "quadratic."))
        for n in names
    )
    assert "obs_logvar" not in names
    x, cond, labels = batch(n=24, seed=4)
    test_x, test_cond, _ = batch(n=24, seed=5)
    grads: dict[str, bool] = {}

    def spy(fraction: float, step: adapt.StepResult) -> None:
        for n, p in model.named_parameters():
            grads[n] = grads.get(n, False) or p.grad is not None

    cfg = adapt.FinetuneConfig(epochs=2, batch_size=8, lr=1e-2, min_steps=0, bf16=False)
    report = adapt.finetune(
        model, x, labels, test_x + 2.0, cfg, on_progress=spy, clean_cond=cond, test_cond=test_cond
    )
    assert report.steps == 6
    after = model.state_dict()
    for name, _ in model.named_parameters():
        if name in names:
            assert grads[name], f"{name} got no gradient"
        else:
            assert not grads[name], f"{name} got a gradient"
            assert torch.equal(after[name], before[name]), f"{name} changed"
    for name, value in before.items():
        if name not in names:
            assert torch.equal(after[name], value), name
    assert any(not torch.equal(after[n], before[n]) for n in names)
    adapt.reset(model, before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_pathway_switch_keeps_the_clean_model() -> None:
    model = perturb(make("appendix"))
    converted = with_m_pathway(model, "affine")
    x, cond, labels = batch()
    gen = torch.Generator().manual_seed(0)
    a = intervention_elbo(model, x, labels, cond, generator=gen)
    gen = torch.Generator().manual_seed(0)
    b = intervention_elbo(converted, x, labels, cond, generator=gen)
    assert torch.allclose(a, b)  # do(m=0): the same networks, the mechanism is the identity
    back = with_m_pathway(converted, "appendix")
    assert back.mechanism is None


@pytest.mark.parametrize(("pathway", "coparents"), THREE_VARIANTS)
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path, pathway: str, coparents: str) -> None:
    model = perturb(make(pathway, coparent_mechanism=coparents))
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, provenance={"encoding": {"classes": ["a", "b"]}, "generator_seed": 0})
    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded, MeasurementCama)
    assert loaded.config == model.config
    assert meta.config["kind"] == "measurement"
    assert meta.provenance["generator_seed"] == 0
    x, cond, _ = batch()
    noise = sample_noise(model, 6, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(
            bayes_log_weights(model, x, cond, noise=noise), bayes_log_weights(loaded, x, cond, noise=noise)
        )
