"""The math of the CAMA core: ELBOs (eq. 3, 4, 5, 7, 8) and Bayes-rule prediction (eq. 6)."""

from __future__ import annotations

import math

import pytest
import torch

from cama import objectives as O
from cama.config import ImageCamaConfig
from cama.image_model import ImageCama, with_m_pathway
from tests.helpers import brute_force_log_weights


def tiny_model(pathway: str = "additive", seed: int = 0) -> ImageCama:
    torch.manual_seed(seed)
    model = ImageCama(ImageCamaConfig.tiny())
    if pathway == "transform":
        model = with_m_pathway(model, "transform")
        # move the mechanisms away from the identity so that every code path is exercised
        with torch.no_grad():
            assert model.mechanisms is not None
            for p in model.mechanisms.head.parameters():
                p.normal_(0.0, 0.05)
    with torch.no_grad():  # a q(m|x) that depends on x
        last = model.q_m_mlp[-1]
        assert isinstance(last, torch.nn.Linear)
        last.weight.normal_(0.0, 0.05)
        last.bias[model.dim_m :] = -1.0
        model.q_z_in_m.weight.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(6, 1, 28, 28, generator=gen), torch.randint(0, 10, (6,), generator=gen)


@pytest.mark.parametrize("pathway", ["additive", "transform"])
def test_elbos_are_finite_with_expected_shapes(pathway, batch):
    model = tiny_model(pathway)
    x, y = batch
    assert O.intervention_elbo(model, x, y).shape == (6,)
    assert O.labelled_joint_elbo(model, x, y).shape == (6,)
    assert O.marginal_elbo(model, x).shape == (6,)
    for value in (
        O.intervention_elbo(model, x, y),
        O.labelled_joint_elbo(model, x, y),
        O.marginal_elbo(model, x),
    ):
        assert torch.isfinite(value).all()
        assert (value < 0).all()  # a Bernoulli log-likelihood bound on 784 pixels is negative


def test_marginal_elbo_is_logsumexp_of_class_elbos(batch):
    model = tiny_model("transform")
    x, _ = batch
    y_all = O.all_classes(model.num_classes)
    per_class = O.joint_elbo(model, x, y_all, generator=torch.Generator().manual_seed(3))
    marginal = O.marginal_elbo(model, x, generator=torch.Generator().manual_seed(3))
    assert per_class.shape == (10, 6)
    torch.testing.assert_close(marginal, torch.logsumexp(per_class, dim=0))
    # ELBO(x) bounds every class's ELBO(x, y_c) from above, and by at most log C
    assert (marginal >= per_class.max(0).values - 1e-4).all()
    assert (marginal <= per_class.max(0).values + math.log(10) + 1e-4).all()


