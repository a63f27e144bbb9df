"""The paper's claims, and the claims that ask why ISL helps, as paired tests over inference cases.

The paper's claims (one Holm family):

* C1: ISL (isl-mask-ema) beats the baseline on the organ-averaged Dice.
* C2: mask-supervised alignment (isl-mask) beats intensity alignment (isl-intensity).
* C3: the moving-average mask (isl-mask-ema vs isl-mask) helps, and makes ISL more robust: the worst per-case
  delta against the baseline, the number of cases below the baseline for each, and, when several fine-tuning
  seeds ran, the per-case SD over seeds.

Why ISL helps (a second Holm family; each claim only when both its methods ran):

* deformation: isl-mask-ema vs finetune-atlases (the same fine-tuning on the unwarped atlases): what the
  inference-specific deformation adds beyond extra training on the same cohort.
* vs_tent, vs_pseudo_label: isl-mask-ema vs the test-time adaptations that use x* alone.
* vs_fusion: isl-mask-ema vs malf: learning from the deformed atlases against voting with them.
* vs_fusion_source: isl-mask-ema vs malf-source, the same vote taken in the scan's own geometry: vs_fusion without
  the cost that resampling a soft vote from the working grid adds to fusion alone.
* C2_matched: isl-mask vs isl-intensity-matched: C2 at the same registration budget.
* C3_output: isl-intensity-ema vs isl-intensity: what the moving average of the output alone gives.

C4: per-organ deltas of isl-mask-ema against the baseline (Holm over the organs), and the paper's form of the
claim, gains larger on hard organs: Spearman's rho between the baseline's per-organ mean Dice and the per-organ
gain (``rho_baseline_vs_gain``, ``rho_p_value``), and the gallbladder's gain relative to its baseline Dice with
its rank among the organs. :func:`organ_rows` separates the per-organ rows from these keys.

Scoring here differs from the headline means on purpose: an organ absent from a case's truth is left out of that
case (Dice only where the organ is present), and hallucinations, organs predicted where the truth has none, are
counted apart as a rate per method. Otherwise a phantom without a gallbladder scores a predicted one as Dice 0 and
the claim about the gallbladder measures hallucinations instead. With a ``seed`` column (several seeds per case
and method), a case's organ-averaged Dice is computed per seed and then averaged over the seeds; the claims pair
these per-case means, and ``seeds`` reports the spread over seeds.

Each test carries ``delta`` (mean of the paired differences), ``ci95`` (percentile bootstrap of that mean over
cases, fixed seed), ``ci95_folds`` (two-level bootstrap: folds drawn with replacement, then cases within each drawn
fold; the cases of a fold share a baseline and atlases, so they are not independent), ``p_value`` (two-sided
Wilcoxon signed-rank, as in ``evaluate.paired_tests``), ``p_holm`` (Holm within its family), ``n`` and ``verdict``:
"supported" (delta > 0, p_holm < 0.05 and the more conservative of the two intervals above 0), "contradicted"
(the mirror image), else "not shown"; ``verdict_interval`` names the interval that was the more conservative.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from isl_core.evaluate import paired_pvalues

#: the paper's claims: one Holm family, as in every run before the control arms existed
PAPER_PAIRS: dict[str, tuple[str, str]] = {"C1": ("isl-mask-ema", "baseline"), "C2": ("isl-mask", "isl-intensity"),
                                           "C3": ("isl-mask-ema", "isl-mask")}
#: why ISL helps: a family of its own, so that adding control arms to a run never weakens the paper's claims,
#: and the "why" questions are corrected among themselves
WHY_PAIRS: dict[str, tuple[str, str]] = {"deformation": ("isl-mask-ema", "finetune-atlases"),
                                         "vs_tent": ("isl-mask-ema", "tent"),
                                         "vs_pseudo_label": ("isl-mask-ema", "pseudo-label"),
                                         "vs_fusion": ("isl-mask-ema", "malf"),
                                         "vs_fusion_source": ("isl-mask-ema", "malf-source"),
                                         "C2_matched": ("isl-mask", "isl-intensity-matched"),
                                         "C3_output": ("isl-intensity-ema", "isl-intensity")}
FAMILIES: dict[str, dict[str, tuple[str, str]]] = {"paper": PAPER_PAIRS, "why": WHY_PAIRS}
PAIRS: dict[str, tuple[str, str]] = {**PAPER_PAIRS, **WHY_PAIRS}
_PAPER_METHODS = {m for pair in PAPER_PAIRS.values() for m in pair}
#: keys of ``claims["C4"]`` that are not organs
C4_SUMMARY_KEYS = ("rho_baseline_vs_gain", "rho_p_value", "rho_n_organs", "gallbladder_relative_gain")
ALPHA = 0.05
N_RESAMPLES = 10_000
SEED = 0


def _in_truth(per_case: pd.DataFrame) -> pd.DataFrame:
    present = per_case["in_truth"].astype(str).str.lower().isin(["true", "1"])
    return per_case[present]


def _over_seeds(values: pd.Series, keys: list[str]) -> pd.Series:
    """``values`` indexed by ``keys`` (+ ``seed`` when present), averaged over the seeds."""
    return values.groupby(level=keys).mean() if "seed" in values.index.names else values


def _seed_keys(per_case: pd.DataFrame) -> list[str]:
    return ["seed"] if "seed" in per_case.columns else []


def organ_averaged(per_case: pd.DataFrame, column: str = "dice") -> pd.DataFrame:
    """case x method: ``column`` averaged over the organs present in the case's truth, then over the seeds."""
    rows = _in_truth(per_case)
    per_seed = rows.groupby(["case", "method", *_seed_keys(rows)])[column].mean()
    return _over_seeds(per_seed, ["case", "method"]).unstack("method")


