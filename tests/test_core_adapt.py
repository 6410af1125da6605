"""Selective fine-tuning (eq. 8): only NN_M^p and NN_M^q change; reset; the promotion gate."""

from __future__ import annotations

import math

import pytest
import torch

from cama import adapt
from cama.config import ImageCamaConfig
from cama.image_model import ImageCama, with_m_pathway
from cama.mechanisms import MechanismNetwork


def make(pathway: str) -> ImageCama:
    torch.manual_seed(0)
    model = ImageCama(ImageCamaConfig.tiny())
    return with_m_pathway(model, pathway) if pathway == "transform" else model


def data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("pathway", ["additive", "transform"])
def test_only_m_networks_change_and_each_gets_a_gradient(pathway):
    model = make(pathway)
    before = adapt.snapshot(model)
    selected = {id(p) for p in adapt.collect_params(model)}
    names = {n for n, p in model.named_parameters() if id(p) in selected}
    assert any(n.startswith("q_m_") for n in names)
    assert "q_z_in_m.weight" in names
    assert any(n.startswith("nn_m." if pathway == "additive" else "mechanisms.") for n in names)
    assert not any(
        n.startswith(("nn_y.", "nn_z.", "merge.", "q_z_cnn.", "q_z_x.", "q_z_out.")) for n in names
    )

    adapt.configure_model(model)
    adapt.check_model(model)
    opt = torch.optim.Adam(adapt.collect_params(model), lr=1e-2)
    clean_x, clean_y = data(8, 1)
    test_x, _ = data(8, 2)
    for _ in range(3):
        adapt.finetune_step(model, opt, (clean_x, clean_y), test_x, alpha=0.5)
    after = model.state_dict()
    for name, p in model.named_parameters():
        if id(p) in selected:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
            assert torch.equal(after[name], before[name]), f"{name} changed"
    changed = [n for n in names if not torch.equal(after[n], before[n])]
    assert changed, "fine-tuning changed nothing"


def test_finetune_reports_progress_and_can_be_cancelled():
    model = make("transform")
    x, y = data(32)
    seen: list[float] = []
    cfg = adapt.FinetuneConfig(epochs=2, batch_size=8, lr=1e-3)
    report = adapt.finetune(model, x, y, x, cfg, on_progress=lambda f, s: seen.append(f))
    assert report.steps == 8
    assert not report.cancelled
    assert seen[-1] == pytest.approx(1.0)
    assert seen == sorted(seen)
    assert all(p.requires_grad is False for p in model.parameters())

    model2 = make("transform")
    calls = iter(range(100))
    report2 = adapt.finetune(model2, x, y, x, cfg, should_stop=lambda: next(calls) >= 3)
    assert report2.cancelled
    assert report2.steps == 3


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_step_size_schedule(schedule):
    model = make("transform")
    x, y = data(32)
    lrs: list[float] = []
    cfg = adapt.FinetuneConfig(epochs=2, batch_size=8, lr=1e-3, lr_schedule=schedule)
    adapt.finetune(model, x, y, x, cfg, on_progress=lambda f, s: lrs.append(s.lr))
    assert len(lrs) == 8
    assert lrs[0] == pytest.approx(1e-3)
    if schedule == "constant":
        assert lrs == [pytest.approx(1e-3)] * 8
    else:  # half a cosine over the 8 steps: 1e-3 (1 + cos(pi k / 8)) / 2
        assert lrs == [pytest.approx(1e-3 * (1 + math.cos(math.pi * k / 8)) / 2) for k in range(8)]


def test_cosine_decay_over_the_last_fraction_only():
    model = make("transform")
    x, y = data(32)
    lrs: list[float] = []
    cfg = adapt.FinetuneConfig(epochs=2, batch_size=8, lr=1e-3, lr_schedule="cosine", decay_fraction=0.5)
    adapt.finetune(model, x, y, x, cfg, on_progress=lambda f, s: lrs.append(s.lr))
    # 8 steps, the last 4 decay: constant through step 4 (0-based), then 1e-3 (1 + cos(pi j / 4)) / 2
    expected = [1e-3] * 5 + [1e-3 * (1 + math.cos(math.pi * j / 4)) / 2 for j in (1, 2, 3)]
    assert lrs == [pytest.approx(v) for v in expected]
    with pytest.raises(ValueError, match="decay_fraction"):
        adapt.finetune(model, x, y, x, adapt.FinetuneConfig(lr_schedule="cosine", decay_fraction=0.0))


