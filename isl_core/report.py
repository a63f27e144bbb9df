"""``report.md`` of an experiment folder: the claims, the results table, per-organ figures, paired lines, overlays.

This module writes Markdown only; the figures are drawn by ``isl_core.viz``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from isl_core.data import Dataset
from isl_core.runtime import write_text
from isl_core.viz import overlay_figure, paired_lines_figure, per_organ_figure

CLAIM_TEXT = {"C1": "ISL (isl-mask-ema) beats the baseline", "C2": "mask supervision beats intensity alignment",
              "C3": "the moving-average mask helps (isl-mask-ema vs isl-mask)"}


def _fmt(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def results_table(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per method: mean Dice, delta vs baseline, Wilcoxon p, seconds per case."""
    rows = []
    for m, s in summary["methods"].items():
        t = summary["paired_tests"].get(f"{m}_vs_baseline", {})
        rows.append({"method": m, "mean_dice": s["mean_dice"], "delta_vs_baseline": t.get("delta_mean_dice"),
                     "p_wilcoxon": t.get("p_value"), "mean_hd95_mm": s.get("mean_hd95_mm"),
                     "seconds_per_case": s["seconds_per_case"]})
    return pd.DataFrame(rows)


def organ_table(summary: dict[str, Any]) -> pd.DataFrame:
    """Organs x methods: mean Dice over the cases where the organ is defined."""
    return pd.DataFrame({m: s["per_organ_dice"] for m, s in summary["methods"].items()})


def _claim_row(name: str, c: dict[str, Any]) -> dict[str, Any]:
    lo, hi = (c.get("ci95") or [None, None])[:2]
    return {"claim": name, "comparison": f"{c['method']} vs {c['reference']}", "delta": c["delta"],
            "ci95": f"[{_fmt(lo)}, {_fmt(hi)}]", "p": c["p_value"], "p_holm": c["p_holm"], "n": c["n"],
            "verdict": c["verdict"]}


def claims_table(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per claim C1-C3 and per organ of C4 (``C4:organ``): delta, 95 % CI, p, Holm p, n, verdict."""
    claims = summary.get("claims", {})
    rows = [_claim_row(n, claims[n]) for n in ("C1", "C2", "C3") if n in claims]
    rows += [_claim_row(f"C4: {organ}", c) for organ, c in claims.get("C4", {}).items()]
    return pd.DataFrame(rows)


def _markdown(df: pd.DataFrame, digits: int = 3) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(v, digits) if isinstance(v, (float, np.floating)) or v is None
                                       else str(v) for v in row) + " |")
    return "\n".join(lines)


def _claims_section(summary: dict[str, Any]) -> list[str]:
    claims = summary.get("claims", {})
    lines = ["## Claims", ""]
    table = claims_table(summary)
    if len(table):
        lines += [_markdown(table), "",
                  "Delta: mean over cases of the paired difference in organ-averaged Dice, organs scored only where "
                  "present in the truth; 95 % CI: percentile bootstrap of that mean; p: two-sided Wilcoxon "
                  "signed-rank; Holm over C1-C3 and over the organs of C4. Verdict: supported / contradicted when "
                  "Holm p < 0.05 with a positive / negative delta, else not shown.", ""]
        lines += [f"- {n}: {CLAIM_TEXT[n]}" for n in ("C1", "C2", "C3") if n in claims]
    for name, why in claims.get("omitted", {}).items():
        lines.append(f"- {name} not tested: {why}")
    rob = claims.get("C3", {}).get("robustness", {})
    for m, r in rob.items():
        sd = f"; per-case SD over seeds {_fmt(r['per_case_sd_over_seeds'])}" if "per_case_sd_over_seeds" in r else ""
        lines.append(f"- robustness of {m}: worst per-case delta vs baseline {_fmt(r['worst_delta_vs_baseline'])}, "
                     f"{r['cases_below_baseline']} of {r['n']} cases below the baseline{sd}")
    rates = claims.get("hallucination_rate", {})
    if rates:
        lines.append("- hallucination rate (organs absent from the truth but predicted): " + ", ".join(
            f"{m} {_fmt(r['rate'], 2)} of {r['n_pairs']}" for m, r in rates.items()))
    return lines + [""]


def _header(summary: dict[str, Any], per_case: pd.DataFrame) -> list[str]:
    settings = summary["settings"]
    n = per_case["case"].nunique() if len(per_case) else 0
    proto = summary.get("protocol")
    how = (f"{proto['folds']}-fold cross-validation (fold seed {proto['fold_seed']}) over every labelled case"
           if proto else "the dataset's own split (training cases train the baseline, validation cases are inferred)")
    lines = ["# ISL experiment report", "",
             f"Dataset: `{summary['dataset']}`; profile `{settings['profile']['name']}`; seed {settings['seed']}; "
             f"{how}; {n} evaluated inference cases.", ""]
    if summary.get("excluded_cases"):
        lines += [f"Left out (made with other settings): {', '.join(summary['excluded_cases']['cases'])}.", ""]
    if summary.get("failed_cases"):
        lines += ["Failed: " + "; ".join(f"{c} ({e})" for c, e in summary["failed_cases"].items()), ""]
    return lines


def write_report(out: Path, summary: dict[str, Any], per_case: pd.DataFrame, ds: Dataset) -> Path:
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    methods = list(summary["methods"])
    lines = _header(summary, per_case) + _claims_section(summary)
    lines += ["## Methods", "",
              "Mean Dice is the organ average per case (organs absent from both truth and prediction excluded), "
              "averaged over cases. Delta and p-value: paired over cases against `baseline` (Wilcoxon signed-rank).",
              "", _markdown(results_table(summary)), ""]
    if len(per_case):
        per_organ_figure(summary, figs / "per_organ_dice.png")
        first = sorted(per_case["case"].unique())[0]
        overlay_figure(out, ds, methods, first, figs / "overlay.png")
        lines += ["## Per organ (mean Dice)", "", _markdown(organ_table(summary).reset_index(names="organ")), "",
                  "![per-organ Dice](figures/per_organ_dice.png)", ""]
        if len(methods) > 1:  # lines from the baseline to each other method
            paired_lines_figure(per_case, figs / "paired_lines.png")
            lines += ["## Per case: baseline -> method", "", "![paired lines](figures/paired_lines.png)", ""]
        lines += [f"## Overlay ({first})", "", "![overlay](figures/overlay.png)", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path
