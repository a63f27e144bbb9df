"""Evaluation: per-organ Dice and HD95, the organ-averaged mean Dice, and paired tests between methods.

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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "ORGAN_COLUMNS",
    "PER_CASE_COLUMNS",
    "case_means",
    "dice_score",
    "evaluate_case",
    "evaluate_predictions",
    "hausdorff_mm",
    "mean_dice",
    "organ_metrics",
    "paired_tests",
    "paired_tests_table",
    "summarize",
]

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


# --------------------------------------------------------------------------------------------------------------
# cohort level


def _check_per_case(per_case: pd.DataFrame, metric: str) -> None:
    missing = [c for c in ("case", "method", "organ", metric) if c not in per_case.columns]
    if missing:
        raise ValueError(f"per_case table lacks columns {missing}; it has {list(per_case.columns)}")
    dup = per_case.duplicated(["case", "method", "organ"])
    if dup.any():
        first = per_case.loc[dup, ["case", "method", "organ"]].iloc[0].tolist()
        raise ValueError(
            f"per_case table has {int(dup.sum())} duplicate (case, method, organ) rows, e.g. {first}; "
            "a case was evaluated twice - drop the stale rows before summarising"
        )


def case_means(per_case: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Organ average of ``metric`` per (method, case): columns ``method, case, <metric>``.

    NaN organs are skipped; a case with no defined organ gets NaN. Methods and cases keep their first-seen order.
    """
    _check_per_case(per_case, metric)
    vals = pd.to_numeric(per_case[metric], errors="coerce")
    out = vals.groupby([per_case["method"], per_case["case"]], sort=False).mean()
    return out.rename(metric).reset_index()


def _methods(per_case: pd.DataFrame) -> list[str]:
    return list(pd.unique(per_case["method"]))


def _pvalues(diff: np.ndarray) -> tuple[float, float]:
    """(Wilcoxon, paired t) p-values of paired differences, with the degenerate samples decided here.

    * fewer than 2 pairs: NaN for both - there is nothing to test, and a number would look like evidence;
    * every difference exactly zero: 1.0 for both - the methods agree on every case (scipy would give NaN
      or 1.0 depending on version, with warnings);
    * otherwise scipy's two-sided ``wilcoxon`` (default ``zero_method="wilcox"``: zero differences dropped) and
      ``ttest_rel``; a scipy failure gives NaN rather than aborting a long experiment at the reporting step.
    """
    from scipy.stats import ttest_rel, wilcoxon

    n = len(diff)
    if n < 2:
        return math.nan, math.nan
    if np.all(diff == 0):
        return 1.0, 1.0
    zeros = np.zeros_like(diff)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            p_w = float(wilcoxon(diff, zeros).pvalue)
        except ValueError:
            p_w = math.nan
        try:
            p_t = float(ttest_rel(diff, zeros).pvalue)
        except ValueError:
            p_t = math.nan
    return p_w, p_t


def paired_tests(
    per_case: pd.DataFrame, method: str, reference: str = "baseline", metric: str = "dice"
) -> dict[str, Any]:
    """Paired comparison of ``method`` against ``reference`` over inference cases, on the organ-averaged metric.

    Each case is first reduced to its organ average (as in the paper), then cases are paired by ``case`` id;
    only cases that both methods have, with a defined average on both sides, enter (``n_cases`` says how many).
    Returns ``{"method", "reference", "metric", "delta_mean_<metric>", "mean_method", "mean_reference",
    "p_value" (two-sided Wilcoxon signed-rank), "test": "wilcoxon", "t_p_value" (paired t-test), "n_cases"}``;
    for ``metric="dice"`` the delta key is ``delta_mean_dice`` = mean over paired cases of (method - reference).
    Degenerate samples never raise: see :func:`_pvalues` (n < 2 -> NaN, all differences zero -> 1.0).
    """
    _check_per_case(per_case, metric)
    known = _methods(per_case)
    for name in (method, reference):
        if name not in known:
            raise ValueError(f"method {name!r} not in per_case table; it has {known}")
    means = case_means(per_case, metric)
    a = means[means["method"] == method].set_index("case")[metric]
    b = means[means["method"] == reference].set_index("case")[metric]
    paired = pd.concat({"m": a, "r": b}, axis=1, join="inner").dropna()
    diff = (paired["m"] - paired["r"]).to_numpy(dtype=float)
    p_w, p_t = _pvalues(diff)
    n = len(diff)
    return {
        "method": method,
        "reference": reference,
        "metric": metric,
        f"delta_mean_{metric}": float(diff.mean()) if n else math.nan,
        "mean_method": float(paired["m"].mean()) if n else math.nan,
        "mean_reference": float(paired["r"].mean()) if n else math.nan,
        "p_value": p_w,
        "test": "wilcoxon",
        "t_p_value": p_t,
        "n_cases": int(n),
    }