def test_intervention_elbo_uses_m_equal_zero(batch):
    """Eq. 3 does not depend on q(m|x): changing NN_M^q leaves it unchanged."""
    model = tiny_model("additive")
    x, y = batch
    before = O.intervention_elbo(model, x, y, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.q_m_mlp.parameters():
            p.add_(1.0)
    after = O.intervention_elbo(model, x, y, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(before, after)


def test_augmented_and_finetune_objectives_mix_their_terms(batch):
    model = tiny_model("transform")
    x, y = batch
    torch.manual_seed(0)
    l1 = O.augmented_objective(model, (x, y), (x, y), lam=1.0)
    torch.manual_seed(0)
    l3 = O.intervention_elbo(model, x, y).mean()
    torch.testing.assert_close(l1, l3)
    obj, clean_term, test_term = O.finetune_objective(model, (x, y), x, alpha=0.25)
    torch.testing.assert_close(obj, 0.25 * clean_term + 0.75 * test_term)


@pytest.mark.parametrize("pathway", ["additive", "transform"])
def test_bayes_rule_matches_brute_force_enumeration(pathway):
    model = tiny_model(pathway)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    noise = O.sample_noise(model, 3, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        batched = O.bayes_log_weights(model, x, noise=noise)
        brute = brute_force_log_weights(model, x, noise)
    torch.testing.assert_close(batched, brute, atol=1e-3, rtol=1e-5)
    probs = torch.softmax(batched, 1)
    torch.testing.assert_close(probs, torch.softmax(brute, 1), atol=1e-4, rtol=1e-4)


def test_prediction_probabilities_sum_to_one_and_are_seedable(batch):
    model = tiny_model("transform")
    x, _ = batch
    p1 = O.bayes_predict(model, x, k=3, chunk=4, generator=torch.Generator().manual_seed(0))
    p2 = O.bayes_predict(model, x, k=3, chunk=4, generator=torch.Generator().manual_seed(0))
    p3 = O.bayes_predict(model, x, k=3, chunk=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p1.probs.sum(1), torch.ones(6))
    torch.testing.assert_close(p1.log_weights, p2.log_weights)
    assert not torch.equal(p1.log_weights, p3.log_weights)
    assert torch.equal(p1.labels, p1.probs.argmax(1))


def test_transform_pathway_starts_as_the_clean_model(batch):
    """Mechanisms are the identity at initialisation: same predictions as the appendix-C model."""
    torch.manual_seed(0)
    clean = ImageCama(ImageCamaConfig.tiny()).eval()
    transformed = with_m_pathway(clean, "transform").eval()
    x, _ = batch
    noise = O.sample_noise(clean, 6, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = O.bayes_log_weights(clean, x, noise=noise)
        b = O.bayes_log_weights(transformed, x, noise=noise)
    torch.testing.assert_close(a, b, atol=5e-3, rtol=1e-5)


def test_screened_prediction_spends_k_samples_only_where_the_label_is_open(batch):
    """Stage 1 is the first sample for every input; an undecided input gets exactly eq. 6's K."""
    model = tiny_model("transform")
    x, _ = batch
    noise = O.sample_noise(model, x.shape[0], 4, generator=torch.Generator().manual_seed(3))
    first = O.Noise(noise.m[:1], noise.z[:, :1])
    with torch.no_grad():
        full = O.bayes_log_weights(model, x, noise=noise)
        one = O.bayes_log_weights(model, x, noise=first)
        everything = O.bayes_log_weights(model, x, noise=noise, screen=float("inf"))
        nothing = O.bayes_log_weights(model, x, noise=noise, screen=0.0)
        top2 = torch.topk(one, 2, dim=1).values
        middle = float((top2[:, 0] - top2[:, 1]).median())
        mixed = O.bayes_log_weights(model, x, noise=noise, screen=middle)
    torch.testing.assert_close(everything, full)  # an infinite margin: all K for every class
    torch.testing.assert_close(nothing, one)  # a zero margin: the first sample settles everything
    open_rows = O.undecided(one, middle)
    assert 0 < int(open_rows.sum()) < x.shape[0]
    torch.testing.assert_close(mixed[~open_rows], one[~open_rows])  # settled by the first sample
    # an open input: the classes within the margin of its best get all K samples, the rest keep one
    contenders = (one >= one.max(1, keepdim=True).values - middle) & open_rows.unsqueeze(1)
    assert int(contenders.sum()) > int(open_rows.sum())  # at least two classes per open input
    torch.testing.assert_close(mixed[contenders], full[contenders])
    others = ~contenders & open_rows.unsqueeze(1)
    torch.testing.assert_close(mixed[others], one[others])
    # the first sample's estimate is never more than log K above the K-sample one
    assert bool((one - full <= math.log(4) + 1e-4).all())


def test_screened_prediction_with_a_generator_draws_the_same_noise(batch):
    model = tiny_model("transform")
    x, _ = batch
    a = O.bayes_predict(model, x, k=3, generator=torch.Generator().manual_seed(5), screen=float("inf"))
    b = O.bayes_predict(model, x, k=3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.log_weights, b.log_weights)
    assert not bool(O.undecided(torch.zeros(3, 1), 1.0).any())  # one class: nothing to decide


def test_class_log_weights_are_the_all_class_ones(batch):
    """``class_log_weights`` for classes ``labels (S, B)`` with their noise equals
    ``bayes_log_weights``' entries for those classes; repeated classes give repeated numbers."""
    model = tiny_model("transform")
    x, _ = batch
    noise = O.sample_noise(model, x.shape[0], 3, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([[0, 3, 9, 1, 1, 5], [2, 3, 0, 7, 1, 5]])  # (S=2, B=6)
    rows = torch.arange(x.shape[0]).unsqueeze(0)
    with torch.no_grad():
        full = O.bayes_log_weights(model, x, noise=noise)
        some = O.class_log_weights(
            model, x, labels, noise=O.Noise(noise.m, noise.z[labels, :, rows].permute(0, 2, 1, 3))
        )
    torch.testing.assert_close(some, full[rows.expand_as(labels), labels])


def test_screened_second_stage_in_bounded_calls_gives_the_same_weights(batch):
    """``max_work`` splits stage 2 into calls of at most that many decoder passes; no weight moves."""
    model = tiny_model("transform")
    x, _ = batch
    k = 4
    noise = O.sample_noise(model, x.shape[0], k, generator=torch.Generator().manual_seed(7))
    calls: list[int] = []

    def every_class(part: O.Noise) -> torch.Tensor:
        return O.bayes_log_weights(model, x, noise=part)

    def one_class(idx: torch.Tensor, labels: torch.Tensor, part: O.Noise) -> torch.Tensor:
        calls.append(labels.shape[0] * (k - 1) * len(idx))
        return O.class_log_weights(model, x[idx], labels, noise=part)

    with torch.no_grad():
        whole = O.screened_log_weights(every_class, one_class, noise, float("inf"))
        assert len(calls) == 1
        calls.clear()
        split = O.screened_log_weights(every_class, one_class, noise, float("inf"), max_work=2 * 10 * 3)
    torch.testing.assert_close(split, whole)
    assert len(calls) > 1
    assert max(calls) <= 2 * 10 * 3
