"""The statistics added to answer why ISL helps: the two-level bootstrap against an exact enumeration, the
conservative verdict, the "why" claims as their own Holm family, C4's rank correlation, and seeds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from isl_core.claims import (
    WHY_PAIRS,
    claims,
    conservative_interval,
    fold_bootstrap_ci,
    fold_bootstrap_means,
    holm,
    organ_rows,
    verdict,
)

FOLDS = {0: [0.0, 0.01], 1: [0.10, 0.12], 2: [0.05, 0.04, 0.07]}  # fold means far apart: the fold level matters


def _exact_two_level() -> tuple[np.ndarray, np.ndarray]:
    """Every outcome of the two-level resampling of FOLDS with its probability, by brute-force enumeration:
    every ordered draw of K folds, and in each drawn fold every ordered draw of its cases."""
    groups = list(FOLDS.values())
    k = len(groups)
    sums = [np.array([sum(t) for t in itertools.product(g, repeat=len(g))]) for g in groups]
    values, weights = [], []
    for draw in itertools.product(range(k), repeat=k):
        total = np.zeros(1)
        for f in draw:
            total = np.add.outer(total, sums[f]).ravel()
        count = sum(len(groups[f]) for f in draw)
        values.append(total / count)
        weights.append(np.full(total.size, 1.0 / (k ** k * total.size)))
    return np.concatenate(values), np.concatenate(weights)


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    cdf = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cdf, q)])


def _diff_and_folds() -> tuple[list[float], list[int]]:
    diff = [v for vals in FOLDS.values() for v in vals]
    folds = [f for f, vals in FOLDS.items() for _ in vals]
    return diff, folds


def test_two_level_bootstrap_matches_the_exact_enumeration():
    values, weights = _exact_two_level()
    assert weights.sum() == pytest.approx(1.0)
    exact_mean = float(np.sum(values * weights))
    exact_sd = math.sqrt(float(np.sum(weights * (values - exact_mean) ** 2)))
    diff, folds = _diff_and_folds()
    means = fold_bootstrap_means(diff, folds, n_resamples=200_000, seed=3)
    assert means.mean() == pytest.approx(exact_mean, abs=0.02 * exact_sd)
    assert means.std() == pytest.approx(exact_sd, rel=0.02)
    lo, hi = fold_bootstrap_ci(diff, folds, n_resamples=200_000, seed=3)
    assert lo == pytest.approx(_weighted_quantile(values, weights, 0.025), abs=0.05 * exact_sd)
    assert hi == pytest.approx(_weighted_quantile(values, weights, 0.975), abs=0.05 * exact_sd)
    # resampling the 7 cases alone would be far narrower: the fold level is what this interval adds
    single = np.std(np.asarray(diff)) / math.sqrt(len(diff))
    assert exact_sd > 1.3 * single


def test_two_level_bootstrap_is_deterministic_and_degenerate_cases_are_decided():
    diff, folds = _diff_and_folds()
    assert fold_bootstrap_ci(diff, folds) == fold_bootstrap_ci(diff, folds)
    assert fold_bootstrap_ci(diff, folds, seed=1) != fold_bootstrap_ci(diff, folds, seed=2)
    assert all(math.isnan(v) for v in fold_bootstrap_ci(diff, None))  # no folds: no two-level interval
    assert all(math.isnan(v) for v in fold_bootstrap_ci([0.1], [0]))
    assert fold_bootstrap_ci([0.1, 0.1, 0.1], [0, 1, 1]) == (0.1, 0.1)


def test_the_verdict_takes_the_more_conservative_interval():
    assert conservative_interval(0.05, [0.02, 0.08], [-0.01, 0.1]) == "ci95_folds"
    assert conservative_interval(0.05, [0.02, 0.08], [0.03, 0.07]) == "ci95"
    assert conservative_interval(-0.05, [-0.08, -0.02], [-0.1, 0.01]) == "ci95_folds"
    assert conservative_interval(0.05, [0.02, 0.08], [math.nan, math.nan]) == "ci95"
    assert verdict(0.05, 0.001, interval=[-0.01, 0.1]) == "not shown"
    assert verdict(-0.05, 0.001, interval=[-0.1, -0.01]) == "contradicted"
    assert verdict(0.05, 0.001, interval=[0.01, 0.1]) == "supported"


def _table(methods: dict[str, list[float]], folds: list[int], organs=("liver", "spleen", "gallbladder"),
           organ_offset: dict[str, float] | None = None, seeds=(None,)) -> pd.DataFrame:
    rows = []
    for m, values in methods.items():
        for i, v in enumerate(values):
            for seed in seeds:
                for organ in organs:
                    shift = (organ_offset or {}).get(organ, {}).get(m, 0.0) if organ_offset else 0.0
                    row = {"fold": folds[i], "case": f"c{i}", "method": m, "organ": organ, "dice": v + shift,
                           "in_truth": True, "in_pred": True}
                    if seed is not None:
                        row["seed"] = seed
                    rows.append(row)
    return pd.DataFrame(rows)


def test_fold_clustered_gain_is_not_shown_although_wilcoxon_is_significant():
    # every case of fold 0 gains a lot, fold 1 loses a little, folds 2-3 barely gain: 24 cases, in effect 4 units
    gain = [0.2] * 6 + [-0.006] * 6 + [0.002, 0.004, 0.006, 0.008, 0.003, 0.005] * 2
    base = [0.6] * 24
    out = claims(_table({"baseline": base, "isl-mask-ema": [b + g for b, g in zip(base, gain)]},
                        folds=[i // 6 for i in range(24)]))
    c1 = out["C1"]
    assert c1["p_holm"] < 0.05 and c1["ci95"][0] > 0  # the case-level statistics alone would support it
    assert c1["ci95_folds"][0] < 0 < c1["ci95_folds"][1]
    assert c1["verdict_interval"] == "ci95_folds" and c1["verdict"] == "not shown"


def test_why_claims_form_their_own_holm_family_and_leave_the_papers_claims_alone():
    rng = np.random.default_rng(0)
    base = list(0.6 + rng.normal(0, 0.01, 12))
    arms = {"baseline": base, "isl-mask-ema": [b + 0.05 + rng.normal(0, 0.01) for b in base],
            "isl-mask": [b + 0.045 + rng.normal(0, 0.01) for b in base],
            "isl-intensity": [b + 0.04 + rng.normal(0, 0.01) for b in base]}
    folds = [i % 3 for i in range(12)]
    paper_only = claims(_table(arms, folds))
    assert not any(name in paper_only for name in WHY_PAIRS)
    assert "omitted" not in paper_only or not set(WHY_PAIRS) & set(paper_only["omitted"])  # arms never ran
    arms |= {"malf": [b + 0.02 + rng.normal(0, 0.01) for b in base],
             "finetune-atlases": [b + 0.03 + rng.normal(0, 0.01) for b in base],
             "tent": [b + rng.normal(0, 0.01) for b in base], "pseudo-label": [b + 0.01 for b in base],
             "isl-intensity-matched": [b + 0.045 + rng.normal(0, 0.01) for b in base]}
    out = claims(_table(arms, folds))
    for name in ("C1", "C2", "C3"):
        assert out[name]["p_holm"] == paper_only[name]["p_holm"] and out[name]["holm_family"] == "paper"
    present = ["deformation", "vs_tent", "vs_pseudo_label", "C2_matched", "vs_fusion"]
    assert all(out[n]["holm_family"] == "why" for n in present)
    assert [out[n]["p_holm"] for n in present] == pytest.approx(holm([out[n]["p_value"] for n in present]))
    assert out["vs_tent"]["delta"] == pytest.approx(np.mean(np.subtract(arms["isl-mask-ema"], arms["tent"])))
    for key in ("delta", "ci95", "ci95_folds", "p_value", "p_holm", "n", "verdict"):
        assert key in out["deformation"]
    assert out["vs_tent"]["verdict"] == "supported"
    assert "C3_output" not in out and "omitted" not in out  # isl-intensity-ema never ran: nothing to name
    arms["isl-intensity-ema"] = arms.pop("isl-intensity")  # the arm ran, its reference did not: named
    out = claims(_table(arms, folds))
    assert "C3_output" not in out and "isl-intensity" in out["omitted"]["C3_output"]


def test_c4_rank_correlation_and_the_gallbladders_relative_gain():
    base = [0.6] * 8
    # the baseline is worst on the gallbladder and best on the liver; ISL gains most where the baseline is worst
    offset = {"liver": {"baseline": 0.3, "isl-mask-ema": 0.31}, "spleen": {"baseline": 0.1, "isl-mask-ema": 0.14},
              "gallbladder": {"baseline": -0.3, "isl-mask-ema": -0.2}, "stomach": {"baseline": 0.0,
                                                                                   "isl-mask-ema": 0.06}}
    ema = [b + 0.001 * i for i, b in enumerate(base)]
    c4 = claims(_table({"baseline": base, "isl-mask-ema": ema}, folds=[i % 2 for i in range(8)],
                       organs=tuple(offset), organ_offset=offset))["C4"]
    assert set(organ_rows(c4)) == set(offset)
    assert c4["rho_baseline_vs_gain"] == pytest.approx(-1.0) and c4["rho_n_organs"] == 4
    assert c4["rho_p_value"] == pytest.approx(0.0, abs=1e-6)
    gb = c4["gallbladder_relative_gain"]
    gain = 0.1 + np.mean(np.subtract(ema, base))
    assert gb["relative_gain"] == pytest.approx(gain / 0.3) and gb["rank"] == 1 and gb["n_organs"] == 4
    assert organ_rows(c4)["gallbladder"]["reference_mean"] == pytest.approx(0.3)


def test_seeds_average_per_case_and_report_their_spread():
    base = [0.6, 0.62, 0.58, 0.61, 0.63, 0.59]
    folds = [0, 0, 1, 1, 2, 2]
    ema = [b + 0.04 for b in base]
    one = _table({"baseline": base, "isl-mask-ema": ema}, folds)
    # one seed column with a single seed: everything exactly as without it
    assert claims(one.assign(seed=7)) == claims(one)
    # two seeds: isl-mask-ema's seeds at -0.01 / +0.01 around the same per-case means
    two = pd.concat([one.assign(seed=0), one.assign(seed=1)], ignore_index=True)
    ema_rows = two["method"] == "isl-mask-ema"
    two.loc[ema_rows, "dice"] += np.where(two.loc[ema_rows, "seed"] == 0, -0.01, 0.01)
    out, ref = claims(two), claims(one)
    for key in ("delta", "ci95", "ci95_folds", "p_value", "verdict"):
        assert out["C1"][key] == pytest.approx(ref["C1"][key])
    spread = out["seeds"]
    assert spread["baseline"] == {"n_seeds": 2, "sd_of_mean": 0.0, "mean_case_sd": 0.0}
    assert spread["isl-mask-ema"]["sd_of_mean"] == pytest.approx(np.std([-0.01, 0.01], ddof=1))
    assert spread["isl-mask-ema"]["mean_case_sd"] == pytest.approx(np.std([-0.01, 0.01], ddof=1))
    assert "seeds" not in ref


def test_source_vs_grid_measures_the_difference_of_the_two_scorings():
    base = [0.6, 0.62, 0.58, 0.61]
    t = _table({"baseline": base, "malf": [b + 0.05 for b in base]}, folds=[0, 0, 1, 1])
    t["dice_grid"] = t["dice"] + np.where(t["method"] == "malf", 0.03, 0.0)
    block = claims(t)["source_vs_grid"]
    assert block["malf"]["source_minus_grid"] == pytest.approx(-0.03)
    assert block["baseline"]["source_minus_grid"] == pytest.approx(0.0)
    assert block["malf"]["grid"] == pytest.approx(np.mean(base) + 0.08) and block["malf"]["n"] == 4
    assert "source_vs_grid" not in claims(t.drop(columns="dice_grid"))


def test_the_report_prints_both_intervals_the_why_claims_rho_seeds_and_both_scorings():
    from isl_core import report
    from isl_core.runtime import json_safe

    base = [0.6, 0.62, 0.58, 0.61, 0.63, 0.59]
    arms = {"baseline": base, "isl-mask-ema": [b + 0.05 for b in base], "tent": [b + 0.01 for b in base]}
    t = _table(arms, folds=[0, 0, 1, 1, 2, 2])
    t = pd.concat([t.assign(seed=0), t.assign(seed=1, dice=t["dice"] + 0.002)], ignore_index=True)
    t["dice_grid"] = t["dice"] + 0.01
    summary = json_safe({"claims": claims(t)})
    table = report.claims_table(summary)
    assert table["claim"].tolist()[:2] == ["C1", "vs_tent"] and table["claim"].tolist()[2].startswith("C4: ")
    assert {"ci95", "ci95_folds", "verdict on"} <= set(table.columns)
    assert table["verdict on"].isin(["ci95", "ci95_folds"]).all()
    text = "\n".join(report._claims_section(summary) + report._seeds_section(summary["claims"])
                     + report._grid_section(summary["claims"]))
    assert "vs_tent: ISL beats TENT on x* alone" in text and "Spearman rho" in text
    assert "## Spread over seeds" in text and "| tent | 2 |" in text
    assert "## Scored in the source geometry and on the working grid" in text and "-0.0100" in text
