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

Three layers: :mod:`isl_core.transforms` (grids, warping, resampling, Jacobians, one-hot maps),
:mod:`isl_core.losses` and :mod:`isl_core.lncc` (the terms above, one value per atlas), and this module
(the objective of one pyramid level, the optimiser, the pyramid, chunking and warm starts).

Why a hand-written loop (MONAI has the pieces, not the loop)
-----------------------------------------------------------
All N atlases are one batch: one resampling call, one LNCC call, one backward pass per step. The per-atlas
losses are **summed** (never averaged over the batch): the gradient of atlas ``i``'s field then depends on
atlas ``i`` alone, and Adam's element-wise update makes the batched optimisation identical to N separate
ones (``tests/test_register.py`` checks it to 1e-3 voxel). Averaging would only rescale gradients, which
Adam mostly undoes, but summing makes the independence exact and obvious.

MONAI provides the reference for every piece, and the tests check each hand-written replacement against
it: ``Warp`` (used for all outputs; inside the loop :func:`~isl_core.transforms.sampling_grid` builds the same
grid straight from the low-resolution field), ``LocalNormalizedCrossCorrelationLoss``
(:class:`isl_core.lncc.FastLNCC`, ``cfg.fast_lncc=False`` switches back), ``BendingEnergyLoss`` /
``DiffusionLoss`` (:func:`~isl_core.losses.smoothness`), and ``DiceLoss`` (used as is). Each replacement exists
because the MONAI version dominated the iteration time.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss

from isl_core.config import RegisterConfig
from isl_core.lncc import FastLNCC, variance_floor_for
from isl_core.losses import Smoothness, SoftDice, smoothness
from isl_core.runtime import resolve_device
from isl_core.transforms import (
    Shape,
    affine_coords,
    affine_to_ddf,
    centre_of_mass_affine,
    folding_fraction,
    jacobian_determinant,
    resize_field,
    resize_volume,
    sample,
    sampling_grid,
    to_onehot,
    warp,
)


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


# ---------------------------------------------------------------------------------------------- the atlases


def organ_maps(onehot: torch.Tensor, image_size: Shape, mask_size: Shape) -> torch.Tensor:
    """(N, C - 1, *mask_size): the organ channels of a one-hot resampled as a pyramid level compares them."""
    # One atlas at a time: smoothing a full-resolution one-hot before shrinking it holds several copies of its
    # input (at paper size 2.1 GB each for 24 atlases), so a batch would set the registration's peak memory.
    # Resampling is per atlas and per channel, so the result has the same bits as a batch would.
    return torch.cat([resize_volume(resize_volume(onehot[i:i + 1, 1:], image_size), mask_size)
                      for i in range(onehot.shape[0])])


