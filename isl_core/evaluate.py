"""Evaluation of a cohort: prediction files scored against a dataset, organ averages, paired tests between methods.

The paper reports one number per method and dataset: the *organ-averaged mean Dice* (Dice per organ, averaged
over organs, then over inference cases), and the gain of ISL over the baseline with a paired p-value over cases.
This module computes exactly that from the per-organ metrics of :mod:`isl_core.metrics` (Dice and HD95 of one
case, and the rules for organs absent from the truth or the prediction, which decide the numbers). Deltas are
absolute Dice differences (``0.062`` = 6.2 Dice points), method minus reference.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from isl_core.metrics import (
    ORGAN_COLUMNS,
    PER_CASE_COLUMNS,
    dice_score,
    evaluate_case,
    hausdorff_mm,
    mean_dice,
    organ_metrics,
)

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
    "paired_pvalues",
    "paired_tests",
    "paired_tests_table",
    "summarize",
    "with_grid_dice",
]

# --------------------------------------------------------------------------------------------------------------
# cohort level


def _check_per_case(per_case: pd.DataFrame, metric: str) -> None:
    missing = [c for c in ("case", "method", "organ", metric) if c not in per_case.columns]
    if missing:
        raise ValueError(f"per_case table lacks columns {missing}; it has {list(per_case.columns)}")
    key = ["case", "method", "organ", *_seeds(per_case)]
    dup = per_case.duplicated(key)
    if dup.any():
        first = per_case.loc[dup, key].iloc[0].tolist()
        raise ValueError(
            f"per_case table has {int(dup.sum())} duplicate ({', '.join(key)}) rows, e.g. {first}; "
            "a case was evaluated twice - drop the stale rows before summarising"
        )


def _seeds(per_case: pd.DataFrame) -> list[str]:
    """``["seed"]`` when the table has a seed column (one row per seed of a case and method), else ``[]``."""
    return ["seed"] if "seed" in per_case.columns else []


def case_means(per_case: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Organ average of ``metric`` per (method, case): columns ``method, case, <metric>``.

    NaN organs are skipped; a case with no defined organ gets NaN. With a ``seed`` column the organ average is
    taken per seed, then averaged over the seeds. Methods and cases keep their first-seen order.
    """
    _check_per_case(per_case, metric)
    vals = pd.to_numeric(per_case[metric], errors="coerce")
    keys = [per_case["method"], per_case["case"], *(per_case[s] for s in _seeds(per_case))]
    out = vals.groupby(keys, sort=False).mean()
    if _seeds(per_case):
        out = out.groupby(level=[0, 1], sort=False).mean()
    return out.rename(metric).reset_index()


def _organ_means(rows: pd.DataFrame, metric: str) -> dict[str, float]:
    """organ -> mean over cases of ``metric`` (each case first averaged over its seeds), NaN skipped."""
    vals = pd.to_numeric(rows[metric], errors="coerce")
    per_case = vals.groupby([rows["organ"], rows["case"]], sort=False).mean()
    return {str(o): _nanmean(g) for o, g in per_case.groupby(level=0, sort=False)}


def _methods(per_case: pd.DataFrame) -> list[str]:
    return list(pd.unique(per_case["method"]))


def paired_pvalues(diff: np.ndarray) -> tuple[float, float]:
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
    Degenerate samples never raise: see :func:`paired_pvalues` (n < 2 -> NaN, all differences zero -> 1.0).
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
    p_w, p_t = paired_pvalues(diff)
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
            "per_organ_dice": _organ_means(rows, "dice"),
            "n_cases": int(rows["case"].nunique()),
        }
        if hd_means is not None:
            entry["mean_hd95_mm"] = _nanmean(hd_means.loc[hd_means["method"] == method, "hd95_mm"])
            entry["per_organ_hd95_mm"] = _organ_means(rows, "hd95_mm")
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


def with_grid_dice(rows: pd.DataFrame, probs: Any, grid_label: Any, labels: Mapping[int, str]) -> pd.DataFrame:
    """``rows`` (one case and method, as :func:`evaluate_predictions` gives them) with a ``dice_grid`` column.

    ``dice_grid`` scores the same organs on the working grid the methods run on: the arg-max of ``probs`` (C,*S)
    against ``grid_label``, the truth as preprocessing resampled it onto that grid. ``dice`` scores the label
    map written in the source geometry, after the probabilities were resampled there; the difference between
    the two is what that resampling (and the soft vote of fusion, smoothed by it) costs or gains.
    """
    p = probs.detach().cpu().numpy() if hasattr(probs, "detach") else np.asarray(probs)
    pred = p.argmax(0)
    grid = organ_metrics(pred, grid_label, labels, spacing=(1.0,) * pred.ndim, hd95=False)  # Dice ignores spacing
    return rows.assign(dice_grid=rows["organ"].map(grid.set_index("organ")["dice"]).astype(float))
