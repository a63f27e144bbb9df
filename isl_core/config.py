"""Settings of every stage and the named profiles ``ci``, ``quick`` and ``paper``.

This module is the single source of truth for every tunable number of the kit. A profile bundles one
dataclass per pipeline stage; ``get_profile(name, **overrides)`` returns a fresh copy that callers may
change without affecting the registry. Checkpoints and result folders store ``profile.to_dict()`` so a
run can always be rebuilt.

Why the values are what they are is documented in ``docs/paper_reconstruction.md``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: BTCV / Synapse multi-organ label ids, used by the synthetic cohort and the abdominal datasets.
BTCV_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right_kidney",
    3: "left_kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior_vena_cava",
    10: "portal_splenic_vein",
    11: "pancreas",
    12: "right_adrenal",
    13: "left_adrenal",
}

#: Method names understood by ``isl experiment`` (the DESIGN.md contract plus our extensions).
METHODS: tuple[str, ...] = (
    "baseline",
    "malf",
    "isl-intensity",
    "isl-mask",
    "isl-mask-ema",
    "isl-intensity-ema",
    "isl-mask-ema-malf",
)
#: The methods run when ``--methods`` is not given.
DEFAULT_METHODS: tuple[str, ...] = ("baseline", "malf", "isl-intensity", "isl-mask", "isl-mask-ema")


@dataclass
class DataConfig:
    """Preprocessing: every case is brought onto one common grid so atlases can be registered in a batch."""

    spacing: tuple[float, float, float] = (8.0, 8.0, 10.0)  # target voxel size in mm (RAS order)
    shape: tuple[int, int, int] = (48, 48, 32)  # common grid after foreground crop and pad
    modality: str = "CT"
    ct_window: tuple[float, float] = (-175.0, 250.0)  # HU window mapped to [0, 1] (abdominal soft tissue)
    crop_foreground: bool = True  # crop to the body (intensity above the window's lower bound)


@dataclass
class SegmentConfig:
    """Stage 1: the baseline segmenter and its training schedule."""

    arch: str = "unet"  # "unet" (monai.networks.nets.UNet) or "dynunet"
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    dropout: float = 0.0
    patch_size: tuple[int, int, int] = (48, 48, 32)
    batch_size: int = 2  # volumes per step; each contributes ``num_samples`` patches
    num_samples: int = 2  # patches per volume (RandCropByPosNegLabeld)
    pos_neg_ratio: float = 2.0  # foreground : background patch centres
    max_steps: int = 60
    lr: float = 3e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 10
    grad_clip: float = 1.0
    val_every: int = 30
    checkpoint_every: int = 30
    augment: bool = True
    amp: bool = True  # only takes effect on CUDA
    sw_overlap: float = 0.25  # sliding-window inference overlap
    sw_batch_size: int = 4


@dataclass
class RegisterConfig:
    """Stage 2: batched instance-optimised deformable registration of atlases onto the inference image."""

    supervision: str = "intensity"  # "intensity" | "mask" | "both"
    supervision_mask: str = "both"  # what the isl-mask* methods use: "mask" (mask term only) or "both" (+ LNCC)
    init: str = "com"  # initial alignment: "com" (centre of mass of the body), "affine" (com + affine) or "none"
    image_scale: float = 1.0  # registration runs on images resampled by this factor
    field_scale: float = 0.5  # displacement grid relative to the registration grid
    levels: int = 2  # multi-resolution pyramid levels (coarse to fine)
    iterations: int = 60  # Adam iterations at the finest level (coarser levels get the same count)
    lr: float = 0.02  # step in voxel units of the field grid
    lncc_kernel: int = 5  # window of the local normalised cross-correlation (voxels)
    image_weight: float = 1.0  # LNCC weight when intensity supervision is on
    mask_weight: float = 1.0  # soft Dice weight when mask supervision is on
    bending_weight: float = 0.5
    diffusion_weight: float = 0.1
    fast_lncc: bool = True  # False uses monai's LocalNormalizedCrossCorrelationLoss (reference path)
    atlas_chunk: int = 0  # 0: all atlases in one batch; >0: at most this many at once (memory)
    body_threshold: float = 0.05  # init "com": the body is image > this (a mask, robust to contrast changes)
    affine_iterations: int = 40  # init "affine": Adam steps on a 12-parameter affine after the com step
    affine_lr: float = 0.01  # init "affine": step in normalised coordinates ([-1, 1] spans the field of view)
    lncc_var_floor: float = 1e-4  # local variance below this counts as flat (no information) in the LNCC
    mask_grid: str = "field"  # soft Dice evaluated on the "field" grid (cheap with many organs) or the "image" grid
    warm_start_iterations: int = 0  # >0: a later ISL round refines the previous round's alignment (finest level
    #                                 only, this many steps) instead of registering from scratch


@dataclass
class FusionConfig:
    """Multi-atlas label fusion (the ``malf`` baseline)."""

    method: str = "weighted"  # "majority" or "weighted" (local LNCC-weighted vote)
    kernel: int = 5
    temperature: float = 0.1  # softness of the local similarity weights


@dataclass
class RefineConfig:
    """Stage 3: the ISL loop for one inference image."""

    rounds: int = 2
    finetune_steps: int = 30  # per round
    lr: float = 1e-3
    batch_size: int = 4
    mix_original: float = 0.0  # fraction of each batch drawn from the original (unwarped) training set
    ema: bool = True  # moving average of the predicted mask
    beta: float = 0.6
    ema_every: int = 10  # also update the moving average every this many fine-tuning steps (0: only per round)
    malf_blend: float = 0.5  # isl-mask-ema-malf: initial M = blend * MALF + (1 - blend) * P
    mask_from_round: int = 2  # mask-supervised alignment starts here; earlier rounds align intensities only
    appearance: str = "match"  # "match": warped atlases take x*'s organ intensities and noise; "none"
    appearance_guide: str = "atlases"  # where x*'s organ intensities are read: "atlases" (consensus) or "mask" (M)


@dataclass
class Profile:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        def build(dc: type, values: dict[str, Any]):
            kwargs = {}
            for f in dataclasses.fields(dc):
                if f.name in values:
                    v = values[f.name]
                    kwargs[f.name] = tuple(v) if isinstance(v, list) else v
            return dc(**kwargs)

        return cls(
            name=d["name"],
            data=build(DataConfig, d.get("data", {})),
            segment=build(SegmentConfig, d.get("segment", {})),
            register=build(RegisterConfig, d.get("register", {})),
            fusion=build(FusionConfig, d.get("fusion", {})),
            refine=build(RefineConfig, d.get("refine", {})),
        )


def _ci() -> Profile:
    # Tiny: the whole test and notebook suite must run in minutes on 2 CPU cores.
    return Profile(
        name="ci",
        data=DataConfig(spacing=(8.0, 8.0, 10.0), shape=(48, 48, 32)),
        segment=SegmentConfig(channels=(8, 16, 32), strides=(2, 2), max_steps=60, val_every=30,
                              checkpoint_every=30, patch_size=(48, 48, 32), batch_size=2, num_samples=1),
        register=RegisterConfig(iterations=15, levels=2, warm_start_iterations=8),
        refine=RefineConfig(rounds=2, finetune_steps=6, batch_size=2, ema_every=3),
    )


def _quick() -> Profile:
    # A laptop CPU: the README demo (on 2 cores the seven-method experiment takes about 6 minutes, all notebooks 12).
    # 8 mm voxels cover the synthetic cohort's whole field of view in 48x48x32 voxels, so a training step takes
    # a fraction of a second.
    return Profile(
        name="quick",
        data=DataConfig(spacing=(8.0, 8.0, 10.0), shape=(48, 48, 32)),
        segment=SegmentConfig(channels=(16, 32, 64, 128), strides=(2, 2, 2), max_steps=400, val_every=100,
                              checkpoint_every=50, patch_size=(48, 48, 32), batch_size=2, num_samples=1,
                              lr=3e-3, warmup_steps=20),
        register=RegisterConfig(iterations=30, levels=2, warm_start_iterations=15),
        refine=RefineConfig(rounds=2, finetune_steps=20, batch_size=2, ema_every=5),
    )


def _paper() -> Profile:
    # A GPU: the closest reconstruction of a full-size setting (see docs/paper_reconstruction.md).
    return Profile(
        name="paper",
        data=DataConfig(spacing=(1.5, 1.5, 2.0), shape=(256, 256, 192)),
        segment=SegmentConfig(arch="dynunet", channels=(32, 64, 128, 256, 320), strides=(2, 2, 2, 2),
                              num_res_units=2, patch_size=(96, 96, 96), batch_size=2, num_samples=2,
                              max_steps=20000, val_every=1000, checkpoint_every=500, lr=1e-3,
                              warmup_steps=500, sw_batch_size=4, sw_overlap=0.5),
        register=RegisterConfig(image_scale=0.5, field_scale=0.5, levels=3, iterations=100, lncc_kernel=7,
                                warm_start_iterations=50),
        refine=RefineConfig(rounds=3, finetune_steps=200, batch_size=4, lr=2e-4, mix_original=0.25,
                            ema_every=50),
    )


_PROFILES = {"ci": _ci, "quick": _quick, "paper": _paper}
PROFILE_NAMES: tuple[str, ...] = tuple(_PROFILES)


def get_profile(name: str = "quick") -> Profile:
    """A fresh copy of the named profile (``ci``, ``quick`` or ``paper``)."""
    if name not in _PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILE_NAMES)}")
    return copy.deepcopy(_PROFILES[name]())



#: The synthetic cohort each profile uses when no dataset is given (``isl reproduce``, notebooks, tests);
#: ``quick`` and ``paper`` use the default cohort of ``isl data synth``. See ``phantoms.cohort_for_profile``.
SYNTH_COHORTS: dict[str, dict[str, Any]] = {
    "ci": {"n_train": 6, "n_val": 3, "size": (64, 64, 40)},
    "quick": {"n_train": 12, "n_val": 6, "size": (96, 96, 64)},
    "paper": {"n_train": 12, "n_val": 6, "size": (96, 96, 64)},
}
