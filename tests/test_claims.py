"""The statistics of the claims on hand-made tables: Holm, bootstrap CI, verdicts, scoring where present."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from isl_core.claims import bootstrap_ci, claims, hallucination_rates, holm, organ_averaged, organ_rows, verdict


def test_holm_multiplies_by_the_remaining_tests_and_stays_monotone():
    # sorted: 0.01 (x3), 0.02 (x2), 0.04 (x1); the adjusted values keep the order of the raw ones
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.03, 0.01, 0.5]) == pytest.approx([0.06, 0.03, 0.5])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.01, math.nan, 0.02])  # NaN is no test: m = 2
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_bootstrap_ci_contains_the_mean_and_is_reproducible():
    rng = np.random.default_rng(1)
    d = rng.normal(0.05, 0.02, size=20)
    lo, hi = bootstrap_ci(d)
    assert lo < d.mean() < hi and hi - lo < 0.05
    assert bootstrap_ci(d) == (lo, hi)  # fixed seed
    assert bootstrap_ci([0.1, 0.1, 0.1]) == (0.1, 0.1)
    assert all(math.isnan(v) for v in bootstrap_ci([0.2]))


@pytest.mark.parametrize(("delta", "p", "expected"), [(0.05, 0.01, "supported"), (-0.05, 0.01, "contradicted"),
                                                      (0.05, 0.2, "not shown"), (0.0, 0.01, "not shown"),
                                                      (0.05, math.nan, "not shown")])
def test_verdicts(delta, p, expected):
    assert verdict(delta, p) == expected


def _table(methods: dict[str, list[float]], organs=("liver", "spleen"), absent=()) -> pd.DataFrame:
    """Long per-case table: each method's per-case Dice for every organ; (case, organ) in ``absent`` not in truth."""
    rows = []
    for m, values in methods.items():
        for i, v in enumerate(values):
            for organ in organs:
                gone = (i, organ) in absent
                rows.append({"case": f"c{i}", "method": m, "organ": organ, "dice": 0.0 if gone else v,
                             "in_truth": not gone, "in_pred": True})
    return pd.DataFrame(rows)


def test_claims_on_a_clear_gain_and_omissions_named():
    base = [0.60, 0.62, 0.58, 0.61, 0.63, 0.59, 0.60, 0.62]
    ema = [b + 0.05 + 0.001 * i for i, b in enumerate(base)]
    out = claims(_table({"baseline": base, "isl-mask-ema": ema}))
    c1 = out["C1"]
    assert c1["n"] == 8 and c1["delta"] == pytest.approx(np.mean(np.subtract(ema, base)))
    assert c1["p_value"] == pytest.approx(2 / 2**8)  # exact Wilcoxon: every difference positive
    assert c1["p_holm"] == c1["p_value"]  # the only test of C1-C3 that ran
    assert c1["ci95"][0] <= c1["delta"] <= c1["ci95"][1] and c1["verdict"] == "supported"
    assert set(organ_rows(out["C4"])) == {"liver", "spleen"} and out["C4"]["liver"]["verdict"] == "supported"
    assert out["C4"]["liver"]["p_holm"] == pytest.approx(min(1.0, 2 * out["C4"]["liver"]["p_value"]))
    assert "isl-mask" in out["omitted"]["C2"] and "C3" in out["omitted"] and "C2" not in out


def test_claims_contradicted_and_robustness():
    base = [0.6] * 8
    mask = [0.64, 0.65, 0.61, 0.66, 0.64, 0.65, 0.61, 0.64]
    ema = [m - 0.03 for m in mask]  # the moving average hurts on every case
    out = claims(_table({"baseline": base, "isl-intensity": base, "isl-mask": mask, "isl-mask-ema": ema}))
    assert out["C3"]["verdict"] == "contradicted" and out["C2"]["verdict"] == "supported"
    rob = out["C3"]["robustness"]
    assert rob["isl-mask-ema"]["cases_below_baseline"] == 2  # 0.58 twice
    assert rob["isl-mask-ema"]["worst_delta_vs_baseline"] == pytest.approx(-0.02)
    assert rob["isl-mask"]["cases_below_baseline"] == 0
    ps = [out[c]["p_value"] for c in ("C1", "C2", "C3")]
    assert [out[c]["p_holm"] for c in ("C1", "C2", "C3")] == pytest.approx(holm(ps))


def test_absent_organs_are_scored_only_where_present_and_counted_as_hallucinations():
    per_case = _table({"baseline": [0.8, 0.8], "isl-mask-ema": [0.9, 0.9]}, absent={(0, "spleen")})
    table = organ_averaged(per_case)
    assert table.loc["c0", "baseline"] == pytest.approx(0.8)  # the absent spleen's 0 is not averaged in
    rates = hallucination_rates(per_case)
    assert rates["baseline"] == {"rate": 1.0, "n_pairs": 1}
    per_case.loc[(per_case["case"] == "c0") & (per_case["organ"] == "spleen") &
                 (per_case["method"] == "isl-mask-ema"), "in_pred"] = False
    assert hallucination_rates(per_case)["isl-mask-ema"]["rate"] == 0.0
    assert claims(per_case)["C4"]["spleen"]["n"] == 1
