"""``report.md`` of an experiment folder: the results table, per-organ figures, paired lines, overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from isl_core.data import Dataset
from isl_core.evaluate import case_means
from isl_core.runtime import write_text
from isl_core.viz import organ_legend, overlay


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


def _markdown(df: pd.DataFrame, digits: int = 3) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(v, digits) if isinstance(v, (float, np.floating)) or v is None
                                       else str(v) for v in row) + " |")
    return "\n".join(lines)


def per_organ_figure(summary: dict[str, Any], path: Path) -> None:
    table = organ_table(summary)
    ax = table.plot.bar(figsize=(max(8, 0.8 * len(table)), 4), width=0.8)
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.set_title("Per-organ Dice by method")
    ax.legend(fontsize=8, ncol=min(4, table.shape[1]))
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=90)
    plt.close(ax.figure)


def paired_lines_figure(per_case: pd.DataFrame, path: Path) -> None:
    """Each case's organ-averaged Dice under the baseline and each other method, joined by a line."""
    means = case_means(per_case).pivot(index="case", columns="method", values="dice")
    others = [m for m in means.columns if m != "baseline"]
    fig, axes = plt.subplots(1, len(others), figsize=(2.6 * len(others), 3.2), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], others):
        for _, row in means.iterrows():
            up = row[m] >= row["baseline"]
            ax.plot([0, 1], [row["baseline"], row[m]], "-o", color="tab:green" if up else "tab:red", alpha=0.7)
        ax.set_xticks([0, 1], ["baseline", m], rotation=20, fontsize=8)
        ax.set_title(m, fontsize=9)
    axes[0, 0].set_ylabel("organ-averaged Dice per case")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def overlay_figure(out: Path, ds: Dataset, methods: list[str], case_id: str, path: Path) -> None:
    """One axial slice of one case: ground truth and every method's prediction (source geometry)."""
    import nibabel as nib

    case = ds.case(case_id)
    img = nib.as_closest_canonical(nib.load(str(case.image)))
    image = img.get_fdata(dtype=np.float32)
    layers = [("ground truth", case.label)] + [(m, out / "predictions" / m / f"{case_id}.nii.gz") for m in methods]
    layers = [(t, p) for t, p in layers if p is not None and Path(p).is_file()]
    truth = np.asarray(nib.as_closest_canonical(nib.load(str(case.label))).dataobj)
    z = int(np.argmax((truth > 0).sum(axis=(0, 1))))  # the slice with the most organ voxels
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers), 3.0), squeeze=False)
    for ax, (title, p) in zip(axes[0], layers):
        lab = np.asarray(nib.as_closest_canonical(nib.load(str(p))).dataobj)
        overlay(ax, image, lab, axis=2, index=z, title=title, num_classes=ds.num_classes, vmin=-175, vmax=250)
    organ_legend(fig, ds.labels, present=sorted(set(np.unique(truth).tolist()) - {0}))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out: Path, summary: dict[str, Any], per_case: pd.DataFrame, ds: Dataset) -> Path:
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    methods = list(summary["methods"])
    lines = ["# ISL experiment report", "",
             f"Dataset: `{summary['dataset']}`; profile `{summary['settings']['profile']['name']}`; "
             f"seed {summary['settings']['seed']}; {per_case['case'].nunique() if len(per_case) else 0} "
             "evaluated inference cases.", "",
             "Mean Dice is the organ average per case (organs absent from both truth and prediction excluded), "
             "averaged over cases. Delta and p-value: paired over cases against `baseline` (Wilcoxon signed-rank).",
             "", "## Methods", "", _markdown(results_table(summary)), ""]
    if len(per_case):
        per_organ_figure(summary, figs / "per_organ_dice.png")
        paired_lines_figure(per_case, figs / "paired_lines.png")
        first = sorted(per_case["case"].unique())[0]
        overlay_figure(out, ds, methods, first, figs / "overlay.png")
        lines += ["## Per organ (mean Dice)", "", _markdown(organ_table(summary).reset_index(names="organ")), "",
                  "![per-organ Dice](figures/per_organ_dice.png)", "",
                  "## Per case: baseline -> method", "", "![paired lines](figures/paired_lines.png)", "",
                  f"## Overlay ({first})", "", "![overlay](figures/overlay.png)", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path
