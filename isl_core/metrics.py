"""Metrics of one case: per-organ Dice and HD95 and the organ-averaged Dice, with the kit's rules for absent organs.

The paper reports one number per method and dataset: the *organ-averaged mean Dice* (Dice per organ, averaged
over organs, then over inference cases), and the gain of ISL over the baseline with a paired p-value over cases.
This module computes exactly that, plus the 95th-percentile Hausdorff distance (HD95) in millimetres that
segmentation papers usually report alongside.

Conventions (they decide the numbers, so they are spelled out once here):

* **Both empty -> undefined.** An organ absent from both the ground truth and the prediction has no Dice and no
  HD95 (``NaN``). Counting it as 1 would reward doing nothing, counting it as 0 would punish a correct
  "not there"; either way it would bias the organ average. NaN rows are dropped from every mean.
* **Present in only one of them -> Dice 0, HD95 NaN.** Dice is well defined (``2*0/(|A|+0) = 0``): a missed organ
  or a hallucinated one is a real error and must pull the mean down. HD95 is *not* defined (there is no surface
  to measure the distance to; MONAI would return ``inf`` or ``nan`` with a warning), so it is reported as ``NaN``
  and the ``in_truth`` / ``in_pred`` columns say why. Averages of HD95 therefore only cover organs found on both
  sides; read them next to the Dice, never alone.
* **HD95 is MONAI's definition** (:func:`monai.metrics.compute_hausdorff_distance` with ``percentile=95``): surface
  voxels are ``mask XOR erode(mask)`` (6-connectivity), distances are between voxel centres in millimetres using
  the voxel spacing, and the symmetric value is the *larger* of the two directed 95th percentiles (linear
  interpolation, ``torch.quantile``) - not the 95th percentile of the pooled distances.
* **Deltas are absolute Dice differences** (``0.062`` = 6.2 Dice points), method minus reference.

Label maps are integer arrays ``(H, W, D)`` (2-D works too: ``spacing`` then has two entries) in the same voxel
grid; ``labels`` maps label id -> organ name as in ``dataset.json`` (background ``0`` is skipped).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = ["ORGAN_COLUMNS", "PER_CASE_COLUMNS", "dice_score", "evaluate_case", "hausdorff_mm", "mean_dice",
           "organ_metrics"]

ORGAN_COLUMNS = ["organ", "label", "dice", "hd95_mm", "in_truth", "in_pred"]
"""Columns of :func:`organ_metrics`, in order."""

PER_CASE_COLUMNS = ["case", "method", *ORGAN_COLUMNS]
"""Columns of :func:`evaluate_case` (the long ``per_case.csv`` table: one row per case x method x organ)."""

ArrayLike = np.ndarray | torch.Tensor


# --------------------------------------------------------------------------------------------------------------
# input handling


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_label_map(x: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """Integer label map with ``ndim`` spatial axes; a leading channel axis of size 1 is dropped.

    Float arrays are accepted only if every value is a whole number (an ``argmax`` stored as float is fine,
    a probability map is not: it must be turned into labels first, and silently rounding it would hide that).
    """
    arr = _to_numpy(x, name)
    if arr.ndim == ndim + 1 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != ndim:
        raise ValueError(
            f"{name}: expected an integer label map with {ndim} spatial axes (to match spacing), got shape "
            f"{tuple(arr.shape)}; pass argmax(...) of a prediction, not one-hot or probabilities"
        )
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{name}: label map must be numeric, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: label map contains NaN or inf; fix the prediction / label file")
        if not np.all(arr == np.round(arr)):
            raise ValueError(
                f"{name}: label map has non-integer values (probabilities?); convert with argmax before evaluating"
            )
        arr = arr.astype(np.int64)
    return arr


def _label_ids(labels: Mapping[Any, str]) -> dict[int, str]:
    """``{id: name}`` without background; keys may be ``int`` or the strings used in ``dataset.json``."""
    out: dict[int, str] = {}
    for key, name in labels.items():
        lab = int(key)
        if lab != 0:
            out[lab] = str(name)
    if not out:
        raise ValueError("labels has no foreground organ (only background 0); nothing to evaluate")
    return out


def _check_known_ids(arr: np.ndarray, known: set[int], name: str) -> None:
    """Stop on label ids that ``labels`` does not list: they would be silently ignored otherwise."""
    if arr.size == 0:
        return
    lo = int(arr.min())
    if lo < 0:
        raise ValueError(f"{name} contains negative label id {lo}; label maps must use the dataset.json ids (>= 0)")
    counts = np.bincount(arr.ravel())  # far faster than np.unique on a CT-sized volume
    unknown = sorted(set(np.flatnonzero(counts).tolist()) - known - {0})
    if unknown:
        raise ValueError(
            f"{name} contains label ids {unknown} that are not in labels {sorted(known)}; "
            "check that prediction and ground truth use the dataset.json label numbering"
        )


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``mask`` (non-empty). Cropping to it changes neither Dice nor the surface distances:
    everything outside is background on both sides, and the erosion treats the crop border as background too."""
    sl = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(sl)


# --------------------------------------------------------------------------------------------------------------
# binary-mask metrics


