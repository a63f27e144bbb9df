"""The paper's four claims as paired tests over inference cases: delta, bootstrap CI, Wilcoxon p, Holm p, verdict.

* C1: ISL (isl-mask-ema) beats the baseline on the organ-averaged Dice.
* C2: mask-supervised alignment (isl-mask) beats intensity alignment (isl-intensity).
* C3: the moving-average mask (isl-mask-ema vs isl-mask) helps, and makes ISL more robust: the worst per-case
  delta against the baseline, the number of cases below the baseline for each, and, when several fine-tuning
  seeds ran, the per-case SD over seeds.
* C4: per-organ deltas of isl-mask-ema against the baseline.

Scoring here differs from the headline means on purpose: an organ absent from a case's truth is left out of that
case (Dice only where the organ is present), and hallucinations, organs predicted where the truth has none, are
counted apart as a rate per method. Otherwise a phantom without a gallbladder scores a predicted one as Dice 0 and
the claim about the gallbladder measures hallucinations instead.

Each test carries ``delta`` (mean of the paired differences), ``ci95`` (percentile bootstrap of that mean, fixed
seed), ``p_value`` (two-sided Wilcoxon signed-rank, as in ``evaluate.paired_tests``), ``p_holm`` (Holm over C1-C3;
over the organs within C4), ``n`` and ``verdict``: "supported" (delta > 0, p_holm < 0.05), "contradicted"
(delta < 0, p_holm < 0.05), else "not shown".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from isl_core.evaluate import paired_pvalues

PAIRS: dict[str, tuple[str, str]] = {"C1": ("isl-mask-ema", "baseline"), "C2": ("isl-mask", "isl-intensity"),
                                     "C3": ("isl-mask-ema", "isl-mask")}
ALPHA = 0.05
N_RESAMPLES = 10_000
SEED = 0


def _in_truth(per_case: pd.DataFrame) -> pd.DataFrame:
    present = per_case["in_truth"].astype(str).str.lower().isin(["true", "1"])
    return per_case[present]


def organ_averaged(per_case: pd.DataFrame) -> pd.DataFrame:
    """case x method: Dice averaged over the organs present in the case's truth (and over seeds, if several)."""
    rows = _in_truth(per_case)
    return rows.groupby(["case", "method"])["dice"].mean().unstack("method")


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


def verdict(delta: float, p_holm: float, alpha: float = ALPHA) -> str:
    if not (math.isnan(delta) or math.isnan(p_holm)) and p_holm < alpha:
        if delta > 0:
            return "supported"
        if delta < 0:
            return "contradicted"
    return "not shown"


def compare(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    """Paired test of ``a`` against ``b`` (indexed by case; cases missing on either side dropped)."""
    paired = pd.concat({"a": a, "b": b}, axis=1, join="inner").dropna()
    diff = (paired["a"] - paired["b"]).to_numpy(dtype=float)
    return {"delta": float(diff.mean()) if len(diff) else math.nan, "ci95": list(bootstrap_ci(diff)),
            "p_value": paired_pvalues(diff)[0], "n": int(len(diff))}


def hallucination_rates(per_case: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per method: the share of (case, organ) pairs absent from the truth that the method predicts anyway."""
    truth = per_case["in_truth"].astype(str).str.lower().isin(["true", "1"])
    pred = per_case["in_pred"].astype(str).str.lower().isin(["true", "1"])
    out = {}
    for method, rows in per_case[~truth].assign(_pred=pred[~truth]).groupby("method", sort=False):
        pairs = rows.drop_duplicates(["case", "organ"])
        out[str(method)] = {"rate": float(pairs["_pred"].mean()) if len(pairs) else math.nan, "n_pairs": len(pairs)}
    return out


def _robustness(per_case: pd.DataFrame, table: pd.DataFrame) -> dict[str, Any]:
    rob: dict[str, Any] = {}
    if "baseline" not in table:
        return rob
    for m in ("isl-mask-ema", "isl-mask"):
        if m in table:
            d = (table[m] - table["baseline"]).dropna()
            rob[m] = {"worst_delta_vs_baseline": float(d.min()) if len(d) else math.nan,
                      "cases_below_baseline": int((d < 0).sum()), "n": int(len(d))}
            if "seed" in per_case and per_case["seed"].nunique() > 1:
                by_seed = _in_truth(per_case[per_case["method"] == m]).groupby(["case", "seed"])["dice"].mean()
                rob[m]["per_case_sd_over_seeds"] = float(by_seed.groupby("case").std().mean())
    return rob


def claims(per_case: pd.DataFrame) -> dict[str, Any]:
    """The ``claims`` block of ``summary.json`` from the long per-case table (see the module docstring)."""
    table = organ_averaged(per_case)
    out: dict[str, Any] = {}
    omitted: dict[str, str] = {}
    for name, (a, b) in PAIRS.items():
        missing = [m for m in (a, b) if m not in table]
        if missing:
            omitted[name] = f"method(s) {', '.join(missing)} not run"
            continue
        out[name] = {"method": a, "reference": b, **compare(table[a], table[b])}
    for name, p in zip(out, holm([out[n]["p_value"] for n in out])):
        out[name]["p_holm"] = p
        out[name]["verdict"] = verdict(out[name]["delta"], p)
    if "C3" in out:
        out["C3"]["robustness"] = _robustness(per_case, table)
    a, b = PAIRS["C1"]
    if a in table and b in table:
        rows = _in_truth(per_case)
        organs = {}
        for organ, g in rows.groupby("organ", sort=False):
            wide = g.groupby(["case", "method"])["dice"].mean().unstack("method")
            if a in wide and b in wide:
                organs[str(organ)] = {"method": a, "reference": b, **compare(wide[a], wide[b])}
        for organ, p in zip(organs, holm([o["p_value"] for o in organs.values()])):
            organs[organ]["p_holm"] = p
            organs[organ]["verdict"] = verdict(organs[organ]["delta"], p)
        out["C4"] = organs
    else:
        omitted["C4"] = f"method(s) {', '.join(m for m in (a, b) if m not in table)} not run"
    out["hallucination_rate"] = hallucination_rates(per_case)
    if omitted:
        out["omitted"] = omitted
    return out