def paired_tests_table(per_case: pd.DataFrame, reference: str = "baseline", metric: str = "dice") -> pd.DataFrame:
    """:func:`paired_tests` of every other method against ``reference``: one row per method, first-seen order."""
    _check_per_case(per_case, metric)
    known = _methods(per_case)
    if reference not in known:
        raise ValueError(f"reference method {reference!r} not in per_case table; it has {known}")
    rows = [paired_tests(per_case, m, reference, metric) for m in known if m != reference]
    cols = [
        "method",
        "reference",
        "metric",
        "n_cases",
        f"delta_mean_{metric}",
        "mean_method",
        "mean_reference",
        "p_value",
        "test",
        "t_p_value",
    ]
    return pd.DataFrame(rows, columns=cols)


def _nanmean(values: pd.Series) -> float:
    v = pd.to_numeric(values, errors="coerce").dropna()
    return float(v.mean()) if len(v) else math.nan


def summarize(per_case: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Cohort summary per method, the ``methods`` block of ``summary.json`` (timings are added by the caller).

    ``{method: {"mean_dice": mean over cases of the organ-averaged Dice, "per_organ_dice": {organ: mean over the
    cases where that organ's Dice is defined}, "n_cases": int}}``, plus ``mean_hd95_mm`` / ``per_organ_hd95_mm``
    (same recipe) when the table has an ``hd95_mm`` column. Undefined values stay NaN (see ``runtime.json_safe``).
    Note the two Dice numbers differ on purpose: ``mean_dice`` weights every case equally (the paper's number),
    the per-organ means weight every case where the organ exists.
    """
    _check_per_case(per_case, "dice")
    out: dict[str, dict[str, Any]] = {}
    dice_means = case_means(per_case, "dice")
    has_hd = "hd95_mm" in per_case.columns
    hd_means = case_means(per_case, "hd95_mm") if has_hd else None
    for method in _methods(per_case):
        rows = per_case[per_case["method"] == method]
        entry: dict[str, Any] = {
            "mean_dice": _nanmean(dice_means.loc[dice_means["method"] == method, "dice"]),
            "per_organ_dice": {str(o): _nanmean(g) for o, g in rows.groupby("organ", sort=False)["dice"]},
            "n_cases": int(rows["case"].nunique()),
        }
        if hd_means is not None:
            entry["mean_hd95_mm"] = _nanmean(hd_means.loc[hd_means["method"] == method, "hd95_mm"])
            entry["per_organ_hd95_mm"] = {str(o): _nanmean(g) for o, g in rows.groupby("organ", sort=False)["hd95_mm"]}
        out[str(method)] = entry
    return out


# --------------------------------------------------------------------------------------------------------------
# prediction files against a dataset

_AFFINE_ATOL_MM = 1e-3  # as in data.py: headers may differ by float rounding, not by more


def _integer_labels(data: np.ndarray, path: Path, role: str) -> np.ndarray:
    """The voxels of a label file as int64; a file holding anything but whole numbers is refused, naming it."""
    from isl_core.data import DatasetError

    if data.dtype.kind in "iub":
        return data.astype(np.int64)
    if data.dtype.kind != "f" or not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
        raise DatasetError(f"{path}: the {role} is not an integer label map (dtype {data.dtype}); write the arg-max "
                           "of the class probabilities as integers")
    return np.rint(data).astype(np.int64)


def _onto_label_grid(pred_img, pred: np.ndarray, truth_img, pred_path: Path, label_path: Path) -> np.ndarray:
    """``pred`` in the label's voxel order, so that voxel i of both arrays is the same point in the world.

    A prediction stored in another orientation (LAS instead of RAS, permuted axes) is the same map in world space;
    comparing arrays voxel by voxel would score it against the wrong anatomy. Such a grid is reoriented exactly
    (flips and axis permutations, no interpolation, with nibabel's orientation tools); a grid that differs in
    any other way (spacing, origin, shape) is refused rather than resampled, since the kit writes predictions
    in the source image's geometry and anything else points to a mix-up of files.
    """
    from nibabel import orientations as ornt

    from isl_core.data import DatasetError

    if pred.shape == truth_img.shape and np.allclose(pred_img.affine, truth_img.affine, atol=_AFFINE_ATOL_MM):
        return pred
    transform = ornt.ornt_transform(ornt.io_orientation(pred_img.affine), ornt.io_orientation(truth_img.affine))
    moved = ornt.apply_orientation(pred, transform)
    affine = pred_img.affine @ ornt.inv_ornt_aff(transform, pred.shape)
    if moved.shape == truth_img.shape and np.allclose(affine, truth_img.affine, atol=_AFFINE_ATOL_MM):
        return moved
    pa, ta = np.round(pred_img.affine, 3).tolist(), np.round(truth_img.affine, 3).tolist()
    raise DatasetError(f"{pred_path}: its voxel grid (shape {tuple(pred.shape)}, affine {pa}) is not the grid of the "
                       f"label {label_path} (shape {tuple(truth_img.shape)}, affine {ta}), even after reorientation; "
                       "predictions must be written in the source image's geometry")


def evaluate_predictions(pred_dir: str | Path, cases: Sequence[Any], labels: Mapping[int, str], method: str,
                         hd95: bool = True) -> pd.DataFrame:
    """Per-case, per-organ Dice/HD95 of ``pred_dir/CASE.nii.gz`` against the labels of ``cases`` (``data.Case``).

    The one place where prediction files meet a dataset's labels: both are compared in world space (a prediction
    in another orientation is reoriented onto the label's grid, see :func:`_onto_label_grid`), and every problem
    (a missing or corrupt prediction, another grid, unknown label ids) raises ``DatasetError`` naming the file.
    Returns the long table of :func:`evaluate_case` rows (``PER_CASE_COLUMNS``), cases in the given order.
    """
    from isl_core.data import DatasetError, read_volume

    pred_dir = Path(pred_dir)
    if not cases:
        raise DatasetError(f"{pred_dir}: no labelled cases to evaluate the predictions against")
    rows = []
    for case in cases:
        if case.label is None:
            raise DatasetError(f"case {case.id} ({case.image}) has no label; only labelled cases can be evaluated")
        pred_path = pred_dir / f"{case.id}.nii.gz"
        if not pred_path.is_file():
            raise DatasetError(f"{pred_path}: missing prediction for case {case.id}; run `isl predict` first")
        truth_img, truth = read_volume(case.label, "label")
        pred_img, pred = read_volume(pred_path, "prediction")
        pred = _onto_label_grid(pred_img, _integer_labels(pred, pred_path, "prediction"), truth_img, pred_path,
                                Path(case.label))
        spacing = tuple(float(s) for s in truth_img.header.get_zooms()[:3])
        try:
            rows.append(evaluate_case(pred, _integer_labels(truth, Path(case.label), "label"), labels, spacing,
                                      case=case.id, method=method, hd95=hd95))
        except ValueError as e:
            raise DatasetError(f"{pred_path} vs {case.label}: {e}") from None
    return pd.concat(rows, ignore_index=True)
