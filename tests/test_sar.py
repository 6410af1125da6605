"""SAR: exactly the BN affine parameters learn, only reliable samples count, recovery resets."""

from __future__ import annotations

import math
from copy import deepcopy

import torch

from tests.test_tent import batch, bn_affine_names, one_thread, small_bncnn  # noqa: F401 - fixture
from training.sar import margin_for, setup_sar


def test_margin_is_a_share_of_the_largest_entropy() -> None:
    assert math.isclose(margin_for(10), 0.4 * math.log(10))
    assert math.isclose(margin_for(1000, 0.5), 0.5 * math.log(1000))


def test_adaptation_changes_only_bn_affine_parameters() -> None:
    sar = setup_sar(small_bncnn(), lr=0.05, margin_factor=1.0, reset_constant=-1.0)
    before = deepcopy(sar.model.state_dict())
    for seed in range(3):
        sar(batch(seed))
    after = sar.model.state_dict()
    selected = bn_affine_names(sar.model)
    for name, value in after.items():
        if name in selected:
            assert not torch.equal(value, before[name]), f"{name} did not change"
        else:
            assert torch.equal(value, before[name]), f"{name} changed"


def test_pre_update_logits_and_no_step_without_reliable_samples() -> None:
    sar = setup_sar(small_bncnn(), lr=0.05, margin_factor=0.0)  # no entropy is below 0
    reference = deepcopy(sar.model)
    x = batch(0)
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(sar(x), expected, rtol=0, atol=0)
    for name, value in sar.model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
    assert sar.ema is None


def test_recovery_resets_the_model_exactly() -> None:
    sar = setup_sar(small_bncnn(), lr=0.05, margin_factor=1.0, reset_constant=-1.0)
    state = deepcopy(sar.model.state_dict())
    for seed in range(3):
        sar(batch(seed))
    assert sar.resets == 0
    assert sar.ema is not None
    sar.reset_constant = 1e9  # any moving average is below: the next step resets
    sar(batch(3))
    assert sar.resets == 1
    assert sar.ema is None
    for name, value in sar.model.state_dict().items():
        assert torch.equal(value, state[name]), name
