"""Selective fine-tuning (eq. 8): only NN_M^p and NN_M^q change; reset; the promotion gate."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from cama import adapt
from cama.config import ImageCamaConfig
from cama.image_model import ImageCama, with_m_pathway
from cama.mechanisms import MechanismNetwork, apply_mechanisms, canonicalize
from tests.helpers import check_selective_steps


def make(pathway: str) -> ImageCama:
    torch.manual_seed(0)
    model = ImageCama(ImageCamaConfig.tiny())
    return with_m_pathway(model, pathway) if pathway == "transform" else model


def recipe(**settings: object) -> adapt.FinetuneConfig:
    """A small recipe for tiny models: no step floor, float32, constant step unless asked."""
    base = {"min_steps": 0, "bf16": False, "lr_schedule": "constant"}
    return adapt.FinetuneConfig.from_dict({**base, **settings})


def data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("pathway", ["additive", "transform"])
def test_only_m_networks_change_and_each_gets_a_gradient(pathway):
    model = make(pathway)
    selected = {id(p) for p in adapt.collect_params(model)}
    names = {n for n, p in model.named_parameters() if id(p) in selected}
    assert any(n.startswith("q_m_") for n in names)
    assert "q_z_in_m.weight" in names
    assert any(n.startswith("nn_m." if pathway == "additive" else "mechanisms.") for n in names)
    assert not any(
        n.startswith(("nn_y.", "nn_z.", "merge.", "q_z_cnn.", "q_z_x.", "q_z_out.")) for n in names
    )
    check_selective_steps(model, data(8, 1), data(8, 2)[0], steps=3)


def test_finetune_reports_progress_and_can_be_cancelled():
    model = make("transform")
    x, y = data(32)
    seen: list[float] = []
    cfg = recipe(epochs=2, batch_size=8, lr=1e-3)
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
    cfg = recipe(epochs=2, batch_size=8, lr=1e-3, lr_schedule=schedule, decay_fraction=1.0)
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
    cfg = recipe(epochs=2, batch_size=8, lr=1e-3, lr_schedule="cosine", decay_fraction=0.5)
    adapt.finetune(model, x, y, x, cfg, on_progress=lambda f, s: lrs.append(s.lr))
    # 8 steps, the last 4 decay: constant through step 4 (0-based), then 1e-3 (1 + cos(pi j / 4)) / 2
    expected = [1e-3] * 5 + [1e-3 * (1 + math.cos(math.pi * j / 4)) / 2 for j in (1, 2, 3)]
    assert lrs == [pytest.approx(v) for v in expected]
    with pytest.raises(ValueError, match="decay_fraction"):
        recipe(lr_schedule="cosine", decay_fraction=0.0)


def test_step_budget_does_not_shrink_with_the_batch():
    cfg = adapt.FinetuneConfig(epochs=2, batch_size=32, min_steps=200)
    assert cfg.steps(4500) == 2 * 141  # a large batch: epochs decide
    assert cfg.steps(400) == 200  # a small one: the floor decides
    assert cfg.steps(80) == 200
    assert adapt.FinetuneConfig(min_steps=200, max_steps=50).steps(4500) == 50
    model = make("transform")
    x, y = data(8)
    report = adapt.finetune(model, x, y, x, recipe(epochs=1, batch_size=4, min_steps=7))
    assert report.steps == 7  # four passes over 8 inputs, the last one cut short


def test_recipe_from_dict_is_strict():
    base = adapt.FinetuneConfig()
    assert adapt.FinetuneConfig.from_dict({}) == base
    assert adapt.FinetuneConfig.from_dict(base.as_dict()) == base
    assert adapt.FinetuneConfig.from_dict({"lr": 1}).lr == 1  # an int is a number
    for bad, message in (
        ({"lr": "0.01"}, "wrong type"),
        ({"epochs": True}, "wrong type"),
        ({"bf16": 1}, "wrong type"),
        ({"epochs": 2.0}, "wrong type"),
        ({"lr": 5.0}, "lr must be"),
        ({"decay_fraction": 0.0}, "decay_fraction"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"unknown": 1}, "unknown recipe settings"),
    ):
        with pytest.raises(ValueError, match=message):
            adapt.FinetuneConfig.from_dict(bad)
    measurement = adapt.MEASUREMENT_RECIPE
    assert adapt.FinetuneConfig.from_dict({"epochs": 3}, base=measurement).alpha == measurement.alpha


def test_adapt_and_judge_keeps_an_accepted_model_and_undoes_a_refused_one():
    x, y = data(24)
    replay, canary = adapt.Labelled(x, y), adapt.Labelled(*data(12, 3))
    cfg = recipe(epochs=1, batch_size=8, lr=1e-2)
    lenient = adapt.GateConfig(
        k=2,
        max_clean_drop=1.0,
        min_elbo_gain=-1e9,
        max_label_kl_rise=None,
        max_confidence_drop=None,
        min_confidence=None,
    )
    model = make("transform")
    state = adapt.snapshot(model)
    outcome = adapt.adapt_and_judge(model, x[:16], x[16:], cfg, lenient, replay=replay, canary=canary)
    assert outcome.accepted
    assert outcome.report.steps == 2
    assert outcome.train_inputs == 16
    assert outcome.heldout_inputs == 8
    assert outcome.metrics()["steps"] == 2.0
    assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())

    strict = adapt.GateConfig(k=2, min_elbo_gain=1e9)  # nothing can pass
    model = make("transform")
    outcome = adapt.adapt_and_judge(model, x[:16], x[16:], cfg, strict, replay=replay, canary=canary)
    assert not outcome.accepted
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # undone exactly
    outcome = adapt.adapt_and_judge(
        model, x[:16], x[16:], cfg, strict, replay=replay, canary=canary, keep_refused=True
    )
    assert not outcome.accepted
    assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_adapt_and_judge_stops_during_the_first_gate_evaluation():
    x, y = data(24)
    model = make("transform")
    state = adapt.snapshot(model)
    asked = iter(range(1000))
    with pytest.raises(adapt.AdaptationCancelledError):
        adapt.adapt_and_judge(
            model,
            x[:16],
            x[16:],
            recipe(epochs=1, batch_size=8),
            adapt.GateConfig(k=2),
            replay=adapt.Labelled(x, y),
            canary=adapt.Labelled(*data(300, 3)),
            should_stop=lambda: next(asked) >= 1,  # the second chunk of the canary's 300
        )
    assert next(asked) == 2  # stopped at once: nothing else was asked
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_holdout_split():
    held, train = adapt.holdout_split(10, 0.2, seed=0)
    assert len(held) == 2
    assert len(train) == 8
    assert sorted([*held, *train]) == list(range(10))
    assert adapt.holdout_split(2, 0.9, seed=0)[1].size == 1  # never everything held out
    with pytest.raises(ValueError, match="at least 2"):
        adapt.holdout_split(1, 0.2, seed=0)


def test_reset_restores_the_state_exactly():
    model = make("transform")
    state = adapt.snapshot(model)
    x, y = data(8)
    adapt.finetune(model, x, y, x, recipe(epochs=1, batch_size=4, lr=1e-2))
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
    # a batch that no class explains: confident neither before nor after
    noise_before = adapt.GateEvaluation(clean_accuracy=0.98, heldout_elbo=-550.0, heldout_confidence=0.38)
    noise_after = adapt.GateEvaluation(clean_accuracy=0.98, heldout_elbo=-540.0, heldout_confidence=0.31)
    decision = adapt.promotion_gate(noise_before, noise_after, cfg)
    assert not decision.accepted
    assert "no class explains the batch" in decision.reasons[0]
    assert adapt.promotion_gate(noise_before, noise_after, adapt.GateConfig(min_confidence=None)).accepted


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


def test_field_mechanism_is_the_identity_at_zero_and_smooth():
    from cama.mechanisms import FIELD_GRID, _upsample_matrix

    up = _upsample_matrix(28, FIELD_GRID, torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(up.sum(1), torch.ones(28, dtype=torch.float64))  # each row interpolates
    p = torch.rand(2, 1, 28, 28) * 0.9 + 0.05
    zero = {"field": torch.zeros(2, 2 * FIELD_GRID * FIELD_GRID)}
    torch.testing.assert_close(apply_mechanisms(p, zero, 5), p)
    theta = torch.zeros(2, 2 * FIELD_GRID * FIELD_GRID)
    theta[:, : FIELD_GRID * FIELD_GRID] = 3.0  # weight near 1 everywhere ...
    theta[:, FIELD_GRID * FIELD_GRID :] = 4.0  # ... towards a bright level
    veiled = apply_mechanisms(p, {"field": theta}, 5)
    assert float(veiled.min()) > 0.9  # the veil explains a bright image whatever the digit
    theta[:, : FIELD_GRID * FIELD_GRID] = 1.0  # a weight of tanh(1) = 0.76: invertible
    veiled = apply_mechanisms(p, {"field": theta}, 5)
    back = canonicalize(veiled, {"field": theta}, None)  # the inference side undoes the mixture
    torch.testing.assert_close(back, p, atol=1e-4, rtol=1e-4)


def test_bf16_runs_only_where_the_cpu_computes_it(monkeypatch):
    """A recipe's bf16 is float32 on a CPU without AVX512-BF16/AMX (emulated bf16 is slower)."""
    from cama import runtime

    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not runtime.bf16_native(torch.device("cpu"))
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert runtime.bf16_native(torch.device("cpu"))
    assert not runtime.bf16_native(torch.device("meta"))


