"""Stage 2: batched instance-optimised deformable registration of N atlases onto one inference image.

What happens
------------
For every atlas ``i`` we look for a displacement ``u_i`` such that the atlas, resampled at ``x + u_i(x)``,
looks like the fixed (inference) image ``x*``::

    u_i = argmin  image_weight * (-LNCC(I_i o (id + u_i), x*))          [supervision: intensity]
                + mask_weight  * SoftDice(onehot(y_i) o (id + u_i), M)   [supervision: mask]
                + bending_weight * Bending(v_i) + diffusion_weight * Diffusion(v_i)

``u_i`` = initial alignment (centre of mass, optionally affine) + an upsampled low-resolution field
``v_i``. ``v_i`` is optimised directly with Adam ("instance optimisation": no network, a few dozen steps),
coarse to fine over ``levels`` resolutions.

Why a hand-written loop (MONAI has the pieces, not the loop)
-----------------------------------------------------------
All N atlases are one batch: one resampling call, one LNCC call, one backward pass per step. The per-atlas
losses are **summed** (never averaged over the batch): the gradient of atlas ``i``'s field then depends on
atlas ``i`` alone, and Adam's element-wise update makes the batched optimisation identical to N separate
ones (``tests/test_register.py`` checks it to 1e-3 voxel). Averaging would only rescale gradients, which
Adam mostly undoes, but summing makes the independence exact and obvious.

MONAI provides the reference for every piece, and the tests check each hand-written replacement against
it: ``Warp`` (used for all outputs; inside the loop :func:`sampling_grid` builds the same grid straight from
the low-resolution field), ``LocalNormalizedCrossCorrelationLoss`` (:class:`isl_core.lncc.FastLNCC`,
``cfg.fast_lncc=False`` switches back), ``BendingEnergyLoss`` / ``DiffusionLoss`` (:func:`smoothness`), and
``DiceLoss`` (used as is). Each replacement exists because the MONAI version dominated the iteration time.

Displacement convention
-----------------------
A displacement ``ddf`` has shape (N, 3, H, W, D), **voxel units of the grid it lives on**, channel ``c``
moving along spatial axis ``c`` (H, W, D): the warped image at voxel ``x`` is the moving image sampled at
``x + ddf[:, :, x]``. This is exactly what ``monai.networks.blocks.Warp`` expects. Resampling a field to
another grid therefore rescales its values by ``(new_size - 1) / (old_size - 1)`` per axis
(``align_corners=True`` geometry, the one ``Warp`` uses).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from monai.networks.layers.convutils import gaussian_1d

from isl_core.config import RegisterConfig
from isl_core.lncc import FastLNCC, variance_floor_for
from isl_core.runtime import resolve_device

Shape = tuple[int, int, int]
SUPERVISIONS = ("intensity", "mask", "both")
INITS = ("com", "affine", "none")


@dataclass
class RegistrationResult:
    """Everything Stage 3 and the ``malf`` baseline need; tensors live on the registration device."""

    displacement: torch.Tensor  # (N, 3, H, W, D) voxels of the input grid, initial alignment included
    warped_images: torch.Tensor  # (N, 1, H, W, D) linear interpolation
    warped_onehot: torch.Tensor  # (N, C, H, W, D) one-hot warped linearly: soft labels summing to 1
    warped_labels: torch.Tensor  # (N, H, W, D) int64, argmax of warped_onehot
    folding_fraction: torch.Tensor  # (N,) fraction of voxels with det(Jacobian) <= 0
    loss_history: list[float] = field(default_factory=list)  # summed over atlases, one entry per step
    seconds: float = 0.0
    atlas_chunk: int = 0  # atlases per optimisation actually used (smaller than asked after running out of memory)


# --------------------------------------------------------------------------------------------- warping

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
        w = (img[:, 0] > threshold).float()
        mass = w.flatten(1).sum(1).clamp_min(1.0)
        return torch.einsum("nhwd,chwd->nc", w, grid) / mass[:, None]

    theta = torch.eye(3, 4, device=fixed.device).repeat(moving.shape[0], 1, 1)
    theta[:, :, 3] = com(moving) - com(fixed)
    return theta


# ------------------------------------------------------------------------------------------- objective


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


def mask_grid_size(cfg: RegisterConfig, image_size: Shape, field_size: Shape | None) -> Shape:
    """Where a level evaluates the soft Dice: the field grid (``cfg.mask_grid="field"``) or the image grid."""
    return tuple(field_size) if (field_size and cfg.mask_grid == "field") else tuple(image_size)


def organ_maps(onehot: torch.Tensor, image_size: Shape, mask_size: Shape) -> torch.Tensor:
    """(N, C - 1, *mask_size): the organ channels of a one-hot resampled as a pyramid level compares them."""
    # One atlas at a time: smoothing a full-resolution one-hot before shrinking it holds several copies of its
    # input (at paper size 2.1 GB each for 24 atlases), so a batch would set the registration's peak memory.
    # Resampling is per atlas and per channel, so the result has the same bits as a batch would.
    return torch.cat([resize_volume(resize_volume(onehot[i:i + 1, 1:], image_size), mask_size)
                      for i in range(onehot.shape[0])])


class AtlasOrgans:
    """The organ maps of one set of atlas labels on each grid mask supervision compares them on, made once.

    They depend on the labels and the grid only, not on the inference image, the mask M or the round, so every
    mask-supervised registration of the same atlases (each ISL round and variant, each case of an experiment)
    can share them (0.2 s per registration at the quick size on 2 CPU cores; more at paper size, where the coarse
    levels smooth a 2.1 GB one-hot). Pass the same object, with the same label tensor, to every such
    :func:`register_atlases` call; it holds only the small resampled maps (the field grid is 1/8 of the voxels).
    """

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels  # the tensor these maps belong to: register_atlases checks it by identity
        self._maps: dict[tuple, torch.Tensor] = {}

    def at(self, onehot: torch.Tensor, atlases: slice, image_size: Shape, mask_size: Shape) -> torch.Tensor:
        """:func:`organ_maps` of ``onehot[atlases]`` (``onehot``: the one-hot of ``labels``), made on first use.

        Kept per batch of atlases, as registration chunks them: making the maps of all atlases at once could
        need more memory than the chunk that fits.
        """
        key = (onehot.device, onehot.shape, atlases.start, atlases.stop, tuple(image_size), tuple(mask_size))
        if key not in self._maps:
            self._maps[key] = organ_maps(onehot[atlases], image_size, mask_size)
        return self._maps[key]


class LevelObjective:
    """The registration loss on one pyramid level, per atlas: ``objective(field, base_coords) -> (N,)``.

    The deformation is an affine (given as ``base_coords = affine_coords(theta, field grid)``) plus the
    low-resolution field ``field`` (N, 3, h, w, d; voxels of the field grid) upsampled to this level's image
    grid. LNCC is evaluated on the image grid, the soft Dice on ``field_size`` (``cfg.mask_grid="field"``) or
    on the image grid. Everything that does not change between steps (the fixed image's window statistics,
    the resampled organ maps and target) is prepared once here. ``moving_organs`` hands in the organ maps
    already resampled to the Dice grid (:func:`organ_maps`); otherwise they are made from ``moving_onehot``.
    """

    def __init__(self, fixed: torch.Tensor, moving_images: torch.Tensor, moving_onehot: torch.Tensor | None,
                 target_mask: torch.Tensor | None, cfg: RegisterConfig, field_size: Shape | None = None,
                 regularise: bool = True, moving_organs: torch.Tensor | None = None) -> None:
        self.cfg = cfg
        self.use_image = cfg.supervision in ("intensity", "both")
        self.use_mask = cfg.supervision in ("mask", "both")
        self.size = tuple(fixed.shape[2:])
        self.regularise = regularise and (cfg.bending_weight > 0 or cfg.diffusion_weight > 0)
        # Where the soft Dice is evaluated. On the field grid (default) the organ one-hot (C - 1 channels,
        # the bulk of the work with many organs) is resampled at 1 / field_scale^3 of the voxels; the field
        # cannot express finer detail than its own grid anyway, so the gradient it receives hardly changes.
        self.mask_size = mask_grid_size(cfg, self.size, field_size)
        # On a shared grid, image and organs go through one grid_sample call (one pass over the grid).
        self.shared = self.use_image and self.use_mask and self.mask_size == self.size
        if self.use_mask:
            # Organs only: background is most of the volume and would swamp the overlap terms.
            self.organs = (moving_organs if moving_organs is not None
                           else resize_volume(moving_onehot[:, 1:], self.mask_size))
            self.target = resize_volume(target_mask[:, 1:], self.mask_size)
            # soft_label=True: M is a probability map, and this form of soft Dice is minimal at equality.
            self.dice = DiceLoss(include_background=True, reduction="none", soft_label=True)
        if self.use_image:
            self.images = torch.cat([moving_images, self.organs], dim=1) if self.shared else moving_images
            smooth_dr = variance_floor_for(cfg.lncc_kernel, 3, cfg.lncc_var_floor)
            if cfg.fast_lncc:
                self.lncc = FastLNCC(3, cfg.lncc_kernel, reduction="batch", smooth_dr=smooth_dr)
                self.fixed = self.lncc.target_stats(fixed)  # filtered once, reused every step
            else:  # reference path: MONAI's implementation of the same quantity
                self.lncc = LocalNormalizedCrossCorrelationLoss(3, cfg.lncc_kernel, reduction="none",
                                                                smooth_dr=smooth_dr)
                self.fixed = fixed

    def __call__(self, field: torch.Tensor, base_coords: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        loss = torch.zeros(field.shape[0], device=field.device)
        if self.use_image:
            warped = sample(self.images, sampling_grid(base_coords, field, self.size))
            img, organs = warped.split([1, warped.shape[1] - 1], dim=1) if self.shared else (warped, None)
            if cfg.fast_lncc:
                sim = self.lncc(img, self.fixed)
            else:
                sim = self.lncc(img, self.fixed.expand_as(img)).flatten(1).mean(1)
            loss = loss + cfg.image_weight * sim
        if self.use_mask:
            if not self.shared:
                organs = sample(self.organs, sampling_grid(base_coords, field, self.mask_size))
            dice = self.dice(organs, self.target.expand_as(organs)).flatten(1).mean(1)
            loss = loss + cfg.mask_weight * dice
        if self.regularise and min(field.shape[2:]) > 2:
            loss = loss + smoothness(field, cfg.bending_weight, cfg.diffusion_weight)
        return loss


def optimise(objective, params: torch.Tensor, iterations: int, lr: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Adam on ``params`` for ``iterations`` steps minimising ``objective(params).sum()``.

    The losses are kept as tensors (converted once at the end): calling ``.item()`` every step would
    force a GPU synchronisation per iteration.
    """
    params = params.detach().clone().requires_grad_(True)
    # fused: one kernel per step instead of about ten (available on CPU and CUDA).
    opt = torch.optim.Adam([params], lr=lr, fused=params.device.type in ("cpu", "cuda"))
    history = []
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        loss = objective(params).sum()  # sum over atlases: independent per-atlas Adam steps
        loss.backward()
        opt.step()
        history.append(loss.detach())
    return params.detach(), history


