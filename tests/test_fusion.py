"""Multi-atlas label fusion (the ``malf`` baseline): vote arithmetic, local weights, and the reason MALF
exists at all: fusing several registered atlases beats even the best single one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from isl_core.config import FusionConfig, RegisterConfig
from isl_core.fusion import fuse, local_weights, majority_vote, weighted_vote
from isl_core.register import Atlases, register_atlases, to_onehot, warp

NUM_CLASSES = 4
SIZE = (36, 36, 36)
ORGANS = (((0.35, 0.1, 0.2), (0.3, 0.35, 0.4)), ((-0.35, 0.15, -0.1), (0.25, 0.2, 0.3)),
          ((0.0, -0.3, 0.0), (0.15, 0.15, 0.5)))
INTENSITIES = (0.3, 0.6, 0.85, 0.45)


def subject(seed: int, bumps: float):
    """A phantom whose organ surfaces carry random bumps (amplitude ``bumps``), smoothly deformed.

    The bumps differ between subjects and are too fine for a smooth registration to undo, so every
    registered atlas keeps its own, independent boundary errors: exactly what voting averages out.
    """
    gen = torch.Generator().manual_seed(seed)
    g = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in SIZE], indexing="ij"))
    noise = F.interpolate(torch.randn(1, 1, 10, 10, 10, generator=gen), size=SIZE, mode="trilinear",
                          align_corners=True)[0, 0]

    def inside(centre, radii, wobble=0.0):
        c, r = torch.tensor(centre).view(3, 1, 1, 1), torch.tensor(radii).view(3, 1, 1, 1)
        return (((g - c) / r) ** 2).sum(0) < 1 + wobble * noise

    image = torch.zeros(SIZE)
    image[inside((0, 0, 0), (0.85, 0.7, 0.85))] = INTENSITIES[0]
    labels = torch.zeros(SIZE, dtype=torch.long)
    for k, (centre, radii) in enumerate(ORGANS, start=1):
        m = inside(centre, radii, bumps)
        labels[m], image[m] = k, INTENSITIES[k]
    image = (image + 0.02 * torch.randn(SIZE, generator=gen)).clamp(0, 1)
    coarse = torch.randn(1, 3, 4, 4, 4, generator=gen)
    u = F.interpolate(coarse, size=SIZE, mode="trilinear", align_corners=True)
    u = u * 3.0 / u.abs().amax()
    return warp(image[None, None], u), warp(to_onehot(labels[None], NUM_CLASSES), u).argmax(1)


def mean_dice(a, b):
    scores = [2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum()) for c in range(1, NUM_CLASSES)]
    return torch.stack(scores).mean().item()


def test_majority_vote_counts_votes():
    labels = torch.tensor([[0, 1, 2], [1, 1, 2], [1, 3, 0]]).view(3, 1, 1, 3)
    probs = majority_vote(labels, NUM_CLASSES)
    assert probs.shape == (1, NUM_CLASSES, 1, 1, 3)
    torch.testing.assert_close(probs[0, :, 0, 0, 0], torch.tensor([1 / 3, 2 / 3, 0, 0]))
    torch.testing.assert_close(probs[0, :, 0, 0, 1], torch.tensor([0, 2 / 3, 0, 1 / 3]))
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 1, 1, 3))
    # One-hot input (soft labels are hardened first) gives the same votes.
    onehot = to_onehot(labels, NUM_CLASSES) * 0.9 + 0.025
    torch.testing.assert_close(majority_vote(onehot, NUM_CLASSES), probs)
    with pytest.raises(ValueError):
        majority_vote(labels + 4, NUM_CLASSES)


def test_weighted_vote_trusts_the_locally_similar_atlas():
    gen = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 12, 12, 12, generator=gen)
    good, bad = fixed.clone(), torch.rand(1, 1, 12, 12, 12, generator=gen)
    images = torch.cat([bad, good, bad.flip(2)])
    labels = torch.tensor([1, 2, 3]).view(3, 1, 1, 1).expand(3, 12, 12, 12)
    onehot = to_onehot(labels, NUM_CLASSES)
    weights = local_weights(fixed, images, FusionConfig(kernel=5, temperature=0.1))
    torch.testing.assert_close(weights.sum(0), torch.ones(1, 12, 12, 12))
    probs = weighted_vote(fixed, images, onehot, FusionConfig(kernel=5, temperature=0.1))
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 12, 12, 12))
    assert (probs.argmax(1) == 2).float().mean() > 0.95  # the matching atlas wins almost everywhere
    # A very high temperature flattens the weights into an unweighted (soft) vote.
    flat = weighted_vote(fixed, images, onehot, FusionConfig(kernel=5, temperature=1e6))
    torch.testing.assert_close(flat, onehot.mean(0, keepdim=True), atol=1e-4, rtol=0)


def test_malf_beats_the_best_single_atlas():
    fixed, fixed_labels = subject(0, bumps=0.0)
    atlases = [subject(seed, bumps=0.5) for seed in range(1, 6)]
    moving = torch.cat([a[0] for a in atlases])
    moving_labels = torch.cat([a[1] for a in atlases])
    result = register_atlases(fixed, Atlases(moving, moving_labels),
                              RegisterConfig(iterations=20, levels=2), NUM_CLASSES,
                              device="cpu")
    single = [mean_dice(result.warped_labels[i:i + 1], fixed_labels) for i in range(len(atlases))]
    majority = mean_dice(fuse(fixed, result, FusionConfig(method="majority")).argmax(1), fixed_labels)
    weighted = mean_dice(fuse(fixed, result, FusionConfig(method="weighted")).argmax(1), fixed_labels)
    assert majority > max(single) + 0.005
    assert majority > sum(single) / len(single) + 0.01
    assert weighted > max(single)
    with pytest.raises(ValueError, match="FusionConfig.method"):
        FusionConfig(method="median")  # refused where it is set, not when fusion runs