def dice_score(pred_mask: ArrayLike, truth_mask: ArrayLike) -> float:
    """Dice of two binary masks: ``NaN`` if both are empty, ``0.0`` if exactly one is, else MONAI's ``compute_dice``.

    The empty cases are decided here and not by MONAI, because ``compute_dice(ignore_empty=True)`` returns NaN
    whenever the *ground truth* is empty, which would hide a hallucinated organ (it must score 0).
    """
    p = _to_numpy(pred_mask, "pred_mask").astype(bool)
    t = _to_numpy(truth_mask, "truth_mask").astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"pred_mask shape {p.shape} != truth_mask shape {t.shape}")
    in_p, in_t = bool(p.any()), bool(t.any())
    if not in_p and not in_t:
        return math.nan
    if in_p != in_t:
        return 0.0
    box = _bbox(p | t)
    p, t = p[box], t[box]
    from monai.metrics import compute_dice

    d = compute_dice(
        torch.from_numpy(p)[None, None].float(), torch.from_numpy(t)[None, None].float(), include_background=True
    )
    return float(d.item())


def hausdorff_mm(
    pred_mask: ArrayLike, truth_mask: ArrayLike, spacing: Sequence[float], percentile: float | None = 95.0
) -> float:
    """Symmetric (percentile) Hausdorff distance between two binary masks, in millimetres (MONAI's definition).

    ``NaN`` when either mask is empty (undefined: no surface to measure to); ``percentile=None`` gives the plain
    (maximum) Hausdorff distance. ``spacing`` is the voxel size along each array axis, in the array's axis order.
    """
    p = _to_numpy(pred_mask, "pred_mask").astype(bool)
    t = _to_numpy(truth_mask, "truth_mask").astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"pred_mask shape {p.shape} != truth_mask shape {t.shape}")
    spacing = [float(s) for s in spacing]
    if len(spacing) != p.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} entries for a {p.ndim}-D mask")
    if not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing {tuple(spacing)} must be positive and finite (millimetres per voxel)")
    if not p.any() or not t.any():
        return math.nan
    box = _bbox(p | t)
    p, t = p[box], t[box]
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated ``always_return_as_numpy`` argument internally; the warning is not
        # actionable here and would turn into an error under ``-W error`` / pytest ``filterwarnings = error``.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd = compute_hausdorff_distance(
            torch.from_numpy(p)[None, None],
            torch.from_numpy(t)[None, None],
            include_background=True,
            percentile=percentile,
            spacing=spacing,
        )
    return float(hd.item())


# --------------------------------------------------------------------------------------------------------------
# label maps -> tables


def organ_metrics(
    pred: ArrayLike,
    truth: ArrayLike,
    labels: Mapping[int, str],
    spacing: Sequence[float],
    hd95: bool = True,
) -> pd.DataFrame:
    """Per-organ Dice and HD95 (mm) of one case: one row per organ (label id != 0), columns :data:`ORGAN_COLUMNS`.

    ``pred`` and ``truth`` are integer label maps on the same voxel grid (a leading channel of size 1 is
    accepted); ``spacing`` is the voxel size in mm along the array axes. ``hd95=False`` skips the surface
    distances (the slow part) and leaves ``hd95_mm`` NaN. Label ids present in either map but missing from
    ``labels`` raise ``ValueError`` instead of being ignored. See the module docstring for the empty-organ rules.
    """
    spacing = tuple(float(s) for s in spacing)
    p = _as_label_map(pred, "pred", len(spacing))
    t = _as_label_map(truth, "truth", len(spacing))
    if p.shape != t.shape:
        raise ValueError(
            f"prediction shape {p.shape} != ground-truth shape {t.shape}; resample the prediction into the "
            "label's voxel grid before evaluating"
        )
    ids = _label_ids(labels)
    _check_known_ids(p, set(ids), "prediction")
    _check_known_ids(t, set(ids), "ground truth")
    rows = []
    for lab, organ in ids.items():
        pm, tm = p == lab, t == lab
        rows.append(
            {
                "organ": organ,
                "label": lab,
                "dice": dice_score(pm, tm),
                "hd95_mm": hausdorff_mm(pm, tm, spacing, 95.0) if hd95 else math.nan,
                "in_truth": bool(tm.any()),
                "in_pred": bool(pm.any()),
            }
        )
    df = pd.DataFrame(rows, columns=ORGAN_COLUMNS)
    return df.astype({"label": "int64", "dice": "float64", "hd95_mm": "float64", "in_truth": bool, "in_pred": bool})


def evaluate_case(
    pred: ArrayLike,
    truth: ArrayLike,
    labels: Mapping[int, str],
    spacing: Sequence[float],
    case: str,
    method: str,
    hd95: bool = True,
) -> pd.DataFrame:
    """:func:`organ_metrics` with ``case`` and ``method`` columns in front: rows ready to ``pd.concat`` into the
    long ``per_case`` table that :func:`summarize` and :func:`paired_tests` read."""
    df = organ_metrics(pred, truth, labels, spacing, hd95=hd95)
    df.insert(0, "method", str(method))
    df.insert(0, "case", str(case))
    return df


def mean_dice(per_organ: pd.DataFrame) -> float:
    """Organ-averaged Dice of one case: mean over the organs where Dice is defined (NaN rows dropped).

    NaN when no organ is defined (nothing to average), so that such a case drops out of a cohort mean rather
    than counting as a perfect or a failed case.
    """
    vals = pd.to_numeric(per_organ["dice"], errors="coerce").dropna()
    return float(vals.mean()) if len(vals) else math.nan
