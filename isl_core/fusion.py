"""Multi-atlas label fusion: the ``malf`` baseline, computed from the same warped atlases as ISL.

After Stage 2 every atlas carries a candidate segmentation of the inference image. Fusing them without any
retraining is the classic alternative to ISL, so the kit reports it from the very same registrations:

- **majority vote**: every atlas votes for its label at every voxel; the share of votes is the probability.
  Independent registration errors of different atlases disagree and are out-voted.
- **locally weighted vote**: atlases whose warped image locally resembles the inference image are trusted
  more. The weights are a softmax over atlases of the local squared NCC (the same similarity the
  registration optimises), so an atlas that matches well *here* dominates *here*. Squared NCC is blind to
  contrast polarity and scale, which keeps the weights meaningful under the domain shifts ISL targets.

All functions but the last return probabilities (1, C, H, W, D) that sum to 1 over C; ``argmax(1)`` is the
segmentation.

**Fusion in the source geometry** (the ``malf-source`` method): every method is scored on the inference scan's own
voxel grid, finer than the working grid on which registration runs, so a working-grid prediction is resampled
there. For a network's sharp probabilities that costs little; for a vote whose probabilities are shares of atlases it
costs more (the soft boundaries of the vote are interpolated). :func:`fuse_in_source_geometry` avoids the detour: it
follows each source voxel of the inference scan through the working grid's displacement into the atlas's *own*
scan and votes with the atlas labels sampled there, at their own resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from isl_core.config import FusionConfig
from isl_core.lncc import DEFAULT_VAR_FLOOR, FastLNCC, variance_floor_for
from isl_core.register import RegistrationResult
from isl_core.transforms import to_onehot


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


# ------------------------------------------------------------------------------------ in the source geometry
@dataclass(frozen=True)
class SourceAtlas:
    """An atlas as fusion in the source geometry needs it: its label map in its own scan's voxel grid, that grid's
    voxel-to-world matrix, and the voxel-to-world matrix of the working grid it was registered on."""

    labels: torch.Tensor  # (X, Y, Z) int64, the label file as stored
    affine: np.ndarray  # 4x4, the label file's voxel -> world (mm)
    grid_affine: np.ndarray  # 4x4, the atlas's working grid (``data.load_case``'s ``affine``) voxel -> world

    @classmethod
    def from_case(cls, label_path: str, preprocessed: dict[str, Any]) -> SourceAtlas:
        """From an atlas's label file and its preprocessed case (``data.load_case``)."""
        img = nib.load(label_path)
        labels = torch.from_numpy(np.rint(np.asarray(img.dataobj, dtype=np.float32)).astype(np.int64))
        if labels.ndim == 4 and labels.shape[-1] == 1:
            labels = labels[..., 0]
        return cls(labels, np.asarray(img.affine, dtype=np.float64),
                   np.asarray(preprocessed["affine"], dtype=np.float64))


def _voxels_through(matrix: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """(3, *shape) float32: the voxel coordinates of a grid of ``shape`` mapped by the 4x4 ``matrix``."""
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    m = torch.as_tensor(matrix, dtype=torch.float64)
    return (m[:3, :3] @ grid + m[:3, 3:]).reshape(3, *shape).float()


def _mapped(matrix: np.ndarray, coords: torch.Tensor) -> torch.Tensor:
    """(3, ...) voxel coordinates ``coords`` mapped by the 4x4 ``matrix``."""
    m = torch.as_tensor(matrix, dtype=torch.float32)
    return (m[:3, :3] @ coords.reshape(3, -1) + m[:3, 3:]).reshape(coords.shape)


def _sample_at(volume: torch.Tensor, coords: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """``volume`` (1, C, H, W, D) sampled trilinearly at voxel coordinates ``coords`` (3, *S): (C, *S)."""
    size = torch.tensor(volume.shape[2:], dtype=torch.float32).view(3, *([1] * (coords.ndim - 1)))
    normalised = coords * (2.0 / (size - 1).clamp_min(1.0)) - 1.0  # align_corners=True: voxel 0 -> -1, last -> +1
    grid = normalised.flip(0).permute(*range(1, coords.ndim), 0)[None]  # grid_sample reads (x, y, z) = (D, W, H)
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)[0]


def fuse_in_source_geometry(fixed_image: torch.Tensor, reference: dict[str, Any], atlases: Sequence[SourceAtlas],
                            result: RegistrationResult, cfg: FusionConfig) -> np.ndarray:
    """The ``malf-source`` label map, in the source geometry of the inference scan (its shape and affine).

    ``fixed_image`` (1, 1, H, W, D) and ``result`` as for :func:`fuse`; ``reference`` the inference case from
    ``data.load_case`` (its working-grid ``affine`` and its ``source_image``); ``atlases`` in ``result``'s order.
    Each voxel of the scan is followed into the working grid, through the atlas's displacement, and from the atlas's
    working grid into its own label file, where the one-hot label is sampled trilinearly; outside that file it is
    background. The vote is :func:`fuse`'s: majority, or weighted by the same local similarity, interpolated from
    the working grid. Scan voxels beyond the working grid are background, over the same footprint as the label maps
    that ``data.to_source_geometry`` writes for every other method.
    Written by hand: MONAI resamples between two affine grids, not through a displacement on a third grid.
    """
    if len(atlases) != result.displacement.shape[0]:
        raise ValueError(f"{len(atlases)} source atlases for {result.displacement.shape[0]} registered ones")
    num_classes = result.warped_onehot.shape[1]
    src = nib.load(reference["source_image"])
    shape, size = tuple(src.shape[:3]), tuple(result.displacement.shape[2:])
    work = np.asarray(reference["affine"], dtype=np.float64)
    p = _voxels_through(np.linalg.inv(work) @ src.affine, shape)  # scan voxels in working-grid voxels
    # the footprint of every other method's label map: data.to_source_geometry interpolates with zero padding, which
    # carries the outermost voxels' arg-max up to one working voxel beyond their centres; the displacement is
    # continued by its edge there, as warping continues every field
    extent = torch.tensor(size, dtype=torch.float32).view(3, 1, 1, 1)
    inside = ((p > -1.0) & (p < extent)).all(0)
    weights = None
    if cfg.method == "weighted":
        weights = local_weights(fixed_image, result.warped_images, cfg).detach().float().cpu()
    displacement = result.displacement.detach().float().cpu()
    votes = torch.zeros(num_classes, *shape)
    for k, atlas in enumerate(atlases):
        q = p + _sample_at(displacement[k:k + 1], p, "border")  # in the atlas's working-grid voxels
        r = _mapped(np.linalg.inv(atlas.affine) @ atlas.grid_affine, q)  # in the atlas label file's voxels
        warped = _sample_at(to_onehot(atlas.labels[None], num_classes), r, "zeros")
        warped[0] += (1.0 - warped.sum(0)).clamp_min(0.0)  # outside the atlas's scan: background
        if weights is None:
            votes.scatter_add_(0, warped.argmax(0, keepdim=True), torch.ones(1, *shape))
        else:
            votes += _sample_at(weights[k:k + 1], p, "border") * warped
    votes[:, ~inside] = 0.0
    votes[0, ~inside] = 1.0
    return votes.argmax(0).numpy().astype(np.uint8 if num_classes < 256 else np.int16)
