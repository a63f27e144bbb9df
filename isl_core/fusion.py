"""Multi-atlas label fusion: the ``malf`` baseline, computed from the same warped atlases as ISL.

After Stage 2 every atlas carries a candidate segmentation of the inference image. Fusing them without any
retraining is the classic alternative to ISL, so the kit reports it from the very same registrations:

- **majority vote**: every atlas votes for its label at every voxel; the share of votes is the probability.
  Independent registration errors of different atlases disagree and are out-voted.
- **locally weighted vote**: atlases whose warped image locally resembles the inference image are trusted
  more. The weights are a softmax over atlases of the local squared NCC (the same similarity the
  registration optimises), so an atlas that matches well *here* dominates *here*. Squared NCC is blind to
  contrast polarity and scale, which keeps the weights meaningful under the domain shifts ISL targets.

All functions return probabilities (1, C, H, W, D) that sum to 1 over C; ``argmax(1)`` is the segmentation.
"""

from __future__ import annotations

import torch

from isl_core.config import FusionConfig
from isl_core.lncc import DEFAULT_VAR_FLOOR, FastLNCC, variance_floor_for
from isl_core.register import RegistrationResult


def majority_vote(warped: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Share of atlases voting for each class, (1, C, H, W, D).

    ``warped``: integer label maps (N, H, W, D) or one-hot / soft labels (N, C, H, W, D). Soft labels are
    hardened by argmax first so that each atlas casts exactly one vote per voxel (the classic rule; a soft
    average is the uniform-weight case of :func:`weighted_vote`).
    """
    if warped.ndim == 5:
        if warped.shape[1] != num_classes:
            raise ValueError(f"warped one-hot has {warped.shape[1]} channels, num_classes is {num_classes}")
        warped = warped.argmax(1)
    if warped.ndim != 4:
        raise ValueError(f"expected (N, H, W, D) labels or (N, C, H, W, D) one-hot, got {tuple(warped.shape)}")
    n, spatial = warped.shape[0], warped.shape[1:]
    labels = warped.long().reshape(n, -1)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"label values must lie in [0, {num_classes - 1}]")
    # Count votes with a scatter-add instead of a one-hot of every atlas: (C, V) memory instead of (N, C, V).
    votes = torch.zeros(num_classes, labels.shape[1], device=labels.device)
    votes.scatter_add_(0, labels, torch.ones_like(labels, dtype=votes.dtype))
    return (votes / n).reshape(1, num_classes, *spatial)


def local_weights(fixed_image: torch.Tensor, warped_images: torch.Tensor, cfg: FusionConfig) -> torch.Tensor:
    """Per-atlas, per-voxel fusion weights (N, 1, H, W, D) summing to 1 over atlases.

    Flat windows (local variance under the floor) get a similarity of 0 for every atlas, hence equal
    weights: where the image carries no information the rule falls back to an unweighted vote.
    """
    lncc = FastLNCC(3, cfg.kernel, smooth_dr=variance_floor_for(cfg.kernel, 3, DEFAULT_VAR_FLOOR))
    fixed = fixed_image.to(warped_images.device, warped_images.dtype)
    with torch.no_grad():
        similarity = lncc.ncc(warped_images, lncc.target_stats(fixed))  # (N, 1, H, W, D), in [0, 1]
    return torch.softmax(similarity / cfg.temperature, dim=0)


def weighted_vote(fixed_image: torch.Tensor, warped_images: torch.Tensor, warped_onehot: torch.Tensor,
                  cfg: FusionConfig) -> torch.Tensor:
    """Locally weighted vote of the soft warped labels, (1, C, H, W, D).

    ``fixed_image`` (1, 1, H, W, D); ``warped_images`` (N, 1, H, W, D); ``warped_onehot`` (N, C, H, W, D).
    """
    if warped_images.shape[0] != warped_onehot.shape[0] or warped_images.shape[2:] != warped_onehot.shape[2:]:
        raise ValueError(f"warped images {tuple(warped_images.shape)} and labels {tuple(warped_onehot.shape)} "
                         "do not match")
    weights = local_weights(fixed_image, warped_images, cfg)
    return (weights * warped_onehot).sum(0, keepdim=True)


def fuse(fixed_image: torch.Tensor, result: RegistrationResult, cfg: FusionConfig) -> torch.Tensor:
    """The ``malf`` prediction from a registration result, (1, C, H, W, D) probabilities."""
    num_classes = result.warped_onehot.shape[1]
    if cfg.method == "majority":
        return majority_vote(result.warped_labels, num_classes)
    return weighted_vote(fixed_image, result.warped_images, result.warped_onehot, cfg)  # FusionConfig checks method