def bootstrap_ci(diff: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean of paired differences (NaN with fewer than 2 pairs)."""
    from scipy.stats import bootstrap

    d = np.asarray(diff, dtype=float)
    if len(d) < 2:
        return math.nan, math.nan
    if np.all(d == d[0]):  # every resample has the same mean: scipy would warn about a degenerate distribution
        return float(d[0]), float(d[0])
    res = bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=0.95, method="percentile",
                    vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def fold_bootstrap_means(diff: Sequence[float], folds: Sequence[Any], n_resamples: int = N_RESAMPLES,
                         seed: int = SEED) -> np.ndarray:
    """Means of ``n_resamples`` two-level resamples: K folds drawn with replacement from the K folds, then, in
    each drawn fold, as many of its cases as it has, drawn with replacement; the mean is over all drawn cases.

    Written by hand: scipy's ``bootstrap`` resamples one level only, and no kit dependency resamples clusters.
    """
    d, f = np.asarray(diff, dtype=float), np.asarray(folds)
    groups = [d[f == k] for k in np.unique(f)]
    rng = np.random.default_rng(seed)
    drawn = rng.integers(len(groups), size=(n_resamples, len(groups)))
    sums, counts = np.zeros(n_resamples), np.zeros(n_resamples)
    for slot in range(len(groups)):
        for k, g in enumerate(groups):
            rows = np.flatnonzero(drawn[:, slot] == k)
            sums[rows] += g[rng.integers(len(g), size=(len(rows), len(g)))].sum(axis=1)
            counts[rows] += len(g)
    return sums / counts


def fold_bootstrap_ci(diff: Sequence[float], folds: Sequence[Any] | None, n_resamples: int = N_RESAMPLES,
                      seed: int = SEED) -> tuple[float, float]:
    """95 % percentile interval of :func:`fold_bootstrap_means` (NaN without folds or with fewer than 2 pairs)."""
    d = np.asarray(diff, dtype=float)
    if folds is None or len(d) < 2 or pd.isna(np.asarray(folds, dtype=object)).any():
        return math.nan, math.nan
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    lo, hi = np.percentile(fold_bootstrap_means(d, folds, n_resamples, seed), [2.5, 97.5])
    return float(lo), float(hi)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment; NaN p-values stay NaN and do not count as tests.

    Written out (a few lines) because scipy has only the Benjamini-Hochberg adjustment and statsmodels is not
    a dependency of the kit.
    """
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), math.nan)
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))  # monotone: never below an earlier adjusted p
        out[i] = running
    return out.tolist()


def conservative_interval(delta: float, ci95: Sequence[float], ci95_folds: Sequence[float]) -> str:
    """``"ci95"`` or ``"ci95_folds"``: the interval whose bound on the delta's side lies nearer zero (or beyond
    it); ``ci95`` when the two-level interval is undefined (no folds)."""
    if any(math.isnan(v) for v in ci95_folds):
        return "ci95"
    if delta < 0:
        return "ci95_folds" if ci95_folds[1] > ci95[1] else "ci95"
    return "ci95_folds" if ci95_folds[0] < ci95[0] else "ci95"


