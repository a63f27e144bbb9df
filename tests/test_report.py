"""report.md: the tables hold the summary's numbers, undefined values read n/a, the protocol is said."""

from __future__ import annotations

import math

import pandas as pd

from isl_core.report import write_report


def _summary() -> dict:
    claim = {"method": "isl-mask-ema", "reference": "baseline", "delta": 0.0876, "ci95": [0.0204, 0.1513],
             "ci95_folds": [-0.0101, 0.1602], "verdict_interval": "ci95_folds", "p_value": 0.0312, "p_holm": 0.0624,
             "n": 8, "verdict": "not shown"}
    return {
        "dataset": "/data/cohort", "settings": {"profile": {"name": "quick"}, "seed": 3},
        "protocol": {"folds": 4, "fold_seed": 2, "n_cases": 8, "seeds": [3]},
        "methods": {
            "baseline": {"mean_dice": 0.6123, "per_organ_dice": {"spleen": 0.8}, "seconds_per_case": 0.42,
                         "mean_hd95_mm": 12.345},
            "isl-mask-ema": {"mean_dice": 0.6999, "per_organ_dice": {"spleen": 0.9}, "seconds_per_case": 61.0,
                             "mean_hd95_mm": math.nan}},
        "paired_tests": {"isl-mask-ema_vs_baseline": {"delta_mean_dice": 0.0876, "p_value": 0.0312}},
        "claims": {"C1": claim, "C4": {"spleen": {**claim, "delta": -0.0105, "ci95_folds": None,
                                                  "verdict_interval": "ci95", "verdict": "contradicted"}},
                   "omitted": {"C2": "isl-intensity was not run"}},
    }


def test_report_tables_hold_the_summary_values(tmp_path):
    path = write_report(tmp_path, _summary(), per_case=pd.DataFrame(), ds=None)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert "4-fold cross-validation (fold seed 2) over every labelled case; 0 evaluated inference cases" in text
    assert "profile `quick`; seed 3" in text
    lines = text.splitlines()
    # the methods table: the delta and p only for the method compared, n/a for the baseline and for a NaN HD95
    assert "| baseline | 0.612 | n/a | n/a | 12.345 | 0.420 |" in lines
    assert "| isl-mask-ema | 0.700 | 0.088 | 0.031 | n/a | 61.000 |" in lines
    # the claims table: C1, then each organ of C4, with both intervals, both p-values, n, the verdict and the
    # interval it was decided on
    assert ("| C1 | isl-mask-ema vs baseline | 0.088 | [0.020, 0.151] | [-0.010, 0.160] | 0.031 | 0.062 | 8 "
            "| not shown | ci95_folds |") in lines
    assert ("| C4: spleen | isl-mask-ema vs baseline | -0.011 | [0.020, 0.151] | n/a | 0.031 | 0.062 | 8 "
            "| contradicted | ci95 |") in lines
    assert "- C2 not tested: isl-intensity was not run" in lines
    assert text.index("## Claims") < text.index("## Methods")
    assert "## Per organ" not in text  # no finished case: no per-case figures either
