"""Stage 2's registration losses: values on fields and masks whose answer is known, per atlas, and which way
their gradients point."""

from __future__ import annotations

import torch

from isl_core.losses import Smoothness, SoftDice, smoothness

SIZE = (8, 9, 10)


def _coordinates() -> torch.Tensor:
    return torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in SIZE], indexing="ij"))


def test_smoothness_of_fields_with_known_derivatives():
    h = _coordinates()[0]
    linear = torch.zeros(1, 3, *SIZE)
    linear[0, 0] = 0.3 * h  # d u_H / dH = 0.3, every other derivative 0
    # diffusion: the squared first derivatives summed, averaged over the 3 components -> 0.3 ** 2 / 3
    torch.testing.assert_close(smoothness(linear, 0.0, 1.0), torch.tensor([0.09 / 3]), atol=1e-6, rtol=0)
    # bending: a linear field has no second derivative
    torch.testing.assert_close(smoothness(linear, 1.0, 0.0), torch.tensor([0.0]), atol=1e-6, rtol=0)
    quadratic = torch.zeros(1, 3, *SIZE)
    quadratic[0, 1] = 0.2 * h**2  # d2 u_W / dH2 = 0.4
    torch.testing.assert_close(smoothness(quadratic, 1.0, 0.0), torch.tensor([0.16 / 3]), atol=1e-5, rtol=0)
    assert smoothness(torch.full((1, 3, *SIZE), 4.0), 1.0, 1.0).item() == 0.0  # a translation costs nothing


def test_smoothness_is_per_atlas_and_its_gradient_smooths():
    noisy = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    together = Smoothness(0.5, 0.1)(noisy)
    alone = torch.cat([Smoothness(0.5, 0.1)(noisy[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=0, rtol=0)  # an atlas's value ignores its batch
    field = noisy.clone().requires_grad_(True)
    smoothness(field, 0.5, 0.1).sum().backward()
    step = noisy - 0.5 * field.grad / field.grad.abs().max()
    assert (smoothness(step, 0.5, 0.1) < smoothness(noisy, 0.5, 0.1)).all()  # downhill: a smoother field


def test_soft_dice_on_known_overlaps_and_its_gradient():
    target = torch.zeros(1, 1, *SIZE)
    target[..., :4, :, :] = 1.0  # organ in the first half along H
    same = target.clone()
    half = torch.zeros(1, 1, *SIZE)
    half[..., 2:6, :, :] = 1.0  # the same size, overlapping by half
    apart = torch.zeros(1, 1, *SIZE)
    apart[..., 4:8, :, :] = 1.0
    loss = SoftDice()(torch.cat([same, half, apart]), target)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.tensor([0.0, 0.5, 1.0]), atol=1e-4, rtol=0)
    soft = torch.rand(1, 1, *SIZE, generator=torch.Generator().manual_seed(1))
    assert SoftDice()(soft, soft).item() < 1e-5 < SoftDice()(soft.sqrt(), soft).item()  # least at equality
    organs = torch.full((1, 1, *SIZE), 0.5, requires_grad=True)
    SoftDice()(organs, target).sum().backward()
    inside, outside = organs.grad[target.bool()], organs.grad[~target.bool()]
    assert (inside < 0).all() and (outside > 0).all()  # more organ inside the mask, less outside, lowers it
