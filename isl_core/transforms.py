"""Spatial transforms of Stage 2: displacement fields, warping, resampling, Jacobians, one-hot maps.

Displacement convention
-----------------------
A displacement ``ddf`` has shape (N, 3, H, W, D), **voxel units of the grid it lives on**, channel ``c``
moving along spatial axis ``c`` (H, W, D): the warped image at voxel ``x`` is the moving image sampled at
``x + ddf[:, :, x]``. This is exactly what ``monai.networks.blocks.Warp`` expects. Resampling a field to
another grid therefore rescales its values by ``(new_size - 1) / (old_size - 1)`` per axis
(``align_corners=True`` geometry, the one ``Warp`` uses).

``warp`` is MONAI's ``Warp``; inside the registration loop :func:`sampling_grid` builds the same sampling grid
straight from the low-resolution field (the tests check both agree).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp
from monai.networks.layers.convutils import gaussian_1d
from monai.networks.utils import one_hot

Shape = tuple[int, int, int]

_WARPS: dict[tuple[str, str, torch.device], Warp] = {}


def warp(volume: torch.Tensor, displacement: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Resample ``volume`` (N, C, H, W, D) at ``x + displacement`` with ``monai.networks.blocks.Warp``.

    ``bilinear`` is trilinear in 3-D. Border padding: anatomy that leaves the field of view is continued
    by its edge instead of turning into zeros (which LNCC would read as a strong edge).
    """
    # One Warp per device too: Warp caches its reference grid and only checks the grid's shape.
    key = (mode, padding_mode, volume.device)
    if key not in _WARPS:
        with warnings.catch_warnings():
            # Without MONAI's compiled extension Warp warns at construction that it uses grid_sample;
            # that is the intended path here, so the warning is noise.
            warnings.simplefilter("ignore")
            _WARPS[key] = Warp(mode=mode, padding_mode=padding_mode)
    return _WARPS[key](volume, displacement.to(volume.dtype))