# --- each check of the promotion gate can refuse, alone ------------------------------------------

THRESHOLD = {name: fields[0] for name, (fields, _) in adapt.GATE_CHECKS.items()}
ALL_OFF = dict.fromkeys(THRESHOLD.values())


def heldout(labels, elbos, *, confidence=0.999, **means) -> adapt.GateEvaluation:
    """Evidence on 20 held-out inputs."""
    summary = {"clean_accuracy": 0.98, "heldout_elbo": float(sum(elbos)) / len(elbos), **means}
    return adapt.GateEvaluation(
        **summary, labels=tuple(labels), confidences=(confidence,) * len(labels), elbos=tuple(elbos)
    )


BASE_LABELS = list(range(10)) * 2


def relabel(changed: range) -> list[int]:
    return [(y + 1) % 10 if i in changed else y for i, y in enumerate(BASE_LABELS)]


BASE = heldout(BASE_LABELS, [-200.0] * 20, heldout_confidence=0.95, heldout_label_kl=0.02)
# (check, its threshold, the evidence after adapting that it refuses)
REFUSED = [
    ("clean", 0.005, heldout(BASE_LABELS, [-190.0] * 20, clean_accuracy=0.97)),
    ("elbo", 0.0, heldout(BASE_LABELS, [-201.0] * 20)),
    ("label_kl", 0.1, heldout(BASE_LABELS, [-190.0] * 20, heldout_label_kl=1.0)),
    ("confidence_drop", 0.2, heldout(BASE_LABELS, [-190.0] * 20, heldout_confidence=0.6)),
    ("min_confidence", 0.5, heldout(BASE_LABELS, [-190.0] * 20, heldout_confidence=0.4)),
    # 6 of 20 labels change (30%)
    ("changed", 0.2, heldout(relabel(range(6)), [-190.0] * 20)),
    # 3 labels change on inputs that gain nothing while the batch gains 10 nats: none explained
    ("explained", 0.5, heldout(relabel(range(3)), [-200.0] * 3 + [-190.0] * 17)),
    # 3 of the base's confident labels overturned: 85% kept
    ("confident_agreement", 0.9, heldout(relabel(range(3)), [-190.0] * 20)),
    # both inputs of class 1 move to class 2: class 1 loses its 10% share
    ("class_share", 0.05, heldout(relabel(range(1, 20, 10)), [-190.0] * 20)),
]


