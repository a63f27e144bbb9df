"""The claims tables in the README and docs/claims.md are the committed runs' numbers, recomputed from their tables.

``docs/claims_runs/`` holds each documented run's ``summary.json`` and ``per_case.csv``. These tests recompute the
claims from the per-case table with the kit's own statistics and check that the summary and every table row quoted
in the documents agree, so a change of the statistics or a hand edit of a number cannot leave the documents stale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from isl_core.claims import claims, organ_rows

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "claims_runs"
NAMES = ["phantom", "sample", "phantom_appearance_none", "sample_6mm"]
COMPARISON = {"C1": "isl-mask-ema vs baseline", "C2": "isl-mask vs isl-intensity", "C3": "isl-mask-ema vs isl-mask"}


def _summary(name: str) -> dict:
    return json.loads((RUNS / f"summary_{name}.json").read_text())


def _claim_row(key: str, c: dict) -> str:
    """One C1-C3 row as the documents print it."""
    return (f"| {key} | {COMPARISON[key]} | {c['n']} | {c['delta']:+.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] "
            f"| {c['p_value']:.3g} | {c['p_holm']:.3g} | **{c['verdict']}** |")


def _organ_row(organ: str, c: dict) -> str:
    return (f"| {organ.replace('_', ' ')} | {c['n']} | {c['delta']:+.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] "
            f"| {c['p_holm']:.3g} | {c['verdict']} |")


@pytest.mark.parametrize("name", NAMES)
def test_committed_summary_is_what_the_statistics_give_for_its_per_case_table(name):
    per_case = pd.read_csv(RUNS / f"per_case_{name}.csv")
    recomputed, stored = claims(per_case), _summary(name)["claims"]
    for key in ("C1", "C2", "C3"):
        for field in ("delta", "p_value", "p_holm"):
            assert recomputed[key][field] == pytest.approx(stored[key][field], rel=1e-6, abs=1e-12), (key, field)
        assert recomputed[key]["ci95"] == pytest.approx(stored[key]["ci95"], abs=1e-9)
        assert recomputed[key]["verdict"] == stored[key]["verdict"]
    assert recomputed["C4"].keys() == stored["C4"].keys()
    for organ, c in organ_rows(recomputed["C4"]).items():
        assert c["delta"] == pytest.approx(stored["C4"][organ]["delta"], abs=1e-9)
        assert c["verdict"] == stored["C4"][organ]["verdict"]


@pytest.mark.parametrize("name", NAMES)
def test_claims_md_quotes_every_row_of_every_run(name):
    text = (ROOT / "docs" / "claims.md").read_text()
    summary = _summary(name)
    c = summary["claims"]
    for key in ("C1", "C2", "C3"):
        assert _claim_row(key, c[key]) in text, f"docs/claims.md: {name} {key} row differs from the run"
    for organ, row in organ_rows(c["C4"]).items():
        assert _organ_row(organ, row) in text, f"docs/claims.md: {name} C4 {organ} row differs from the run"
    _assert_means_quoted(text, summary, "docs/claims.md")


def _assert_means_quoted(text: str, summary: dict, where: str) -> None:
    flat = " ".join(text.split())
    for m, v in summary["methods"].items():
        assert f"{m} {v['mean_dice']:.3f}" in flat, f"{where}: the mean Dice of {m} ({v['mean_dice']:.4f}) is missing"


@pytest.mark.parametrize("name", NAMES)
def test_readme_headline_quotes_the_runs(name):
    text = (ROOT / "README.md").read_text()
    summary = _summary(name)
    for key in ("C1", "C2", "C3"):
        assert _claim_row(key, summary["claims"][key]) in text, f"README: {name} {key} row differs from the run"
    _assert_means_quoted(text, summary, "README")


def test_readme_c4_table_has_each_runs_organ_deltas_and_verdicts():
    text = (ROOT / "README.md").read_text()
    c4 = {name: organ_rows(_summary(name)["claims"]["C4"]) for name in NAMES}
    assert all(c4[n][o]["verdict"] != "contradicted" for n in NAMES for o in c4[n])  # the legend says none are
    for organ in c4["phantom"]:
        cells = []
        for name in NAMES:
            row = c4[name].get(organ)
            cells.append("(outside the CT)" if row is None else
                         f"{row['delta']:+.3f}" + (" *" if row["verdict"] == "supported" else ""))
        line = f"| {organ.replace('_', ' ')} | " + " | ".join(cells) + " |"
        assert line in text, f"README C4 table: {line}"


def test_readme_demo_table_is_the_committed_demo_summary():
    """The README's demo table quotes docs/demo_summary_quick.json, row by row, and the course notes agree."""
    summary = json.loads((ROOT / "docs" / "demo_summary_quick.json").read_text())
    text = (ROOT / "README.md").read_text().replace("**", "")
    for m, v in summary["methods"].items():
        test = summary["paired_tests"].get(f"{m}_vs_baseline")
        delta = "– | –" if test is None else f"{test['delta_mean_dice']:+.3f} | {test['p_value']:.3f}"
        row = f"| {m} | {v['mean_dice']:.3f} | {delta} | {v['mean_hd95_mm']:.1f} |"
        assert row in text, f"README demo table: {row} missing"
    notes = " ".join((ROOT / "docs" / "course_notes.md").read_text().split())  # the run's numbers, for instructors
    for m, v in summary["methods"].items():
        if m != "baseline":
            assert f"({v['mean_dice']:.3f})" in notes, f"docs/course_notes.md: {m} {v['mean_dice']:.3f} missing"