def verdict(delta: float, p_holm: float, alpha: float = ALPHA, interval: Sequence[float] | None = None) -> str:
    """"supported" / "contradicted": Holm p below ``alpha`` with a positive / negative delta and, when given,
    ``interval`` entirely on the delta's side of zero; else "not shown"."""
    if math.isnan(delta) or math.isnan(p_holm) or p_holm >= alpha:
        return "not shown"
    lo, hi = interval if interval is not None else (delta, delta)
    if delta > 0 and lo > 0:
        return "supported"
    if delta < 0 and hi < 0:
        return "contradicted"
    return "not shown"


def compare(a: pd.Series, b: pd.Series, folds: pd.Series | None = None) -> dict[str, Any]:
    """Paired test of ``a`` against ``b`` (indexed by case; cases missing on either side dropped).

    ``folds`` (case -> fold) adds the two-level interval ``ci95_folds``; without it that interval is NaN.
    """
    paired = pd.concat({"a": a, "b": b}, axis=1, join="inner").dropna()
    diff = (paired["a"] - paired["b"]).to_numpy(dtype=float)
    case_folds = None if folds is None else folds.reindex(paired.index).to_numpy()
    return {"delta": float(diff.mean()) if len(diff) else math.nan, "ci95": list(bootstrap_ci(diff)),
            "ci95_folds": list(fold_bootstrap_ci(diff, case_folds)), "p_value": paired_pvalues(diff)[0],
            "n": int(len(diff)), "reference_mean": float(paired["b"].mean()) if len(diff) else math.nan}


def _decide(tests: dict[str, dict[str, Any]]) -> None:
    """Holm over ``tests`` (one family), then each verdict on the more conservative interval, in place."""
    for name, p in zip(tests, holm([t["p_value"] for t in tests.values()])):
        t = tests[name]
        t["p_holm"] = p
        t["verdict_interval"] = conservative_interval(t["delta"], t["ci95"], t["ci95_folds"])
        t["verdict"] = verdict(t["delta"], p, interval=t[t["verdict_interval"]])


