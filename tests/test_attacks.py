"""L-inf attacks (experiments.attacks) and the checks of the adversarial evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cama.config import ImageCamaConfig
from cama.image_model import ImageCama
from experiments.adversarial_report import sanity_checks
from experiments.adversarial_run import cama_logits, fixed_noise_accuracy
from experiments.attacks import Attack, attack_loss, batched_perturb, expected_gradient, perturb
from experiments.evaluate_adversarial import image_split


def linear(weight: torch.Tensor):
    return lambda v, draw: v @ weight


def test_pgd_stays_in_the_ball_the_range_and_the_mask():
    torch.manual_seed(0)
    v = torch.rand(8, 6)
    y = torch.randint(0, 3, (8,))
    mask = torch.ones(8, 6)
    mask[:, :2] = 0
    f = linear(torch.randn(6, 3))
    adv = perturb(f, v, y, Attack(eps=0.1, steps=5), mask=mask, generator=torch.Generator().manual_seed(1))
    assert (adv - v).abs().max() <= 0.1 + 1e-6
    assert adv.min() >= 0.0
    assert adv.max() <= 1.0
    assert torch.equal(adv[:, :2], v[:, :2])
    assert (adv[:, 2:] - v[:, 2:]).abs().max() > 0.05


def test_fgsm_is_one_signed_step_of_eps():
    v = torch.full((1, 4), 0.5)
    weight = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    adv = perturb(linear(weight), v, torch.tensor([0]), Attack.fgsm(0.1))
    # the margin f_1 - f_0 grows along -(w_0 - w_1): signs (-, +, -, 0)
    assert torch.allclose(adv, torch.tensor([[0.4, 0.6, 0.4, 0.5]]))


def test_the_margin_gradient_survives_where_cross_entropy_underflows():
    logits = torch.tensor([[300.0, 0.0, -5.0]], requires_grad=True)
    (ce,) = torch.autograd.grad(attack_loss(logits, torch.tensor([0]), "ce"), logits)
    (margin,) = torch.autograd.grad(attack_loss(logits, torch.tensor([0]), "margin"), logits)
    assert torch.count_nonzero(ce) == 0
    assert torch.equal(margin, torch.tensor([[-1.0, 1.0, 0.0]]))


def test_eot_averages_the_gradient_over_draws():
    weights = [torch.randn(3, 2) for _ in range(4)]

    def f(v, draw):
        return v @ weights[draw]

    v, y = torch.rand(5, 3), torch.zeros(5, dtype=torch.long)
    mean = expected_gradient(f, v, y, "margin", range(4))
    each = torch.stack([expected_gradient(f, v, y, "margin", range(d, d + 1)) for d in range(4)])
    assert torch.allclose(mean, each.mean(0))


def test_each_step_takes_fresh_draws_and_chunks_continue_them():
    seen: list[int] = []

    def f(v, draw):
        seen.append(draw)
        return v @ torch.ones(2, 2)

    v, y = torch.rand(4, 2), torch.zeros(4, dtype=torch.long)
    batched_perturb(f, v, y, Attack(eps=0.1, steps=3, eot=2), batch=2)
    assert seen == list(range(12))


def test_fixed_noise_is_a_deterministic_target_and_served_noise_is_not():
    torch.manual_seed(0)
    model = ImageCama(ImageCamaConfig.tiny()).eval()
    x = torch.rand(3, 1, 28, 28)
    fixed = cama_logits(model, image_split, fixed=True, bf16=False)
    served = cama_logits(model, image_split, fixed=False, bf16=False)
    assert torch.equal(fixed(x, 0), fixed(x, 5))
    assert not torch.equal(served(x, 0), served(x, 1))
    labels = fixed(x, 0).argmax(1)
    assert fixed_noise_accuracy(model, image_split, batch=3)(x, labels) == 1.0


@pytest.fixture(scope="module")
def mnist():
    from training.data import DataError, load_mnist

    try:
        return load_mnist()
    except DataError as exc:
        pytest.skip(f"MNIST not available: {exc}")


def test_pgd_matches_foolbox_on_a_trained_network(mnist):
    """The PGD of the evaluation and foolbox's LinfPGD (same loss, steps, step size) within 1 point."""
    pytest.importorskip("foolbox")
    from experiments.evaluate_adversarial import foolbox_pgd_accuracy

    torch.manual_seed(0)
    x = torch.from_numpy(mnist.train.x[:3000])
    y = torch.from_numpy(mnist.train.y[:3000]).long()
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(3):
        for start in range(0, len(x), 100):
            loss = nn.functional.cross_entropy(net(x[start : start + 100]), y[start : start + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    xt = torch.from_numpy(mnist.test.x[:1000])
    yt = torch.from_numpy(mnist.test.y[:1000]).long()
    clean = float((net(xt).argmax(1) == yt).float().mean())
    assert clean > 0.85
    eps, steps = 0.05, 10
    adv = batched_perturb(lambda v, d: net(v), xt, yt, Attack(eps=eps, steps=steps, loss="ce"), batch=1000)
    ours = float((net(adv).argmax(1) == yt).float().mean())
    theirs = foolbox_pgd_accuracy(net, xt, yt, eps, steps)
    assert ours < clean - 0.2  # the attack works
    assert abs(ours - theirs) <= 0.01


def test_sanity_checks_pass_and_fail_on_the_figures():
    good = {
        "adv.mnist.pgd.0.05.cama": 0.8,
        "adv.mnist.pgd.0.1.cama": 0.6,
        "adv.mnist.pgd.0.2.cama": 0.3,
        "adv.mnist.pgd.0.3.cama": 0.1,
        "adv.mnist.pgd.0.5.cama": 0.05,
        "adv.mnist.pgd.0.5.dnn": 0.0,
        "adv.mnist.sanity.pgd10.0.1.dnn.first50": 0.4,
        "adv.mnist.sanity.pgd100.0.1.dnn.first50": 0.38,
        "adv.mnist.pgd.0.1.cama_transfer": 0.9,
        "adv.mnist.pgd.0.1.cama_eot": 0.5,
        "adv.mnist.crosscheck.pgd.0.1.ours": 0.2,
        "adv.mnist.crosscheck.pgd.0.1.foolbox": 0.205,
    }
    checks = sanity_checks(good)
    assert set(checks) == {"monotone", "chance_at_0.5", "more_steps", "transfer_weaker", "foolbox_within_1pt"}
    assert all(ok for ok, _ in checks.values())
    bad = {
        **good,
        "adv.mnist.pgd.0.2.cama": 0.7,  # rises with eps
        "adv.mnist.pgd.0.5.dnn": 0.6,  # far from chance
        "adv.mnist.sanity.pgd100.0.1.dnn.first50": 0.45,  # more steps help the defender
        "adv.mnist.pgd.0.1.cama_transfer": 0.4,  # transfer stronger than white box
        "adv.mnist.crosscheck.pgd.0.1.foolbox": 0.25,
    }
    assert not any(ok for ok, _ in sanity_checks(bad).values())


def test_the_measurement_figures_are_means_over_seeds(tmp_path):
    from experiments.adversarial_report import figures
    from experiments.eval_cache import Cache

    cache = Cache(tmp_path / "adversarial_measurement_eval.json", False)
    for seed, value in ((0, 0.5), (1, 0.7)):
        cache.put(f"adv.measurement.s{seed}.pgd.0.5.cama", {"value": value, "model": f"seed{seed}"})
        cache.put(f"adv.measurement.s{seed}.done", {"value": 1.0, "model": f"seed{seed}"})
    assert figures("measurement", tmp_path) == {"adv.measurement.pgd.0.5.cama": pytest.approx(0.6)}
    assert np.isfinite(list(figures("measurement", tmp_path).values())).all()


def test_the_measurement_attack_runs_end_to_end(tmp_path):
    """Fig. 13's whole path on tiny models: every attack, eps and method measured, means written."""
    import json

    from experiments.adversarial_protocol import EPS, METHODS
    from experiments.evaluate_adversarial import main

    main(["--dataset", "measurement", "--dry-run", "--seeds", "0", "--out-dir", str(tmp_path),
          "--work-dir", str(tmp_path / "work"), "--threads", "1"])  # fmt: skip
    cache = json.loads((tmp_path / "adversarial_measurement_eval.json").read_text())
    for attack in ("fgsm", "pgd"):
        for method in METHODS:
            value = cache[f"adv.measurement.s0.{attack}.0.5.{method}"]["value"]
            assert 0.0 <= value <= 1.0
        for eps in EPS["measurement"]:
            assert f"adv.measurement.s0.{attack}.{eps:g}.dnn" in cache
    clean = cache["adv.measurement.s0.clean.dnn"]["value"]
    assert cache["adv.measurement.s0.pgd.1.dnn"]["value"] < clean  # the attack moves the DNN
    table = (tmp_path / "adversarial.md").read_text()
    assert "## measurement" in table
    assert (tmp_path / "adversarial_measurement.png").stat().st_size > 0


def test_strongest_keeps_the_most_harmful_candidate_per_input():
    from experiments.attacks import strongest

    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # logits = v: the margin is v_1 - v_0 for y = 0
    y = torch.zeros(3, dtype=torch.long)
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    b = torch.tensor([[0.4, 0.6], [0.6, 0.4], [0.5, 0.5]])
    best = strongest(linear(weight), [a, b], y, draws=range(1), batch=2)
    assert torch.equal(best, torch.stack([b[0], a[1], a[2]]))  # a tie keeps the first


def test_fgsm_at_a_budget_keeps_what_broke_an_input_at_a_smaller_one(tmp_path):
    """FGSM's single step overshoots: here class 1 wins only for v in (0.517, 0.583), so from
    v = 0.5 the steps of 0.02 and 0.05 break the input and the step of 0.1 jumps past. The figure
    at 0.1 and 0.2 keeps the 0.05 example, which lies inside those balls."""
    from experiments.adversarial_protocol import EPS
    from experiments.adversarial_run import Attacked, Classifier, Run
    from experiments.eval_cache import Cache

    def f(v, draw):
        return torch.cat([torch.zeros_like(v), 1.0 - 30.0 * (v - 0.55).abs()], 1)

    def accuracy(v, labels):
        return float((f(v, 0).argmax(1) == labels).float().mean())

    run = Run("cifar", Cache(tmp_path / "c.json", False), tmp_path, "m", "r", bf16=False, batch=4)
    v, y = torch.full((1, 1), 0.5), torch.zeros(1, dtype=torch.long)
    attacked = Attacked(run, {"cnn": Classifier(f, accuracy)}, v, y, (0.0, 1.0))
    figure = {eps: attacked.accuracy("fgsm", eps, "cnn") for eps in EPS["cifar"]}
    assert figure == {0.01: 1.0, 0.02: 0.0, 0.05: 0.0, 0.1: 0.0, 0.2: 0.0}
    single_step = torch.load(tmp_path / "cifar" / "m.fgsm.0.1.cnn.pt")
    assert torch.allclose(single_step, torch.tensor([[0.6]]))
    assert accuracy(single_step, y) == 1.0
    assert (attacked("fgsm", 0.2, "cnn") - v).abs().max() <= 0.2


def test_the_transfer_and_more_steps_figures_make_their_examples_only_when_measured(tmp_path):
    from experiments.adversarial_run import Classifier, Run
    from experiments.eval_cache import Cache
    from experiments.evaluate_adversarial import more_steps, transfer

    torch.manual_seed(0)
    weight = torch.randn(6, 2)
    f = linear(weight)

    def accuracy(v, labels):
        return float((f(v, 0).argmax(1) == labels).float().mean())

    v = torch.rand(8, 6)
    y = f(v, 0).argmax(1)  # every input right before the attack
    targets = {name: Classifier(f, accuracy) for name in ("cnn", "cama", "cama_fixed")}
    run = Run("cifar", Cache(tmp_path / "c.json", False), tmp_path, "m", "r", bf16=False, batch=4)
    transfer(run, targets, v, y)
    more_steps(run, targets, v, y, 4)
    figures = {k: e["value"] for k, e in run.cache.data.items()}
    assert set(figures) == {
        "adv.cifar.pgd.0.05.cama_transfer",
        "adv.cifar.sanity.pgd10.0.05.cnn.first4",
        "adv.cifar.sanity.pgd100.0.05.cnn.first4",
        "adv.cifar.sanity.pgd10.0.05.cama_fixed.first4",
        "adv.cifar.sanity.pgd100.0.05.cama_fixed.first4",
    }
    assert all(0.0 <= value <= 1.0 for value in figures.values())
    made = sorted(p.name for p in (tmp_path / "cifar").iterdir())
    assert len(made) == 5
    for path in (tmp_path / "cifar").iterdir():
        path.unlink()
    transfer(run, targets, v, y)  # cached figures: no examples are made again
    more_steps(run, targets, v, y, 4)
    assert not any((tmp_path / "cifar").iterdir())