def test_every_check_is_covered_here():
    assert sorted(name for name, _, _ in REFUSED) == sorted(adapt.GATE_CHECKS)


@pytest.mark.parametrize(("check", "threshold", "after"), REFUSED, ids=[c for c, _, _ in REFUSED])
def test_each_check_refuses_alone_and_is_switched_off_by_none(check, threshold, after):
    cfg = adapt.GateConfig(**{**ALL_OFF, THRESHOLD[check]: threshold})
    decision = adapt.promotion_gate(BASE, after, cfg)
    assert not decision.accepted
    assert decision.refused_by == (check,)
    assert len(decision.reasons) == 1
    assert adapt.promotion_gate(BASE, after, adapt.GateConfig(**ALL_OFF)).accepted


def test_label_changes_on_inputs_the_new_version_explains_better_are_kept():
    # the 3 changed inputs gain 30 nats where the batch gains 10: explained, not refused
    after = heldout(relabel(range(3)), [-170.0] * 3 + [-190.0] * 17)
    cfg = adapt.GateConfig(**{**ALL_OFF, "min_explained_share": 0.5, "explain_margin": 5.0})
    decision = adapt.promotion_gate(BASE, after, cfg)
    assert decision.accepted
    assert decision.heldout.changed_share == pytest.approx(0.15)
    assert decision.heldout.explained_share == 1.0
    # with a margin above the 20-nat lead, the same changes count as unexplained
    stricter = adapt.GateConfig(**{**ALL_OFF, "min_explained_share": 0.5, "explain_margin": 25.0})
    assert adapt.promotion_gate(BASE, after, stricter).refused_by == ("explained",)
    # one of two changes explained: exactly the half needed
    half = heldout(relabel(range(2)), [-170.0, -190.0] + [-190.0] * 18)
    assert adapt.promotion_gate(BASE, half, cfg).heldout.explained_share == 0.5
    assert adapt.promotion_gate(BASE, half, cfg).accepted


