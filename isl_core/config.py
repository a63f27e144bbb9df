"""Settings of every stage and the named profiles ``ci``, ``smoke``, ``quick`` and ``paper``.

This module is the single source of truth for every tunable number of the kit. A profile bundles one
dataclass per pipeline stage; ``get_profile(name, **overrides)`` returns a fresh copy that callers may change
without affecting the registry. Every setting is checked when it is set: a string option outside its allowed
values, or a number outside its range, raises ``ValueError`` naming the field. Checkpoints and result folders
store ``profile.to_dict()``; ``Profile.from_dict`` rebuilds it and refuses keys it does not know, so a renamed
field in an old ``config.json`` never falls back to a default without a word.

Why the values are what they are is documented in ``docs/paper_reconstruction.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from data_download.labels import BTCV_LABELS

__all__ = [
    "BTCV_LABELS", "METHODS", "CONTROL_ARMS", "DEFAULT_METHODS", "DataConfig", "SegmentConfig", "RegisterConfig",
    "FusionConfig", "RefineConfig", "Profile", "PROFILE_NAMES", "get_profile", "SYNTH_COHORTS",
]

#: Method names understood by ``isl experiment`` (the paper's variants plus the kit's extensions).
#: The control arms among them: what ISL's gain is made of, and the test-time adaptation a user would try first.
CONTROL_ARMS: tuple[str, ...] = ("finetune-atlases", "tent", "pseudo-label", "isl-intensity-matched")
METHODS: tuple[str, ...] = (
    "baseline", "malf", "isl-intensity", "isl-mask", "isl-mask-ema", "isl-intensity-ema", "isl-mask-ema-malf",
    *CONTROL_ARMS, "malf-source",
)
#: The methods run when ``--methods`` is not given.
DEFAULT_METHODS: tuple[str, ...] = ("baseline", "malf", "isl-intensity", "isl-mask", "isl-mask-ema")

Supervision = Literal["intensity", "mask", "both"]


class _Checked:
    """Checks every field whenever it is set (at construction and on later assignment).

    The annotation gives each field's type: ``Literal[...]`` the allowed values of a string option, ``int`` /
    ``float`` / ``bool`` / ``str`` the type, ``tuple[float, float, float]`` a sequence of exactly three numbers and
    ``tuple[int, ...]`` a non-empty one (a list becomes the tuple). ``_RANGES`` maps a numeric field (or each item
    of a tuple field) to ``(low, high, high_inclusive[, low_inclusive])`` (``None``: unbounded); settings that must
    agree are checked by ``_check_together`` once an object is complete. Checking on assignment matters because
    notebooks change profiles in place: ``profile.refine.appearance = "mtach"`` must fail there, not later.
    """

    _RANGES: typing.ClassVar[dict[str, tuple]] = {}

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, _check_field(type(self), name, value))

    def __post_init__(self) -> None:
        self._check_together()

    def _check_together(self) -> None:
        """Raise ``ValueError`` when two settings of this stage contradict each other."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_a(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind) if isinstance(kind, type) else True


_WORDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a text"}


def _in_range(value: Any, bounds: tuple | None) -> bool:
    lo, hi, hi_inclusive, lo_inclusive = (*bounds, True)[:4] if bounds else (None, None, False, True)
    return (lo is None or value > lo or (lo_inclusive and value == lo)) and \
        (hi is None or value < hi or (hi_inclusive and value == hi))


def _range_words(bounds: tuple) -> str:
    lo, hi, hi_inclusive, *rest = bounds
    parts = [] if lo is None else [f"{'>=' if (rest[0] if rest else True) else '>'} {lo}"]
    parts += [] if hi is None else [f"{'<=' if hi_inclusive else '<'} {hi}"]
    return " and ".join(parts)