# ---------------------------------------------------------------------------------------- the pipeline


def pyramid(size: Shape, cfg: RegisterConfig) -> list[tuple[Shape, Shape]]:
    """(image grid, field grid) per level, coarse to fine."""
    levels = []
    for lvl in range(cfg.levels):
        f = cfg.image_scale / 2 ** (cfg.levels - 1 - lvl)
        img = tuple(max(8, round(s * f)) for s in size)
        fld = tuple(max(4, round(s * cfg.field_scale)) for s in img)
        levels.append((img, fld))
    return levels


def to_onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer maps (N, H, W, D) or one-hot (N, C, H, W, D) -> float one-hot (N, C, H, W, D)."""
    if labels.ndim == 5:
        if labels.shape[1] != num_classes:
            raise ValueError(f"one-hot labels have {labels.shape[1]} channels, num_classes is {num_classes}")
        return labels.float()
    if labels.ndim != 4:
        raise ValueError(f"labels must be (N, H, W, D) integers or (N, C, H, W, D) one-hot, got {tuple(labels.shape)}")
    lab = labels.long()
    if lab.min() < 0 or lab.max() >= num_classes:
        raise ValueError(f"label values must lie in [0, {num_classes - 1}], found {lab.min()}..{lab.max()}")
    # scatter_ into a float tensor: F.one_hot would first build an int64 copy twice the final size.
    return torch.zeros(lab.shape[0], num_classes, *lab.shape[1:], device=lab.device).scatter_(1, lab[:, None], 1.0)


def _check_inputs(fixed, moving, labels, cfg, num_classes, target_mask) -> None:
    if cfg.supervision not in SUPERVISIONS:
        raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {cfg.supervision!r}")
    if cfg.mask_grid not in ("field", "image"):
        raise ValueError(f"mask_grid must be 'field' or 'image', got {cfg.mask_grid!r}")
    if cfg.init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {cfg.init!r}")
    if cfg.warm_start_iterations < 0:
        raise ValueError(f"warm_start_iterations must be >= 0, got {cfg.warm_start_iterations}")
    if fixed.ndim != 5 or fixed.shape[:2] != (1, 1):
        raise ValueError(f"fixed image must be (1, 1, H, W, D), got {tuple(fixed.shape)}")
    if moving.ndim != 5 or moving.shape[1] != 1 or moving.shape[2:] != fixed.shape[2:]:
        raise ValueError(f"moving images must be (N, 1, {', '.join(map(str, fixed.shape[2:]))}), "
                         f"got {tuple(moving.shape)}; resample atlases onto the fixed grid first")
    if labels.shape[0] != moving.shape[0] or labels.shape[-3:] != fixed.shape[2:]:
        raise ValueError(f"moving labels {tuple(labels.shape)} do not match moving images {tuple(moving.shape)}")
    if cfg.supervision != "intensity":
        if target_mask is None:
            raise ValueError(f"supervision={cfg.supervision!r} needs target_mask (1, C, H, W, D) probabilities")
        if tuple(target_mask.shape) != (1, num_classes, *fixed.shape[2:]):
            raise ValueError(f"target_mask must be (1, {num_classes}, {', '.join(map(str, fixed.shape[2:]))}), "
                             f"got {tuple(target_mask.shape)}")
    for name, t in (("fixed image", fixed), ("moving images", moving)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contain NaN or inf")


def _register_chunk(fixed, moving, organs: Callable[[Shape, Shape], torch.Tensor], target, cfg: RegisterConfig,
                    init_ddf: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """Full-resolution displacement (N, 3, H, W, D) for one batch of atlases, plus the loss history.

    ``organs(image_size, mask_size)`` gives this batch's organ maps as a level compares them (mask supervision).
    """
    size = tuple(fixed.shape[2:])
    levels = pyramid(size, cfg)
    n = moving.shape[0]
    history: list[torch.Tensor] = []
    mask_supervised = cfg.supervision != "intensity"

    def objective_at(img_size, fld_size=None, regularise=True):
        given = organs(img_size, mask_grid_size(cfg, img_size, fld_size)) if mask_supervised else None
        return LevelObjective(resize_volume(fixed, img_size), resize_volume(moving, img_size), None,
                              resize_volume(target, img_size) if target is not None else None,
                              cfg, field_size=fld_size, regularise=regularise, moving_organs=given)

    theta = torch.eye(3, 4, device=fixed.device).repeat(n, 1, 1)
    if cfg.init in ("com", "affine"):
        theta = centre_of_mass_affine(fixed, moving, cfg.body_threshold)
    fld, iterations = None, cfg.iterations
    if init_ddf is not None:
        # Warm start: the previous alignment, less the (deterministic) centre-of-mass part, becomes the
        # initial field of the finest level, which alone is refined for ``warm_start_iterations`` steps.
        levels, iterations = levels[-1:], cfg.warm_start_iterations
        fld = resize_field(init_ddf - affine_to_ddf(theta, size), levels[0][1])
    elif cfg.init == "affine" and cfg.affine_iterations > 0:
        # Same similarity as the deformable part on the coarsest grid, no regulariser (an affine map is
        # smooth by construction). A zero 4^3 field stands in for the deformable part.
        objective = objective_at(levels[0][0], regularise=False)  # Dice on the image grid
        no_field = torch.zeros(n, 3, 4, 4, 4, device=fixed.device)
        theta, hist = optimise(lambda th: objective(no_field, affine_coords(th, (4, 4, 4))), theta,
                               cfg.affine_iterations, cfg.affine_lr)
        history += hist

    for img_size, fld_size in levels:
        objective = objective_at(img_size, fld_size)
        base = affine_coords(theta, fld_size)  # fixed during the deformable stage: computed once per level
        fld = torch.zeros(n, 3, *fld_size, device=fixed.device) if fld is None else resize_field(fld, fld_size)
        fld, hist = optimise(lambda f, obj=objective, b=base: obj(f, b), fld, iterations, cfg.lr)
        history += hist
    ddf = affine_to_ddf(theta, size) + resize_field(fld, size)
    return ddf, history


def register_atlases(fixed_image: torch.Tensor, moving_images: torch.Tensor, moving_labels: torch.Tensor,
                     cfg: RegisterConfig, num_classes: int, target_mask: torch.Tensor | None = None,
                     device: str | torch.device = "auto", generator_seed: int | None = None,
                     init_displacement: torch.Tensor | None = None,
                     organs: AtlasOrgans | None = None) -> RegistrationResult:
    """Register N atlases onto one fixed image in one batched optimisation.

    Args:
        fixed_image: (1, 1, H, W, D) in [0, 1], the inference image.
        moving_images: (N, 1, H, W, D) atlases on the same grid (preprocessing resamples them there).
        moving_labels: (N, H, W, D) integer maps or (N, C, H, W, D) one-hot.
        cfg: see :class:`isl_core.config.RegisterConfig`; ``cfg.supervision`` picks the loss.
        num_classes: C, background included.
        target_mask: (1, C, H, W, D) probabilities M for ``mask`` / ``both`` supervision.
        device: ``auto`` | ``cpu`` | ``cuda`` ...; results stay on it.
        generator_seed: the optimisation draws no random numbers (zero initial field, deterministic
            initial alignment), so this only seeds torch inside a forked RNG state for forward
            compatibility with stochastic variants; the caller's RNG is never disturbed.
        init_displacement: (N, 3, H, W, D) a previous registration's ``displacement`` to start from; only the
            finest level then runs, for ``cfg.warm_start_iterations`` steps (a later ISL round).
        organs: an :class:`AtlasOrgans` made for ``moving_labels`` (this very tensor), kept by the caller to
            share the resampled organ maps between mask-supervised registrations of the same atlases.
    """
    if organs is not None and organs.labels is not moving_labels:
        raise ValueError("organs= was made for another label tensor; make one AtlasOrgans per set of atlas labels "
                         "and pass that same tensor as moving_labels")
    organs = organs if organs is not None else AtlasOrgans(moving_labels)  # for this call only
    # MONAI MetaTensors carry metadata through every operation, which costs time in a hot loop and means
    # nothing for tensors on a common grid: work on plain tensors.
    plain = [None if t is None else torch.as_tensor(t).as_subclass(torch.Tensor)
             for t in (fixed_image, moving_images, moving_labels, target_mask)]
    fixed_image, moving_images, moving_labels, target_mask = plain
    _check_inputs(fixed_image, moving_images, moving_labels, cfg, num_classes, target_mask)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    fixed = fixed_image.to(dev, torch.float32)
    moving = moving_images.to(dev, torch.float32)
    onehot = to_onehot(moving_labels.to(dev), num_classes)
    target = target_mask.to(dev, torch.float32) if target_mask is not None and cfg.supervision != "intensity" else None
    n = moving.shape[0]
    chunk = cfg.atlas_chunk if cfg.atlas_chunk > 0 else n  # chunks bound memory; each atlas is independent
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        ddf, histories, chunk = _register_in_chunks(fixed, moving, onehot, target, cfg, init_displacement, chunk,
                                                    organs)
    # Histories of chunks are added step by step so the curve always means "sum over all atlases".
    steps = min((h.numel() for h in histories), default=0)
    history = sum(h[:steps] for h in histories).tolist() if steps else []
    with torch.no_grad():
        warped_images = torch.cat([warp(moving[i:i + chunk], ddf[i:i + chunk]) for i in range(0, n, chunk)])
        warped_onehot = torch.cat([warp(onehot[i:i + chunk], ddf[i:i + chunk]) for i in range(0, n, chunk)])
        # Labels: warp the one-hot linearly and take the argmax, rather than nearest-neighbour on the
        # label map. The argmax of interpolated one-hot is the label with the largest partial volume at
        # the sampled point: boundaries are placed with sub-voxel accuracy instead of snapping to the
        # nearest source voxel (staircase, thin structures breaking up), and the hard labels are by
        # construction consistent with the soft ones used for training and fusion.
        warped_labels = warped_onehot.argmax(1)
        folds = folding_fraction(ddf)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return RegistrationResult(ddf, warped_images, warped_onehot, warped_labels, folds, history,
                              time.perf_counter() - t0, chunk)


def _register_in_chunks(fixed, moving, onehot, target, cfg: RegisterConfig, init: torch.Tensor | None, chunk: int,
                        organs: AtlasOrgans) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Displacements of all atlases, ``chunk`` at a time; the chunk is halved whenever the device runs out of memory.

    Atlases are registered independently (the loss is a sum over atlases, and every operation is per atlas),
    so the chunk size changes the memory needed, not the result (``tests/test_register.py``). Returns the
    displacements, the loss history of every chunk and the chunk size that fitted.
    """
    n, dev = moving.shape[0], fixed.device
    ddfs, histories, start = [], [], 0
    while start < n:
        sl = slice(start, start + chunk)
        try:
            ddf, hist = _register_chunk(fixed, moving[sl],
                                        lambda img_size, mask_size, sl=sl: organs.at(onehot, sl, img_size, mask_size),
                                        target, cfg, None if init is None else init[sl].to(dev, torch.float32))
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(f"registration ran out of memory on {dev}; retrying with {chunk} atlases at a time "
                          f"(set register.atlas_chunk = {chunk} to start there)", stacklevel=3)
            continue
        ddfs.append(ddf)
        histories.append(torch.stack(hist) if hist else torch.zeros(0, device=dev))
        start += ddf.shape[0]
    return torch.cat(ddfs), histories, chunk


__all__ = [
    "RegistrationResult", "register_atlases", "warp", "jacobian_determinant", "folding_fraction", "resize_field",
    "resize_volume", "affine_to_ddf", "affine_coords", "centre_of_mass_affine", "sampling_grid", "sample",
    "smoothness", "LevelObjective", "optimise", "pyramid", "to_onehot", "AtlasOrgans", "organ_maps", "mask_grid_size",
    "FastLNCC",
]