def test_confident_agreement_reads_only_the_inputs_the_base_was_sure_of():
    unsure = dataclasses.replace(BASE, confidences=(0.6,) * 3 + (0.999,) * 17)
    after = heldout(relabel(range(3)), [-190.0] * 20)
    held = adapt.compare_heldout(unsure, after, adapt.GateConfig())
    assert held.confident_inputs == 17
    assert held.confident_agreement == 1.0  # only unsure labels changed


def test_gate_evidence_round_trips_and_judges_offline():
    model = make("transform").eval()
    x, y = data(12)
    cfg = adapt.GateConfig(k=2)
    evaluation = adapt.gate_evaluation(model, x, y, x[:8], cfg)
    assert len(evaluation.labels) == len(evaluation.confidences) == len(evaluation.elbos) == 8
    assert evaluation.heldout_elbo == pytest.approx(sum(evaluation.elbos) / 8, abs=1e-2)
    again = adapt.GateEvaluation.from_dict(json.loads(json.dumps(evaluation.as_dict())))
    assert again == evaluation
    assert (
        adapt.promotion_gate(again, again, cfg).as_dict()
        == adapt.promotion_gate(evaluation, evaluation, cfg).as_dict()
    )


def test_gate_config_ranges_are_checked():
    with pytest.raises(ValueError, match="max_changed_share"):
        adapt.GateConfig(max_changed_share=1.5)
    with pytest.raises(ValueError, match="k must be"):
        adapt.GateConfig(k=0)


def test_docs_gate_section_lists_every_check_as_the_code_has_it():
    """docs/m_pathway.md's gate section names each check of GATE_CHECKS by its settings, with the
    shipped default of each; every GateConfig field is a check's setting or a named evaluation one."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "m_pathway.md").read_text()
    section = text.split("## Refusing an adaptation that makes things worse", 1)[1].split("\n## ", 1)[0]
    defaults = adapt.GateConfig()
    for name, (fields, _) in adapt.GATE_CHECKS.items():
        for f in fields:
            assert f"`{f}` ({getattr(defaults, f)})" in section, (name, f)
    in_checks = {f for fields, _ in adapt.GATE_CHECKS.values() for f in fields}
    evaluation = {"k", "seed", "screen"}
    assert {f.name for f in dataclasses.fields(adapt.GateConfig)} == in_checks | evaluation
