"""Losses of Stage 2, per atlas (shape (N,)): smoothness of the displacement field and the soft Dice of mask
supervision. The local normalised cross-correlation (intensity supervision) lives in :mod:`isl_core.lncc`.

Each returns one value per atlas and never averages over the batch: registration sums them, which keeps every
atlas's optimisation independent of the others (see :mod:`isl_core.register`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss


@functools.lru_cache(maxsize=16)
def _stencils(device: torch.device, dtype: torch.dtype, bending: float, diffusion: float):
    """(27, 1, 3, 3, 3) kernels for a grouped conv over the 3 components, and their (27,) energy weights.

    Per component, nine finite-difference kernels, the exact stencils of MONAI's deformation losses:
    d2/dH2, d2/dW2, d2/dD2 ([1, -2, 1]), the mixed d2/dHdW, d2/dHdD, d2/dWdD (4-point / 4), and the central
    first derivatives d/dH, d/dW, d/dD ((x[i+1] - x[i-1]) / 2)."""
    k = torch.zeros(9, 3, 3, 3)
    for a in range(3):
        idx = [1, 1, 1]
        for off, w in ((0, 1.0), (1, -2.0), (2, 1.0)):
            idx[a] = off
            k[a][tuple(idx)] = w
        idx = [1, 1, 1]
        for off, w in ((0, -0.5), (2, 0.5)):
            idx[a] = off
            k[6 + a][tuple(idx)] = w
    for c, (a, b) in enumerate(((0, 1), (0, 2), (1, 2))):
        for oa, ob, w in ((2, 2, 1.0), (2, 0, -1.0), (0, 2, -1.0), (0, 0, 1.0)):
            idx = [1, 1, 1]
            idx[a], idx[b] = oa, ob
            k[3 + c][tuple(idx)] = w / 4.0
    b, g = bending, diffusion
    weights = torch.tensor([b, b, b, 2 * b, 2 * b, 2 * b, g, g, g])
    # Built once per (device, dtype, weights) and cached: constructing them element by element every step
    # costs more small operations than the regulariser itself.
    return k.unsqueeze(1).repeat(3, 1, 1, 1, 1).to(device, dtype), weights.repeat(3).to(device, dtype)


def smoothness(field: torch.Tensor, bending_weight: float, diffusion_weight: float) -> torch.Tensor:
    """Per-atlas ``bending_weight * BendingEnergyLoss + diffusion_weight * DiffusionLoss`` (MONAI's
    definitions: mean over components and interior voxels), shape (N,).

    Written as one ``conv3d`` with MONAI's stencils rather than calling MONAI's losses: those build every
    finite difference from tensor slices, and the backward pass of each slice allocates and zero-fills a
    field-sized tensor (about 80 per step); on CPU that was half of the whole registration time. The tests
    check equality with ``monai.losses.BendingEnergyLoss`` / ``DiffusionLoss``.
    """
    n = field.shape[0]
    kernels, w = _stencils(field.device, field.dtype, float(bending_weight), float(diffusion_weight))
    # Grouped: each displacement component gets the nine stencils (27 output channels, 9 per component).
    d = F.conv3d(field, kernels, groups=3)
    # MONAI averages over components and interior voxels: the 9 stencils are summed, not averaged.
    return (d * d * w.view(1, 27, 1, 1, 1)).reshape(n, 3, 9, -1).sum(2).reshape(n, -1).mean(1)



class SoftDice:
    """Per-atlas soft Dice loss between warped organ maps (N, K, *S) and the target mask M (1, K, *S).

    MONAI's ``DiceLoss`` with ``soft_label=True``: M is a probability map, and this form of soft Dice is minimal
    at equality. Organ channels only (the caller drops the background): background is most of the volume and
    would swamp the overlap terms.
    """

    def __init__(self) -> None:
        self.dice = DiceLoss(include_background=True, reduction="none", soft_label=True)

    def __call__(self, organs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(organs, target.expand_as(organs)).flatten(1).mean(1)


class Smoothness:
    """Per-atlas ``bending_weight * bending energy + diffusion_weight * diffusion`` of a field (:func:`smoothness`)."""

    def __init__(self, bending_weight: float, diffusion_weight: float) -> None:
        self.bending_weight, self.diffusion_weight = bending_weight, diffusion_weight

    def __call__(self, field: torch.Tensor) -> torch.Tensor:
        return smoothness(field, self.bending_weight, self.diffusion_weight)