def test_claims_md_quotes_the_intervals_over_folds_and_c4s_rank_correlation():
    text = (ROOT / "docs" / "claims.md").read_text()
    flat = " ".join(text.split())
    claims_of = {name: _summary(name)["claims"] for name in NAMES}
    for key in ("C1", "C2", "C3"):
        cells = [f"[{claims_of[n][key]['ci95_folds'][0]:+.3f}, {claims_of[n][key]['ci95_folds'][1]:+.3f}]"
                 for n in NAMES]
        assert f"| {key} | " + " | ".join(cells) + " |" in text, f"docs/claims.md: {key}'s intervals over folds"
    for name in NAMES:
        c4 = claims_of[name]["C4"]
        rho = f"{c4['rho_baseline_vs_gain']:+.2f} (p {c4['rho_p_value']:.2g}, {c4['rho_n_organs']} organs)"
        assert rho in flat, f"docs/claims.md: {name}'s rho {rho}"
        gb = c4["gallbladder_relative_gain"]
        assert f"{gb['relative_gain']:.3f} (rank {gb['rank']} of {gb['n_organs']})" in flat, name
    readme = " ".join((ROOT / "README.md").read_text().split())
    rhos = ", ".join(f"{claims_of[n]['C4']['rho_baseline_vs_gain']:+.2f}" for n in NAMES)
    assert f"Spearman rho over organs {rhos};" in readme, f"README: C4's rho {rhos}"


# ---------------------------------------------------------------------------- what makes ISL work (control arms)
#: runs with every control arm: the "what makes ISL work" table of docs/claims.md and the README quotes them
ARMS_RUNS = ["phantom_arms", "sample_arms", "phantom_appearance_none_arms", "sample_6mm_arms"]
WHY = ("deformation", "C2_matched", "C3_output", "vs_tent", "vs_pseudo_label", "vs_fusion")


def _why_row(key: str, c: dict) -> str:
    return (f"| {key} | {c['method']} vs {c['reference']} | {c['n']} | {c['delta']:+.3f} "
            f"| [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | [{c['ci95_folds'][0]:+.3f}, {c['ci95_folds'][1]:+.3f}] "
            f"| {c['p_value']:.3g} | {c['p_holm']:.3g} | **{c['verdict']}** |")


@pytest.mark.parametrize("name", ARMS_RUNS)
def test_arms_run_summary_is_what_the_statistics_give(name):
    per_case = pd.read_csv(RUNS / f"per_case_{name}.csv")
    recomputed, stored = claims(per_case), _summary(name)["claims"]
    for key in ("C1", "C2", "C3", *WHY):
        for field in ("delta", "p_value", "p_holm"):
            assert recomputed[key][field] == pytest.approx(stored[key][field], rel=1e-6, abs=1e-12), (key, field)
        assert recomputed[key]["ci95_folds"] == pytest.approx(stored[key]["ci95_folds"], abs=1e-9), key
        assert recomputed[key]["verdict"] == stored[key]["verdict"], key


@pytest.mark.parametrize("name", ARMS_RUNS)
def test_what_makes_isl_work_table_is_quoted_from_the_run(name):
    summary = _summary(name)
    for where in ("docs/claims.md", "README.md"):
        text = (ROOT / where).read_text()
        for key in WHY:
            assert _why_row(key, summary["claims"][key]) in text, f"{where}: {name} {key} row differs from the run"
        _assert_means_quoted(text, summary, where)
    text = (ROOT / "docs" / "claims.md").read_text()
    for key in ("C1", "C2", "C3"):
        assert _claim_row(key, summary["claims"][key]) in text, f"docs/claims.md: {name} {key} row"


# --------------------------------------------------------------- fusion in the source geometry (malf-source)
#: (arms run, fusion run): docs/claims.md pairs ISL's Dice from the first with malf-source's from the second
FUSION_RUNS = [("phantom_arms", "phantom_fusion"), ("sample_arms", "sample_fusion")]


def fusion_row(t: dict) -> str:
    """One row of the fusion-in-the-source-geometry table, as docs/claims.md prints it (``bench/fusion_source.py``)."""
    return (f"| {t['claim']} | {t['method']} vs {t['reference']} | {t['n']} | {t['delta']:+.3f} "
            f"| [{t['ci95'][0]:+.3f}, {t['ci95'][1]:+.3f}] | [{t['ci95_folds'][0]:+.3f}, {t['ci95_folds'][1]:+.3f}] "
            f"| {t['p_value']:.3g} | {t['below']}/{t['n']} | **{t['verdict']}** |")


@pytest.mark.parametrize(("arms", "fusion"), FUSION_RUNS)
def test_fusion_in_the_source_geometry_is_quoted_from_the_runs(arms, fusion):
    import runpy

    pair = runpy.run_path(str(ROOT / "bench" / "fusion_source.py"))["fusion_source"]
    result = pair(pd.read_csv(RUNS / f"per_case_{arms}.csv"), pd.read_csv(RUNS / f"per_case_{fusion}.csv"))
    stored = claims(pd.read_csv(RUNS / f"per_case_{fusion}.csv"))
    for method, scores in _summary(fusion)["claims"]["source_vs_grid"].items():
        assert scores == pytest.approx(stored["source_vs_grid"][method]), method
    text = (ROOT / "docs" / "claims.md").read_text()
    for t in result["tests"]:
        assert fusion_row(t) in text, f"docs/claims.md: {fusion} {t['claim']} row differs from the runs"
    means = result["mean_dice"]
    assert f"malf-source {means['malf-source']:.3f}" in text, f"docs/claims.md: {fusion} malf-source mean"