def _check_field(cls: type, name: str, value: Any) -> Any:
    """``value`` checked against the field's type, length and range (a list becomes a tuple); else ``ValueError``."""
    where = f"{cls.__name__}.{name}"
    hint = _hints(cls).get(name)
    bounds = cls._RANGES.get(name)
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ValueError(f"{where} = {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if typing.get_origin(hint) is tuple:
        kinds = typing.get_args(hint)
        kind, length = kinds[0], (None if kinds[-1] is Ellipsis else len(kinds))
        shape = f"{length} items" if length else "one or more items"
        want = f"a list of {shape}, each {_WORDS.get(kind, kind)}{' ' + _range_words(bounds) if bounds else ''}"
        ok = isinstance(value, (list, tuple)) and (len(value) == length if length else len(value) > 0)
        if not ok or not all(_is_a(v, kind) and _in_range(v, bounds) for v in value):
            raise ValueError(f"{where} = {value!r} is not allowed; it must be {want}")
        return tuple(value)
    if hint in _WORDS:
        if not _is_a(value, hint) or not _in_range(value, bounds):
            extra = f" {_range_words(bounds)}" if bounds else ""
            raise ValueError(f"{where} = {value!r} is not allowed; it must be {_WORDS[hint]}{extra}")
    return value


_POSITIVE = (1, None, False)  # an integer count of at least one
_NON_NEGATIVE = (0, None, False)
_FRACTION = (0, 1, True)
_ABOVE_ZERO = (0, None, False, False)  # a size or a scale: any positive number


@dataclass
class DataConfig(_Checked):
    """Preprocessing: every case is brought onto one common grid so atlases can be registered in a batch."""

    spacing: tuple[float, float, float] = (8.0, 8.0, 10.0)  # target voxel size in mm (RAS order)
    shape: tuple[int, int, int] = (48, 48, 32)  # common grid after foreground crop and pad
    modality: str = "CT"
    ct_window: tuple[float, float] = (-175.0, 250.0)  # HU window mapped to [0, 1] (abdominal soft tissue)
    crop_foreground: bool = True  # crop to the body (intensity above the window's lower bound)

    _RANGES = {"spacing": _ABOVE_ZERO, "shape": _POSITIVE}

    def _check_together(self) -> None:
        if not self.ct_window[0] < self.ct_window[1]:
            raise ValueError(f"DataConfig.ct_window = {self.ct_window!r}: the lower bound must be below the upper")


@dataclass
class SegmentConfig(_Checked):
    """Stage 1: the baseline segmenter and its training schedule."""

    arch: Literal["unet", "dynunet"] = "unet"  # monai.networks.nets.UNet or DynUNet
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
    amp: bool = True  # bf16 autocast of the network where the hardware has bf16 (CUDA; CPUs with AVX-512 BF16 / AMX)
    sw_overlap: float = 0.25  # sliding-window inference overlap
    sw_batch_size: int = 4

    _RANGES = {"batch_size": _POSITIVE, "num_samples": _POSITIVE, "max_steps": _NON_NEGATIVE,
               "lr": (0, None, False), "warmup_steps": _NON_NEGATIVE, "val_every": _POSITIVE,
               "checkpoint_every": _POSITIVE, "dropout": (0, 1, False), "sw_overlap": (0, 1, False),
               "sw_batch_size": _POSITIVE, "grad_clip": _NON_NEGATIVE, "weight_decay": _NON_NEGATIVE,
               "channels": _POSITIVE, "strides": _POSITIVE, "patch_size": _POSITIVE, "num_res_units": _NON_NEGATIVE,
               "pos_neg_ratio": _NON_NEGATIVE}

    def _check_together(self) -> None:
        # UNet needs one stride between each pair of levels; DynUNet uses the first len(strides) + 1 channels
        n = len(self.strides) + 1
        if (self.arch == "unet" and len(self.channels) != n) or (self.arch == "dynunet" and len(self.channels) < n):
            raise ValueError(f"SegmentConfig.channels = {self.channels!r} and strides = {self.strides!r} do not fit "
                             f"a {self.arch}: give {'exactly' if self.arch == 'unet' else 'at least'} one more "
                             "channel count than strides")


@dataclass
class RegisterConfig(_Checked):
    """Stage 2: batched instance-optimised deformable registration of atlases onto the inference image."""

    supervision: Supervision = "intensity"
    supervision_mask: Literal["mask", "both"] = "both"  # what the isl-mask* methods use: mask term only, or + LNCC
    init: Literal["com", "affine", "none"] = "com"  # initial alignment: centre of mass of the body, + affine, none
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
    reference_spacing_mm: float = 0.0  # >0: the bending weight holds for field voxels of this size in mm and is
    #                                    rescaled on other grids (same physical stiffness); 0: per voxel
    fast_lncc: bool = True  # False uses monai's LocalNormalizedCrossCorrelationLoss (reference path)
    atlas_chunk: int = 0  # 0: all atlases in one batch; >0: at most this many at once (memory)
    body_threshold: float = 0.05  # init "com": the body is image > this (a mask, robust to contrast changes)
    affine_iterations: int = 40  # init "affine": Adam steps on a 12-parameter affine after the com step
    affine_lr: float = 0.01  # init "affine": step in normalised coordinates ([-1, 1] spans the field of view)
    lncc_var_floor: float = 1e-4  # local variance below this counts as flat (no information) in the LNCC
    mask_grid: Literal["field", "image"] = "field"  # where the soft Dice is evaluated: the field or image grid
    warm_start_iterations: int = 0  # >0: a later ISL round refines the previous round's alignment (finest level
    #                                 only, this many steps) instead of registering from scratch

    _RANGES = {"image_scale": (0, None, False), "field_scale": (0, 1, True), "levels": _POSITIVE,
               "iterations": _NON_NEGATIVE, "lr": (0, None, False), "lncc_kernel": _POSITIVE,
               "image_weight": _NON_NEGATIVE, "mask_weight": _NON_NEGATIVE, "bending_weight": _NON_NEGATIVE,
               "diffusion_weight": _NON_NEGATIVE,
               "reference_spacing_mm": _NON_NEGATIVE, "atlas_chunk": _NON_NEGATIVE, "affine_iterations": _NON_NEGATIVE,
               "affine_lr": (0, None, False), "lncc_var_floor": _NON_NEGATIVE,
               "warm_start_iterations": _NON_NEGATIVE}


@dataclass
class FusionConfig(_Checked):
    """Multi-atlas label fusion (the ``malf`` baseline)."""

    method: Literal["majority", "weighted"] = "weighted"  # majority vote or local LNCC-weighted vote
    kernel: int = 5
    temperature: float = 0.1  # softness of the local similarity weights

    _RANGES = {"kernel": _POSITIVE, "temperature": (0, None, False)}


@dataclass
class RefineConfig(_Checked):
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
    appearance: Literal["match", "none"] = "match"  # "match": warped atlases take x*'s organ intensities and noise
    appearance_guide: Literal["atlases", "mask"] = "atlases"  # where x*'s organ intensities are read: the atlases'
    #                                                           consensus or the current mask M
    patch_sampling: Literal["foreground", "uniform"] = "foreground"  # fine-tuning patches smaller than the grid:
    #     centred on an organ voxel with Stage 1's pos_neg_ratio share ("foreground"), or anywhere ("uniform")
    consensus_agree: float = 0.5  # "atlases" guide: class k where at least this share of the warped atlases has it
    # Intensity augmentation of the deformed atlases during fine-tuning (per sample, uniform in each range)
    augment_gamma: tuple[float, float] = (0.8, 1.25)  # gamma of the [0, 1] intensities
    augment_scale: tuple[float, float] = (0.9, 1.1)  # multiplicative contrast
    augment_shift: float = 0.05  # additive offset in [-shift, +shift]
    augment_noise: float = 0.03  # Gaussian noise with a standard deviation up to this

    _RANGES = {"rounds": _POSITIVE, "finetune_steps": _POSITIVE, "lr": (0, None, False),
               "batch_size": _POSITIVE, "mix_original": (0, 1, False), "beta": (0, 1, False),
               "ema_every": _NON_NEGATIVE, "malf_blend": _FRACTION, "mask_from_round": _POSITIVE,
               "consensus_agree": _FRACTION, "augment_shift": _NON_NEGATIVE, "augment_noise": _NON_NEGATIVE,
               "augment_gamma": _ABOVE_ZERO, "augment_scale": _ABOVE_ZERO}

    def _check_together(self) -> None:
        for name in ("augment_gamma", "augment_scale"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"RefineConfig.{name} = {(lo, hi)!r}: the lower bound must not exceed the upper")


_STAGES: dict[str, type] = {"data": DataConfig, "segment": SegmentConfig, "register": RegisterConfig,
                            "fusion": FusionConfig, "refine": RefineConfig}


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
        """Rebuild a profile from ``to_dict()`` output; unknown stages or fields raise ``ValueError``."""
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ValueError("a profile must be a mapping with a 'name' string and one mapping per stage")
        unknown = sorted(set(d) - {"name", *_STAGES})
        if unknown:
            raise ValueError(f"profile {d['name']!r}: unknown stage(s) {unknown}; known: {', '.join(_STAGES)}")
        return cls(name=d["name"], **{stage: _build(dc, d.get(stage, {}), f"{d['name']}.{stage}")
                                      for stage, dc in _STAGES.items()})


def _build(dc: type, values: Any, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"profile section {where} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(dc)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"profile section {where}: unknown field(s) {unknown}; was the setting renamed? "
                         f"Known fields: {', '.join(sorted(names))}")
    return dc(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _shallow(settings: Any) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def _ci() -> Profile:
    # Tiny: the whole test suite must run in minutes on 2 CPU cores.
    return Profile(
        name="ci",
        data=DataConfig(spacing=(8.0, 8.0, 10.0), shape=(48, 48, 32)),
        segment=SegmentConfig(channels=(8, 16, 32), strides=(2, 2), max_steps=60, val_every=30,
                              checkpoint_every=30, patch_size=(48, 48, 32), batch_size=2, num_samples=1),
        register=RegisterConfig(iterations=15, levels=2, warm_start_iterations=8),
        refine=RefineConfig(rounds=2, finetune_steps=6, batch_size=2, ema_every=3),
    )


def _smoke() -> Profile:
    # The ci profile cut further, so that the notebooks (and their exercises) run in a few minutes on 2 CPU
    # cores. Its numbers only show that everything runs; its synthetic cohort (SYNTH_COHORTS) is small too.
    p = _ci()
    return Profile(name="smoke", data=p.data,
                   segment=dataclasses.replace(p.segment, max_steps=20),
                   register=dataclasses.replace(p.register, iterations=8, image_scale=0.5),
                   fusion=p.fusion,
                   refine=dataclasses.replace(p.refine, finetune_steps=2, ema_every=1))


def _quick() -> Profile:
    # A laptop CPU: the README demo (on 2 cores the seven-method experiment takes about 6 minutes, all notebooks 14).
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
        # reference_spacing_mm: the bending weight was chosen on the quick profile, whose finest field grid has
        # voxels of about 17.7 mm; in millimetres the paper grid's fields are then as stiff as the quick ones
        register=RegisterConfig(image_scale=0.5, field_scale=0.5, levels=3, iterations=100, lncc_kernel=7,
                                warm_start_iterations=50, reference_spacing_mm=17.7),
        refine=RefineConfig(rounds=3, finetune_steps=200, batch_size=4, lr=2e-4, mix_original=0.25,
                            ema_every=50),
    )


_PROFILES = {"ci": _ci, "smoke": _smoke, "quick": _quick, "paper": _paper}
PROFILE_NAMES: tuple[str, ...] = tuple(_PROFILES)


def get_profile(name: str = "quick", **overrides: dict[str, Any]) -> Profile:
    """A fresh copy of the named profile, with optional per-stage overrides.

    ``get_profile("quick", refine={"rounds": 3, "beta": 0.5})`` changes those two settings of Stage 3; every
    override is checked like any setting (unknown stage or field, or a value out of range: ``ValueError``).
    """
    if name not in _PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILE_NAMES)}")
    profile = _PROFILES[name]()  # the builders make new objects on every call: nothing is shared
    for stage, values in overrides.items():
        if stage not in _STAGES:
            raise ValueError(f"unknown profile stage {stage!r} in the overrides; known: {', '.join(_STAGES)}")
        setattr(profile, stage, _build(_STAGES[stage], {**_shallow(getattr(profile, stage)), **values},
                                       f"{name}.{stage}"))
    return profile


