"""TENT: exactly the BN affine parameters learn, the rest stays bit-identical, reset is exact."""

from __future__ import annotations

from collections.abc import Iterator
from copy import deepcopy

import numpy as np
import pytest
import torch
from torch import nn

from training.baselines import BNCNN, DNN, BNCNNConfig
from training.tent import (
    Tent,
    check_model,
    collect_params,
    configure_model,
    forward_and_adapt,
    setup_tent,
    softmax_entropy,
    tent_accuracy,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors run fastest on one thread (and do not fight a training job for the cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def small_bncnn(seed: int = 0) -> BNCNN:
    """A few-hundred-parameter BN-CNN whose running statistics are not the defaults."""
    torch.manual_seed(seed)
    model = BNCNN(BNCNNConfig(channels=(4, 8, 8)))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 1, 28, 28))
    return model.eval()


def batch(seed: int, n: int = 32) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def bn_affine_names(model: nn.Module) -> set[str]:
    return {
        f"{mod_name}.{p_name}"
        for mod_name, mod in model.named_modules()
        if isinstance(mod, nn.BatchNorm2d)
        for p_name in ("weight", "bias")
    }


def test_configure_model_selects_only_bn_affine_and_batch_statistics() -> None:
    model = configure_model(small_bncnn())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == bn_affine_names(model)
    assert set(collect_params(model)[1]) == trainable
    assert model.training
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert not mod.track_running_stats
            assert mod.running_mean is None
            assert mod.running_var is None
    check_model(model)


def test_check_model_refuses_unprepared_models() -> None:
    with pytest.raises(ValueError, match="train mode"):
        check_model(small_bncnn())  # eval mode, everything trainable
    with pytest.raises(ValueError, match="all parameters"):
        check_model(small_bncnn().train())
    with pytest.raises(ValueError, match="some parameters"):
        check_model(configure_model(DNN()))  # no BatchNorm: nothing to update


def test_adaptation_changes_only_bn_affine_parameters() -> None:
    tent = setup_tent(small_bncnn(), lr=1e-2)
    before = deepcopy(tent.model.state_dict())
    for seed in range(3):
        tent(batch(seed))
    after = tent.model.state_dict()
    assert before.keys() == after.keys()
    selected = bn_affine_names(tent.model)
    for name, value in after.items():
        if name in selected:
            assert not torch.equal(value, before[name]), f"{name} did not change"
        else:
            assert torch.equal(value, before[name]), f"{name} changed"
    for name, p in tent.model.named_parameters():
        assert p.grad is None or name in selected


def test_reset_restores_model_and_optimizer_exactly() -> None:
    tent = setup_tent(small_bncnn())
    state = deepcopy(tent.model.state_dict())
    x = batch(0)
    first = tent(x).detach().clone()
    for seed in range(1, 4):
        tent(batch(seed))
    assert tent.optimizer.state_dict()["state"] != {}
    tent.reset()
    restored = tent.model.state_dict()
    assert restored.keys() == state.keys()
    for name, value in restored.items():
        assert torch.equal(value, state[name]), name
    assert tent.optimizer.state_dict()["state"] == {}
    assert torch.equal(tent(x), first)


def test_entropy_decreases_after_one_step() -> None:
    model = configure_model(small_bncnn())
    optimizer = torch.optim.Adam(collect_params(model)[0], lr=1e-3)
    x = batch(0, n=128)
    logits = forward_and_adapt(x, model, optimizer)
    with torch.no_grad():
        after = softmax_entropy(model(x)).mean()
    assert softmax_entropy(logits.detach()).mean() > after


def test_forward_and_adapt_returns_pre_update_logits_online() -> None:
    tent = setup_tent(small_bncnn())
    reference = deepcopy(tent.model)
    x0, x1 = batch(0), batch(1)
    with torch.no_grad():
        expected0 = reference(x0)
    out0 = tent(x0)
    torch.testing.assert_close(out0, expected0, rtol=0, atol=0)
    # batch 1 is predicted by the model adapted on batch 0
    with torch.no_grad():
        expected1 = tent.model(x1)
    torch.testing.assert_close(tent(x1), expected1, rtol=0, atol=0)


def test_episodic_tent_forgets_between_batches() -> None:
    tent = setup_tent(small_bncnn(), episodic=True)
    x = batch(0)
    first = tent(x).detach().clone()
    tent(batch(1))
    assert torch.equal(tent(x), first)


def test_tent_needs_a_step() -> None:
    model = configure_model(small_bncnn())
    with pytest.raises(ValueError, match="at least one step"):
        Tent(model, torch.optim.Adam(collect_params(model)[0]), steps=0)


def test_tent_accuracy_starts_from_a_copy() -> None:
    model = small_bncnn()
    state = deepcopy(model.state_dict())
    x = np.random.default_rng(0).random((300, 1, 28, 28), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 10, 300)
    acc = tent_accuracy(model, x, y, batch_size=128, seed=0, adapt_x=x[:100])
    assert 0.0 <= acc <= 1.0
    assert acc == tent_accuracy(model, x, y, batch_size=128, seed=0, adapt_x=x[:100])
    assert not model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])