class Atlases:
    """The labelled training cases on the common grid: what registration deforms onto an inference image.

    ``images`` (N, 1, H, W, D) in [0, 1]; ``labels`` (N, H, W, D) integer maps or (N, C, H, W, D) one-hot.
    It also keeps the atlases' organ maps as mask supervision compares them on each pyramid grid: they depend on
    the labels and the grid only, not on the inference image, the mask M or the round, so every mask-supervised
    registration of the same atlases (each ISL round and variant, each case of an experiment) shares them (0.2 s
    per registration at the quick size on 2 CPU cores; more at paper size, where the coarse levels smooth a 2.1 GB
    one-hot). Only the small resampled maps are kept (the field grid has 1/8 of the voxels).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 spacing: tuple[float, float, float] | None = None) -> None:
        self.images = torch.as_tensor(images).float()
        self.labels = torch.as_tensor(labels)
        self.spacing = None if spacing is None else tuple(float(v) for v in spacing)  # mm per voxel of the grid
        if self.images.ndim != 5 or self.images.shape[1] != 1:
            raise ValueError(f"atlas images must be (N, 1, H, W, D), got {tuple(self.images.shape)}")
        if self.labels.shape[0] != self.images.shape[0] or self.labels.shape[-3:] != self.images.shape[2:]:
            raise ValueError(f"atlas labels {tuple(self.labels.shape)} do not match the images "
                             f"{tuple(self.images.shape)}")
        self._maps: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_cases(cls, cases: Sequence[dict[str, Any]], spacing: tuple[float, float, float] | None = None
                   ) -> Atlases:
        """Atlases from preprocessed labelled cases (``data.load_cases``) on a grid of ``spacing`` mm."""
        if not cases or any("label" not in c for c in cases):
            raise ValueError("atlases need at least one preprocessed case, each with a label")
        images = torch.stack([torch.as_tensor(c["image"]).float() for c in cases])
        labels = torch.stack([torch.as_tensor(c["label"])[0].long() for c in cases])
        return cls(images, labels, spacing)

    def __len__(self) -> int:
        return self.images.shape[0]

    def organ_maps(self, onehot: torch.Tensor, atlases: slice, image_size: Shape, mask_size: Shape) -> torch.Tensor:
        """:func:`organ_maps` of ``onehot[atlases]`` (``onehot``: the one-hot of ``labels``), made on first use.

        Kept per batch of atlases, as registration chunks them: making the maps of all atlases at once could
        need more memory than the chunk that fits.
        """
        key = (onehot.device, onehot.shape, atlases.start, atlases.stop, tuple(image_size), tuple(mask_size))
        if key not in self._maps:
            self._maps[key] = organ_maps(onehot[atlases], image_size, mask_size)
        return self._maps[key]


# --------------------------------------------------------------------------------------------- the objective


def mask_grid_size(cfg: RegisterConfig, image_size: Shape, field_size: Shape | None) -> Shape:
    """Where a level evaluates the soft Dice: the field grid (``cfg.mask_grid="field"``) or the image grid."""
    return tuple(field_size) if (field_size and cfg.mask_grid == "field") else tuple(image_size)


class LevelObjective:
    """The registration loss on one pyramid level, per atlas: ``objective(field, base_coords) -> (N,)``.

    The deformation is an affine (given as ``base_coords = affine_coords(theta, field grid)``) plus the
    low-resolution field ``field`` (N, 3, h, w, d; voxels of the field grid) upsampled to this level's image
    grid. LNCC is evaluated on the image grid, the soft Dice on ``field_size`` (``cfg.mask_grid="field"``) or
    on the image grid. Everything that does not change between steps (the fixed image's window statistics,
    the resampled organ maps and target) is prepared once here. ``moving_organs`` hands in the organ maps
    already resampled to the Dice grid (:func:`organ_maps`); otherwise they are made from ``moving_onehot``.
    ``bending_scale`` multiplies the bending weight (:func:`bending_scale` keeps its stiffness in physical units).
    """

    def __init__(self, fixed: torch.Tensor, moving_images: torch.Tensor, moving_onehot: torch.Tensor | None,
                 target_mask: torch.Tensor | None, cfg: RegisterConfig, field_size: Shape | None = None,
                 regularise: bool = True, moving_organs: torch.Tensor | None = None, bending_scale: float = 1.0
                 ) -> None:
        self.cfg = cfg
        self.use_image = cfg.supervision in ("intensity", "both")
        self.use_mask = cfg.supervision in ("mask", "both")
        self.size = tuple(fixed.shape[2:])
        regularise = regularise and (cfg.bending_weight > 0 or cfg.diffusion_weight > 0)
        self.smoothness = Smoothness(cfg.bending_weight * bending_scale, cfg.diffusion_weight) if regularise else None
        # Where the soft Dice is evaluated. On the field grid (default) the organ one-hot (C - 1 channels,
        # the bulk of the work with many organs) is resampled at 1 / field_scale^3 of the voxels; the field
        # cannot express finer detail than its own grid anyway, so the gradient it receives hardly changes.
        self.mask_size = mask_grid_size(cfg, self.size, field_size)
        # On a shared grid, image and organs go through one grid_sample call (one pass over the grid).
        self.shared = self.use_image and self.use_mask and self.mask_size == self.size
        if self.use_mask:
            self.organs = (moving_organs if moving_organs is not None
                           else resize_volume(moving_onehot[:, 1:], self.mask_size))
            self.target = resize_volume(target_mask[:, 1:], self.mask_size)
            self.dice = SoftDice()
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
            loss = loss + cfg.mask_weight * self.dice(organs, self.target)
        if self.smoothness is not None and min(field.shape[2:]) > 2:
            loss = loss + self.smoothness(field)
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


# ---------------------------------------------------------------------------------------------- the pipeline


def pyramid(size: Shape, cfg: RegisterConfig) -> list[tuple[Shape, Shape]]:
    """(image grid, field grid) per level, coarse to fine."""
    levels = []
    for lvl in range(cfg.levels):
        f = cfg.image_scale / 2 ** (cfg.levels - 1 - lvl)
        img = tuple(max(8, round(s * f)) for s in size)
        fld = tuple(max(4, round(s * cfg.field_scale)) for s in img)
        levels.append((img, fld))
    return levels


def bending_scale(cfg: RegisterConfig, spacing: Sequence[float] | None, field_size: Shape, grid_size: Shape
                  ) -> float:
    """Factor on ``cfg.bending_weight`` for a field grid, so that its stiffness is the same in millimetres everywhere.

    The bending energy of a field in voxel units equals ``h**2`` times that of the same displacement in
    millimetres, for field voxels of ``h`` mm (the diffusion energy, a ratio of lengths, does not change). With
    ``cfg.reference_spacing_mm = r > 0`` the weight is multiplied by ``(r / h)**2``: it acts as given on a field
    grid of ``r`` mm and equally stiff on any other (pyramid level, profile). ``h`` is the geometric mean of the
    field voxel's sides. ``r = 0`` keeps the per-voxel weights.
    """
    if cfg.reference_spacing_mm <= 0:
        return 1.0
    if spacing is None:
        raise ValueError("register.reference_spacing_mm > 0 needs the grid spacing: make the atlases with "
                         "Atlases(..., spacing=profile.data.spacing) or Atlases.from_cases(cases, spacing)")
    # align_corners geometry: the grid's extent, (size - 1) voxels, spans (field - 1) field voxels
    sides = [sp * (g - 1) / max(f - 1, 1) for sp, g, f in zip(spacing, grid_size, field_size)]
    h = (sides[0] * sides[1] * sides[2]) ** (1 / 3)
    return (cfg.reference_spacing_mm / h) ** 2


def _check_inputs(fixed, atlases: Atlases, cfg: RegisterConfig, num_classes: int, target_mask) -> None:
    moving = atlases.images
    if fixed.ndim != 5 or fixed.shape[:2] != (1, 1):
        raise ValueError(f"fixed image must be (1, 1, H, W, D), got {tuple(fixed.shape)}")
    if moving.shape[2:] != fixed.shape[2:]:
        raise ValueError(f"moving images must be (N, 1, {', '.join(map(str, fixed.shape[2:]))}), "
                         f"got {tuple(moving.shape)}; resample atlases onto the fixed grid first")
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
                    init_ddf: torch.Tensor | None = None, spacing: Sequence[float] | None = None
                    ) -> tuple[torch.Tensor, list]:
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
        scale = bending_scale(cfg, spacing, fld_size, size) if fld_size else 1.0
        return LevelObjective(resize_volume(fixed, img_size), resize_volume(moving, img_size), None,
                              resize_volume(target, img_size) if target is not None else None,
                              cfg, field_size=fld_size, regularise=regularise, moving_organs=given,
                              bending_scale=scale)

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


def register_atlases(fixed_image: torch.Tensor, atlases: Atlases, cfg: RegisterConfig, num_classes: int,
                     target_mask: torch.Tensor | None = None, init_displacement: torch.Tensor | None = None,
                     device: str | torch.device = "auto") -> RegistrationResult:
    """Register every atlas onto one fixed image in one batched optimisation.

    Args:
        fixed_image: (1, 1, H, W, D) in [0, 1], the inference image.
        atlases: the training cases on the same grid (preprocessing resamples them there); their organ maps
            are resampled once and kept in ``atlases`` for every later mask-supervised registration.
        cfg: see :class:`isl_core.config.RegisterConfig`; ``cfg.supervision`` picks the loss.
        num_classes: C, background included.
        target_mask: (1, C, H, W, D) probabilities M for ``mask`` / ``both`` supervision.
        init_displacement: (N, 3, H, W, D) a previous registration's ``displacement`` to start from; only the
            finest level then runs, for ``cfg.warm_start_iterations`` steps (a later ISL round).
        device: ``auto`` | ``cpu`` | ``cuda`` ...; results stay on it.
    """
    if not isinstance(atlases, Atlases):
        raise TypeError(f"atlases must be an isl_core.register.Atlases, got {type(atlases).__name__}")
    fixed_image = torch.as_tensor(fixed_image)
    _check_inputs(fixed_image, atlases, cfg, num_classes, target_mask)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    fixed = fixed_image.to(dev, torch.float32)
    moving = atlases.images.to(dev, torch.float32)
    onehot = to_onehot(atlases.labels.to(dev), num_classes)
    target = torch.as_tensor(target_mask).to(dev, torch.float32) if cfg.supervision != "intensity" else None
    n = moving.shape[0]
    chunk = cfg.atlas_chunk if cfg.atlas_chunk > 0 else n  # chunks bound memory; each atlas is independent
    ddf, histories, chunk = _register_in_chunks(fixed, moving, onehot, target, cfg, init_displacement, chunk,
                                                atlases)
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
                        atlases: Atlases) -> tuple[torch.Tensor, list[torch.Tensor], int]:
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
                                        lambda img_size, mask_size, sl=sl: atlases.organ_maps(onehot, sl, img_size,
                                                                                              mask_size),
                                        target, cfg, None if init is None else init[sl].to(dev, torch.float32),
                                        atlases.spacing)
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
    "RegistrationResult", "Atlases", "register_atlases", "organ_maps", "mask_grid_size", "LevelObjective",
    "optimise", "pyramid",
    # the lower layers, re-exported for convenience (their home: isl_core.transforms, isl_core.losses)
    "warp", "jacobian_determinant", "folding_fraction", "resize_field", "resize_volume", "affine_to_ddf",
    "affine_coords", "centre_of_mass_affine", "sampling_grid", "sample", "smoothness", "to_onehot", "FastLNCC",
]


def identity_registration(atlases: Atlases, num_classes: int, device: str | torch.device = "auto"
                          ) -> RegistrationResult:
    """The atlases left in their own geometry, as a registration result (zero displacement, nothing folds).

    The ``finetune-atlases`` control arm trains on this: everything ISL does but the deformation onto x*.
    """
    dev = resolve_device(device)
    images = atlases.images.to(dev, torch.float32)
    onehot = to_onehot(atlases.labels.to(dev), num_classes)
    n = images.shape[0]
    return RegistrationResult(torch.zeros(n, 3, *images.shape[2:], device=dev), images, onehot, onehot.argmax(1),
                              torch.zeros(n), [], 0.0, n)