#: The synthetic cohort each profile uses when no dataset is given (``isl reproduce``, notebooks, tests);
#: ``quick`` and ``paper`` use the default cohort of ``isl data synth``. See ``phantoms.cohort_for_profile``.
SYNTH_COHORTS: dict[str, dict[str, Any]] = {
    "ci": {"n_train": 6, "n_val": 3, "size": (64, 64, 40)},
    "smoke": {"n_train": 6, "n_val": 2, "size": (64, 64, 40)},
    "quick": {"n_train": 12, "n_val": 6, "size": (96, 96, 64)},
    "paper": {"n_train": 12, "n_val": 6, "size": (96, 96, 64)},
}


# ------------------------------------------------------------------------------------- --set STAGE.FIELD=VALUE
Setting = tuple[str, str, Any]


def parse_setting(text: str) -> Setting:
    """``"STAGE.FIELD=VALUE"`` -> ``(stage, field, value)``, the value read as JSON when it parses, else as text,
    and checked against the field (type, length, range) here, before anything runs; else ``ValueError``."""
    key, eq, raw = text.partition("=")
    stage, dot, name = key.strip().partition(".")
    name = name.strip()
    if not eq or not dot or not stage or not name:
        raise ValueError(f"{text!r}: write STAGE.FIELD=VALUE, e.g. refine.appearance=none or data.spacing=[6,6,8]")
    if stage not in _STAGES:
        raise ValueError(f"{text!r}: unknown stage {stage!r}; known: {', '.join(_STAGES)}")
    fields = {f.name for f in dataclasses.fields(_STAGES[stage])}
    if name not in fields:
        raise ValueError(f"{text!r}: unknown field {name!r} of {stage}; known: {', '.join(sorted(fields))}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return stage, name, _check_field(_STAGES[stage], name, value)


def profile_from_settings(name: str, settings: Sequence[Setting] = (),
                          options: Mapping[str, Setting | None] | None = None) -> Profile:
    """The profile ``name`` with ``settings`` (parsed ``--set`` values) and ``options`` applied.

    ``options`` maps a command-line option (``"--beta"``) to the setting it sets, ``None`` when it was not given.
    Each setting has one entry point: one set twice to different values (``--beta 0.5 --set refine.beta=0.7``, or
    two ``--set`` of one field) raises ``ValueError`` naming both.
    """
    given: dict[tuple[str, str], tuple[str, Any]] = {}
    named = [(f"--set {s}.{f}={json.dumps(v)}", (s, f, v)) for s, f, v in settings]
    named += [(f"{opt} {json.dumps(st[2])}", st) for opt, st in (options or {}).items() if st is not None]
    for words, (stage, field_name, value) in named:
        earlier = given.setdefault((stage, field_name), (words, value))
        if earlier[1] != value:
            raise ValueError(f"{earlier[0]} and {words} set {stage}.{field_name} to different values; give one")
    overrides: dict[str, dict[str, Any]] = {}
    for (stage, field_name), (_, value) in given.items():
        overrides.setdefault(stage, {})[field_name] = value
    return get_profile(name, **overrides)
