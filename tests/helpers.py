"""The tests' own references: eq. 6 computed one image, class and sample at a time, and the
check of eq. 8's selective steps."""

from __future__ import annotations

import math

import torch

from cama import adapt
from cama import objectives as O
from cama.distributions import log_normal, log_standard_normal, reparameterize
from cama.image_model import ImageCama


def brute_force_log_weights(model: ImageCama, x: torch.Tensor, noise: O.Noise) -> torch.Tensor:
    """Eq. 6 one image, one class and one sample at a time, with no batching: the reference the
    batched ``cama.objectives.bayes_log_weights`` is tested against, ``(B, C)``."""
    k = noise.m.shape[0]
    out = torch.empty(x.shape[0], model.num_classes)
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        mu_m, lv_m = model.infer_m(xb)
        for c in range(model.num_classes):
            y = torch.nn.functional.one_hot(torch.tensor([c]), model.num_classes).float().view(1, 1, 1, -1)
            terms = []
            for j in range(k):
                m = reparameterize(mu_m, lv_m, noise.m[j, b : b + 1]).view(1, 1, -1)
                ctx = model.prepare(xb, m)
                mu_z, lv_z = model.infer_z(ctx, y)
                z = reparameterize(mu_z, lv_z, noise.z[c, j, b].view(1, 1, 1, -1))
                log_w = (
                    model.log_likelihood(xb, ctx, y, z)
                    - math.log(model.num_classes)
                    + log_standard_normal(z)
                    - log_normal(z, mu_z, lv_z)
                )
                terms.append(log_w.view(()))
            out[b, c] = torch.logsumexp(torch.stack(terms), 0) - math.log(k)
    return out


def check_selective_steps(
    model: ImageCama,
    clean: tuple[torch.Tensor, torch.Tensor],
    test_x: torch.Tensor,
    steps: int,
) -> dict[str, torch.Tensor]:
    """Take ``steps`` eq. 8 steps on the selected (m) parameters and assert that each of them got a
    gradient, at least one moved, and every other parameter has no gradient and did not move;
    returns the state before the steps."""
    before = adapt.snapshot(model)
    selected = {id(p) for p in adapt.collect_params(model)}
    adapt.configure_model(model)
    adapt.check_model(model)
    opt = torch.optim.Adam(adapt.collect_params(model), lr=1e-2)
    for _ in range(steps):
        adapt.finetune_step(model, opt, clean, test_x, alpha=0.5)
    after = model.state_dict()
    for name, p in model.named_parameters():
        if id(p) in selected:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
            assert torch.equal(after[name], before[name]), f"{name} changed"
    moved = [
        n for n, p in model.named_parameters() if id(p) in selected and not torch.equal(after[n], before[n])
    ]
    assert moved, "fine-tuning changed nothing"
    return before