def jacobian_determinant(displacement: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of the map ``x -> x + u(x)``, (N, H, W, D); u in voxels, as :func:`warp` uses.

    Central differences inside, one-sided at the borders (``torch.gradient``), so an affine field gives
    its exact determinant everywhere. ``det <= 0`` means the map folds space there.
    """
    if displacement.ndim != 5 or displacement.shape[1] != 3:
        raise ValueError(f"expected a (N, 3, H, W, D) displacement, got {tuple(displacement.shape)}")
    grads = torch.gradient(displacement.float(), dim=(2, 3, 4))  # grads[j][:, i] = d u_i / d x_j
    j = [[grads[col][:, row] + (1.0 if row == col else 0.0) for col in range(3)] for row in range(3)]
    # The 3x3 determinant written out (cofactor expansion along the first row): element-wise, so it costs a
    # few passes over the volume instead of a batched LU factorisation per voxel.
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def folding_fraction(displacement: torch.Tensor) -> torch.Tensor:
    """(N,) share of voxels where the deformation folds (non-positive Jacobian determinant)."""
    return (jacobian_determinant(displacement) <= 0).flatten(1).float().mean(1)


# ------------------------------------------------------------------------------------ grids and fields


def resize_field(ddf: torch.Tensor, size: Shape) -> torch.Tensor:
    """Resample a displacement to another grid and convert its values to that grid's voxels."""
    old = ddf.shape[2:]
    if tuple(old) == tuple(size):
        return ddf
    out = F.interpolate(ddf, size=size, mode="trilinear", align_corners=True)
    scale = torch.tensor([(s - 1) / max(o - 1, 1) for s, o in zip(size, old)], dtype=ddf.dtype, device=ddf.device)
    return out * scale.view(1, 3, 1, 1, 1)


def _smooth_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D filtering along ``dim`` as a weighted sum of shifted copies (edge values replicated).

    Deliberately not a convolution: convolution kernels may pick different algorithms, hence different
    rounding, for different batch sizes. Shifted sums give every atlas bit-identical inputs whether it is
    registered alone or in a batch, which the batched-equals-single guarantee relies on (Adam's nearly
    sign-like steps would otherwise amplify 1e-8 differences into visible ones).
    """
    half = kernel.numel() // 2
    n = x.shape[dim]
    idx = torch.arange(-half, n + half, device=x.device).clamp(0, n - 1)
    xp = x.index_select(dim, idx)
    out = kernel[0] * xp.narrow(dim, 0, n)
    for j in range(1, kernel.numel()):
        out += kernel[j] * xp.narrow(dim, j, n)  # in place: same rounding as out + ..., one allocation fewer
    return out


def resize_volume(x: torch.Tensor, size: Shape) -> torch.Tensor:
    """Resample images / soft labels to ``size``; Gaussian pre-smoothing when shrinking to limit aliasing."""
    old = x.shape[2:]
    if tuple(old) == tuple(size):
        return x
    # sigma = half the shrink factor (in input voxels) is the usual pyramid choice: it removes what the
    # coarse grid cannot represent without blurring the organs away.
    for axis, (o, s) in enumerate(zip(old, size)):
        if s < o:
            kernel = gaussian_1d(torch.tensor(0.5 * o / s), truncated=3.0).to(x.device, x.dtype)
            x = _smooth_axis(x, kernel, axis + 2)
    return F.interpolate(x, size=size, mode="trilinear", align_corners=True)


def _normalised_grid(size: Shape, device: torch.device) -> torch.Tensor:
    """(3, H, W, D) coordinates in [-1, 1] per axis (``align_corners=True``: voxel 0 -> -1, last -> +1)."""
    axes = [torch.linspace(-1.0, 1.0, s, device=device) for s in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def affine_to_ddf(theta: torch.Tensor, size: Shape) -> torch.Tensor:
    """Displacement (N, 3, *size), voxels, of affines ``theta`` (N, 3, 4) acting on normalised coordinates.

    Affines are kept in normalised coordinates so the same parameters describe the alignment on every
    pyramid level; only the conversion to voxels (``(size - 1) / 2``) depends on the grid.
    """
    half = torch.tensor([(s - 1) / 2 for s in size], device=theta.device).view(1, 3, 1, 1, 1)
    return (affine_coords(theta, size) - _normalised_grid(size, theta.device)) * half


def centre_of_mass_affine(fixed: torch.Tensor, moving: torch.Tensor, threshold: float) -> torch.Tensor:
    """Translations (N, 3, 4 affines) that superimpose the body centres of mass of moving and fixed.

    The body is ``image > threshold``: a mask, not intensity weights, so a contrast change inside the body
    (the domain shift ISL targets) does not move the centre.
    """
    size = fixed.shape[2:]
    grid = _normalised_grid(size, fixed.device)

    def com(img: torch.Tensor) -> torch.Tensor:
        # One volume at a time: a batched contraction may sum in another order for another batch size, and the
        # registration of an atlas must not depend on which atlases share its batch (tests/test_register.py).
        centres = []
        for one in img:
            w = (one[0] > threshold).float()
            centres.append(torch.einsum("hwd,chwd->c", w, grid) / w.sum().clamp_min(1.0))
        return torch.stack(centres)

    theta = torch.eye(3, 4, device=fixed.device).repeat(moving.shape[0], 1, 1)
    theta[:, :, 3] = com(moving) - com(fixed)
    return theta


def affine_coords(theta: torch.Tensor, size: Shape) -> torch.Tensor:
    """Normalised coordinates (N, 3, *size) that the affines ``theta`` map the grid points to."""
    grid = _normalised_grid(size, theta.device).reshape(3, -1)
    mapped = theta[:, :, :3] @ grid + theta[:, :, 3:]
    return mapped.reshape(theta.shape[0], 3, *size)


@functools.lru_cache(maxsize=16)
def _to_normalised(size: Shape, device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1, 1) factors from voxels of a grid of ``size`` to normalised units (2 / (size - 1))."""
    return torch.tensor([2.0 / max(s - 1, 1) for s in size], device=device).view(1, 3, 1, 1, 1)


def sampling_grid(base_coords: torch.Tensor, field: torch.Tensor, size: Shape) -> torch.Tensor:
    """The ``grid_sample`` grid (N, *size, 3) of ``affine + resize_field(field)``; ``base_coords`` from
    :func:`affine_coords` on the field grid.

    This is what ``Warp`` computes from a dense displacement, built directly from the low-resolution
    parameters: the affine and the identity are linear in the coordinates, and trilinear interpolation
    (``align_corners=True``) reproduces linear functions exactly, so the whole sampling map can be formed on
    the small field grid and upsampled once. That skips materialising the dense voxel displacement, the
    reference grid and ``Warp``'s per-axis normalisation: about ten full-size passes forward and as many
    backward in every iteration. Upsampling in channels-last layout lands directly in the (N, *size, 3)
    layout ``grid_sample`` reads. ``tests/test_register.py`` checks that the result equals ``Warp``'s.
    """
    coords = base_coords + field * _to_normalised(tuple(field.shape[2:]), field.device)
    coords = coords.flip(1)  # grid_sample wants (x, y, z) = (D, W, H) order, the reverse of tensor axes
    if tuple(size) != tuple(field.shape[2:]):
        coords = coords.contiguous(memory_format=torch.channels_last_3d)
        coords = F.interpolate(coords, size=size, mode="trilinear", align_corners=True)
    return coords.permute(0, 2, 3, 4, 1)


def sample(volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Trilinear resampling with the same conventions as :func:`warp` (border padding, aligned corners)."""
    return F.grid_sample(volume, grid.to(volume.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def to_onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer maps (N, H, W, D) or one-hot (N, C, H, W, D) -> float one-hot (N, C, H, W, D).

    ``monai.networks.utils.one_hot`` does the conversion (a scatter into a float tensor, so no int64 copy of the
    one-hot is ever made); the checks before it turn a wrong shape or an out-of-range label into a clear error.
    """
    if labels.ndim == 5:
        if labels.shape[1] != num_classes:
            raise ValueError(f"one-hot labels have {labels.shape[1]} channels, num_classes is {num_classes}")
        return labels.float()
    if labels.ndim != 4:
        raise ValueError(f"labels must be (N, H, W, D) integers or (N, C, H, W, D) one-hot, got {tuple(labels.shape)}")
    lab = labels.long()
    if lab.min() < 0 or lab.max() >= num_classes:
        raise ValueError(f"label values must lie in [0, {num_classes - 1}], found {lab.min()}..{lab.max()}")
    return one_hot(lab[:, None], num_classes, dtype=torch.float32, dim=1)