def test_tail_averaging_returns_the_mean_of_the_last_iterates():
    model = make("transform")
    before = adapt.snapshot(model)
    selected = {id(p) for p in adapt.collect_params(model)}
    params = adapt.collect_params(model)
    x, y = data(32)
    iterates: list[list[torch.Tensor]] = []
    cfg = adapt.FinetuneConfig(epochs=2, batch_size=8, lr=1e-2, average="tail", average_fraction=0.5)
    report = adapt.finetune(
        model, x, y, x, cfg, on_progress=lambda f, s: iterates.append([p.detach().clone() for p in params])
    )
    assert report.steps == 8
    assert len(iterates) == 8
    for i, p in enumerate(params):  # steps 5..8 of 8 are averaged; the last iterate is not returned
        expected = torch.stack([it[i] for it in iterates[4:]]).mean(dim=0)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(p, it) for p, it in zip(params, iterates[-1], strict=True))
    after = model.state_dict()
    for name, p in model.named_parameters():
        if id(p) not in selected:
            assert torch.equal(after[name], before[name]), f"{name} changed"
    with pytest.raises(ValueError, match="average_fraction"):
        adapt.finetune(make("transform"), x, y, x, adapt.FinetuneConfig(average="tail", average_fraction=0.0))


def test_reset_restores_the_state_exactly():
    model = make("transform")
    state = adapt.snapshot(model)
    x, y = data(8)
    adapt.finetune(model, x, y, x, adapt.FinetuneConfig(epochs=1, batch_size=4, lr=1e-2))
    assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())
    adapt.reset(model, state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_check_model_refuses_a_wrong_trainable_set():
    model = make("additive")
    adapt.configure_model(model)
    model.nn_y[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="nn_y"):
        adapt.check_model(model)


def test_mechanism_parameters_vanish_at_m_zero_even_after_training():
    net = MechanismNetwork(3, (8,), ("warp", "blur", "photometric", "outlier", "clean"))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    out = net(torch.zeros(2, 5, 3))
    assert all(torch.equal(v, torch.zeros_like(v)) for v in out.values())
    assert out["warp"].shape == (2, 5, 6)
    assert any(v.abs().sum() > 0 for v in net(torch.ones(1, 1, 3)).values())


def test_promotion_gate_decisions():
    cfg = adapt.GateConfig(max_clean_drop=0.005)
    base = adapt.GateEvaluation(clean_accuracy=0.98, heldout_elbo=-200.0)
    good = adapt.GateEvaluation(clean_accuracy=0.977, heldout_elbo=-150.0)
    assert adapt.promotion_gate(base, good, cfg).accepted
    worse_clean = adapt.GateEvaluation(clean_accuracy=0.97, heldout_elbo=-150.0)
    decision = adapt.promotion_gate(base, worse_clean, cfg)
    assert not decision.accepted
    assert "clean canary accuracy" in decision.reasons[0]
    no_gain = adapt.GateEvaluation(clean_accuracy=0.98, heldout_elbo=-201.0)
    decision = adapt.promotion_gate(base, no_gain, cfg)
    assert not decision.accepted
    assert "ELBO(x)" in decision.reasons[0]
    assert decision.as_dict()["heldout_elbo_after"] == -201.0
    collapsed = adapt.GateEvaluation(clean_accuracy=0.98, heldout_elbo=-150.0, heldout_label_kl=2.0)
    decision = adapt.promotion_gate(base, collapsed, cfg)
    assert not decision.accepted
    assert "collapses the classes" in decision.reasons[0]
    off = adapt.GateConfig(max_clean_drop=0.005, max_label_kl_rise=None)
    assert adapt.promotion_gate(base, collapsed, off).accepted
    flat = adapt.GateEvaluation(clean_accuracy=0.98, heldout_elbo=-150.0, heldout_confidence=0.6)
    decision = adapt.promotion_gate(base, flat, cfg)
    assert not decision.accepted
    assert "without the label" in decision.reasons[0]
    assert decision.as_dict()["heldout_confidence_after"] == 0.6
    assert adapt.promotion_gate(base, flat, adapt.GateConfig(max_confidence_drop=None)).accepted


def test_label_marginal_kl_measures_collapse_against_the_prior():
    model = make("transform").eval()
    c = model.num_classes
    balanced = torch.arange(c).repeat(20)
    collapsed = torch.zeros(20 * c, dtype=torch.long)
    kl_balanced = adapt.label_marginal_kl(model, balanced)
    kl_collapsed = adapt.label_marginal_kl(model, collapsed)
    assert abs(kl_balanced) < 1e-6  # a balanced histogram is the uniform prior
    # all rows in one class: KL = sum_c h_c log(C h_c), h smoothed by half a count per class
    h = torch.full((c,), 0.5)
    h[0] += 20 * c
    h = h / h.sum()
    assert kl_collapsed == pytest.approx(float((h * (h * c).log()).sum()), rel=1e-5)
    assert kl_collapsed > 1.0


def test_gate_evaluation_is_deterministic():
    model = make("transform").eval()
    x, y = data(12)
    cfg = adapt.GateConfig(k=2)
    a = adapt.gate_evaluation(model, x, y, x, cfg)
    b = adapt.gate_evaluation(model, x, y, x, cfg)
    assert a == b
    assert 0.0 <= a.clean_accuracy <= 1.0