def hallucination_rates(per_case: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per method: the share of (case, organ[, seed]) pairs absent from the truth that it predicts anyway."""
    truth = per_case["in_truth"].astype(str).str.lower().isin(["true", "1"])
    pred = per_case["in_pred"].astype(str).str.lower().isin(["true", "1"])
    out = {}
    for method, rows in per_case[~truth].assign(_pred=pred[~truth]).groupby("method", sort=False):
        pairs = rows.drop_duplicates(["case", "organ", *_seed_keys(rows)])
        out[str(method)] = {"rate": float(pairs["_pred"].mean()) if len(pairs) else math.nan, "n_pairs": len(pairs)}
    return out


def _several_seeds(per_case: pd.DataFrame) -> bool:
    return "seed" in per_case.columns and per_case["seed"].nunique() > 1


def _robustness(per_case: pd.DataFrame, table: pd.DataFrame) -> dict[str, Any]:
    rob: dict[str, Any] = {}
    if "baseline" not in table:
        return rob
    for m in ("isl-mask-ema", "isl-mask"):
        if m in table:
            d = (table[m] - table["baseline"]).dropna()
            rob[m] = {"worst_delta_vs_baseline": float(d.min()) if len(d) else math.nan,
                      "cases_below_baseline": int((d < 0).sum()), "n": int(len(d))}
            if _several_seeds(per_case):
                rob[m]["per_case_sd_over_seeds"] = seed_spread(per_case[per_case["method"] == m])[m]["mean_case_sd"]
    return rob


def seed_spread(per_case: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per method, with several seeds: ``sd_of_mean`` (SD over seeds of the method's mean organ-averaged Dice
    over cases) and ``mean_case_sd`` (mean over cases of a case's SD over seeds); {} with one seed or none."""
    if not _several_seeds(per_case):
        return {}
    rows = _in_truth(per_case)
    by_seed = rows.groupby(["method", "case", "seed"], sort=False)["dice"].mean()
    out = {}
    for method, s in by_seed.groupby(level="method", sort=False):
        means = s.groupby(level="seed").mean()
        out[str(method)] = {"n_seeds": int(len(means)), "sd_of_mean": float(means.std()),
                            "mean_case_sd": float(s.groupby(level="case").std().mean())}
    return out


def source_vs_grid(per_case: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per method, when the table has ``dice_grid``: the mean organ-averaged Dice scored in the source geometry
    and on the working grid, over the (case, organ) pairs where both are defined, and their difference."""
    if "dice_grid" not in per_case.columns:
        return {}
    rows = _in_truth(per_case).dropna(subset=["dice", "dice_grid"])
    source, grid = organ_averaged(rows, "dice"), organ_averaged(rows, "dice_grid")
    return {str(m): {"source": float(source[m].mean()), "grid": float(grid[m].mean()),
                     "source_minus_grid": float((source[m] - grid[m]).mean()), "n": int(source[m].count())}
            for m in pd.unique(rows["method"])}


def organ_rows(c4: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-organ rows of ``claims["C4"]``, without the rank correlation and the gallbladder's keys."""
    return {k: v for k, v in c4.items() if k not in C4_SUMMARY_KEYS}


def _is_gallbladder(organ: str) -> bool:
    return organ.lower().replace("_", "").replace(" ", "") == "gallbladder"


def _rank_correlation(organs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The paper's form of C4: Spearman rho between the baseline's per-organ Dice and the gain; the gallbladder's
    relative gain (gain / baseline Dice) and its rank among the organs (1: the largest)."""
    from scipy.stats import spearmanr

    table = pd.DataFrame(organs).T[["reference_mean", "delta"]].astype(float).dropna()
    rho, p = math.nan, math.nan
    if len(table) >= 3:
        with warnings.catch_warnings():  # constant input: scipy warns and returns NaN, which is the answer
            warnings.simplefilter("ignore")
            res = spearmanr(table["reference_mean"], table["delta"])
        rho, p = float(res.statistic), float(res.pvalue)
    out: dict[str, Any] = {"rho_baseline_vs_gain": rho, "rho_p_value": p, "rho_n_organs": int(len(table))}
    relative = (table["delta"] / table["reference_mean"]).replace([np.inf, -np.inf], np.nan).dropna()
    for organ in relative.index:
        if _is_gallbladder(organ):
            out["gallbladder_relative_gain"] = {
                "organ": organ, "relative_gain": float(relative[organ]), "n_organs": int(len(relative)),
                "rank": int((relative > relative[organ]).sum() + 1)}
    return out


def _c4(per_case: pd.DataFrame, folds: pd.Series | None) -> dict[str, Any]:
    a, b = PAPER_PAIRS["C1"]
    rows = _in_truth(per_case)
    organs = {}
    for organ, g in rows.groupby("organ", sort=False):
        per_seed = g.groupby(["case", "method", *_seed_keys(g)])["dice"].mean()
        wide = _over_seeds(per_seed, ["case", "method"]).unstack("method")
        if a in wide and b in wide:
            organs[str(organ)] = {"method": a, "reference": b, **compare(wide[a], wide[b], folds)}
    _decide(organs)
    return {**organs, **_rank_correlation(organs)} if organs else organs


def _case_folds(per_case: pd.DataFrame) -> pd.Series | None:
    return per_case.groupby("case")["fold"].first() if "fold" in per_case.columns else None


def claims(per_case: pd.DataFrame) -> dict[str, Any]:
    """The ``claims`` block of ``summary.json`` from the long per-case table (see the module docstring)."""
    table = organ_averaged(per_case)
    folds = _case_folds(per_case)
    out: dict[str, Any] = {}
    omitted: dict[str, str] = {}
    for family, pairs in FAMILIES.items():
        tests = {}
        for name, (a, b) in pairs.items():
            missing = [m for m in (a, b) if m not in table]
            if not missing:
                tests[name] = {"method": a, "reference": b, "holm_family": family, **compare(table[a], table[b], folds)}
            elif family == "paper" or set(pairs[name]) - _PAPER_METHODS - set(missing):
                # a "why" claim is named only when its control arm ran: a run of the paper's methods lists none
                omitted[name] = f"method(s) {', '.join(missing)} not run"
        _decide(tests)
        out.update(tests)
    if "C3" in out:
        out["C3"]["robustness"] = _robustness(per_case, table)
    missing = [m for m in PAPER_PAIRS["C1"] if m not in table]
    if missing:
        omitted["C4"] = f"method(s) {', '.join(missing)} not run"
    else:
        out["C4"] = _c4(per_case, folds)
    out["hallucination_rate"] = hallucination_rates(per_case)
    for key, block in (("seeds", seed_spread(per_case)), ("source_vs_grid", source_vs_grid(per_case))):
        if block:
            out[key] = block
    if omitted:
        out["omitted"] = omitted
    return out
