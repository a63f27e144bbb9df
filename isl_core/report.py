"""``report.md`` of an experiment folder: the claims, the results table, per-organ figures, paired lines, overlays.

This module writes Markdown only; the figures are drawn by ``isl_core.viz``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from isl_core.claims import organ_rows
from isl_core.data import Dataset
from isl_core.runtime import write_text
from isl_core.viz import overlay_figure, paired_lines_figure, per_organ_figure

CLAIM_TEXT = {"C1": "ISL (isl-mask-ema) beats the baseline", "C2": "mask supervision beats intensity alignment",
              "C3": "the moving-average mask helps (isl-mask-ema vs isl-mask)",
              "deformation": "the inference-specific deformation adds to the same fine-tuning on unwarped atlases",
              "vs_tent": "ISL beats TENT on x* alone", "vs_pseudo_label": "ISL beats self-training on x*'s own labels",
              "vs_fusion": "ISL beats label fusion of the same deformed atlases (isl-mask-ema vs malf)",
              "vs_fusion_source": "ISL beats that fusion voted in the scan's own geometry (vs malf-source)",
              "C2_matched": "mask supervision beats intensity alignment at the same registration budget",
              "C3_output": "the moving average of the output alone helps (isl-intensity-ema vs isl-intensity)"}
PAIR_CLAIMS = tuple(CLAIM_TEXT)  # the paired claims in the order of the report: the paper's, then why


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


def _interval(c: dict[str, Any], key: str) -> str:
    if not c.get(key):  # no folds, no interval over folds
        return "n/a"
    lo, hi = c[key][:2]
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def _claim_row(name: str, c: dict[str, Any]) -> dict[str, Any]:
    return {"claim": name, "comparison": f"{c['method']} vs {c['reference']}", "delta": c["delta"],
            "ci95": _interval(c, "ci95"), "ci95_folds": _interval(c, "ci95_folds"), "p": c["p_value"],
            "p_holm": c["p_holm"], "n": c["n"], "verdict": c["verdict"],
            "verdict on": c.get("verdict_interval", "ci95")}


def claims_table(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per paired claim (the paper's C1-C3, then the why claims) and per organ of C4 (``C4: organ``):
    delta, both 95 % intervals, p, Holm p, n, verdict, and the interval the verdict was decided on."""
    claims = summary.get("claims", {})
    rows = [_claim_row(n, claims[n]) for n in PAIR_CLAIMS if n in claims]
    rows += [_claim_row(f"C4: {organ}", c) for organ, c in organ_rows(claims.get("C4", {})).items()]
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
                  "present in the truth (with several seeds: each case's mean over its seeds); ci95: percentile "
                  "bootstrap of that mean over cases; ci95_folds: two-level bootstrap (folds drawn with "
                  "replacement, then cases within each drawn fold), since the cases of a fold share a baseline and "
                  "atlases; p: two-sided Wilcoxon signed-rank; Holm within each family: the paper's C1-C3, the why "
                  "claims, the organs of C4. Verdict: supported / contradicted when Holm p < 0.05 with a positive / "
                  "negative delta and the more conservative of the two intervals (column 'verdict on') on the "
                  "same side of 0, else not shown.", ""]
        lines += [f"- {n}: {CLAIM_TEXT[n]}" for n in PAIR_CLAIMS if n in claims]
    lines += _rank_correlation_lines(claims.get("C4", {}))
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


def _rank_correlation_lines(c4: dict[str, Any]) -> list[str]:
    if "rho_baseline_vs_gain" not in c4:
        return []
    lines = [f"- C4 in the paper's form (gains larger on hard organs): Spearman rho between the baseline's per-organ "
             f"Dice and the gain {_fmt(c4['rho_baseline_vs_gain'], 2)} (p {_fmt(c4['rho_p_value'], 3)}, "
             f"{c4['rho_n_organs']} organs)"]
    gb = c4.get("gallbladder_relative_gain")
    if gb:
        lines.append(f"- {gb['organ']}: gain relative to the baseline's Dice {_fmt(gb['relative_gain'], 3)}, rank "
                     f"{gb['rank']} of {gb['n_organs']} organs")
    return lines


def _seeds_section(claims: dict[str, Any]) -> list[str]:
    spread = claims.get("seeds", {})
    if not spread:
        return []
    table = pd.DataFrame([{"method": m, **s} for m, s in spread.items()])
    return ["## Spread over seeds", "", _markdown(table, 4), "",
            "sd_of_mean: SD over seeds of the method's mean organ-averaged Dice (organs present in the truth); "
            "mean_case_sd: mean over cases of a case's SD over seeds. The claims pair each case's mean over seeds.",
            ""]


def _grid_section(claims: dict[str, Any]) -> list[str]:
    block = claims.get("source_vs_grid", {})
    if not block:
        return []
    table = pd.DataFrame([{"method": m, **s} for m, s in block.items()])
    return ["## Scored in the source geometry and on the working grid", "", _markdown(table, 4), "",
            "source: Dice of the label map written in the source image's geometry (the numbers above); grid: Dice "
            "on the working grid the methods run on, against the truth resampled onto it; mean organ-averaged "
            "Dice over cases, organs present in the truth. source_minus_grid measures what resampling the "
            "probabilities into the source geometry costs each method (fusion's soft vote among them).", ""]


def _header(summary: dict[str, Any], per_case: pd.DataFrame) -> list[str]:
    settings = summary["settings"]
    n = per_case["case"].nunique() if len(per_case) else 0
    proto = summary.get("protocol")
    how = (f"{proto['folds']}-fold cross-validation (fold seed {proto['fold_seed']}) over every labelled case"
           if proto else "the dataset's own split (training cases train the baseline, validation cases are inferred)")
    lines = ["# ISL experiment report", "",
             f"Dataset: `{summary['dataset']}`; profile `{settings['profile']['name']}`; seed {settings['seed']}; "
             f"{how}; {n} evaluated inference cases.", ""]
    dtypes = summary.get("unet_dtype", [])
    if dtypes:  # bf16 autocast on hardware that has it (segment.amp); results differ slightly from fp32
        mixed = " (mixed: the cases were run on different hardware)" if len(dtypes) > 1 else ""
        lines += [f"Segmenter precision: {', '.join(dtypes)}{mixed}.", ""]
    if summary.get("excluded_cases"):
        lines += [f"Left out (made with other settings): {', '.join(summary['excluded_cases']['cases'])}.", ""]
    if summary.get("failed_cases"):
        lines += ["Failed: " + "; ".join(f"{c} ({e})" for c, e in summary["failed_cases"].items()), ""]
    return lines


def write_report(out: Path, summary: dict[str, Any], per_case: pd.DataFrame, ds: Dataset) -> Path:
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    methods = list(summary["methods"])
    claims = summary.get("claims", {})
    lines = _header(summary, per_case) + _claims_section(summary) + _seeds_section(claims) + _grid_section(claims)
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
