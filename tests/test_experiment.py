"""Integration: `isl experiment` end to end at the ci profile, the results contract, resuming."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from isl_core.cli import main
from isl_core.data import load_dataset

METHODS = "baseline,malf,isl-intensity,isl-mask,isl-mask-ema"


@pytest.fixture(scope="module")
def experiment(small_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "out"
    rc = main(["experiment", str(small_cohort), "--out", str(out), "--profile", "ci", "--methods", METHODS,
               "--device", "cpu", "--seed", "0"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_summary_has_every_field_of_the_contract(experiment, small_cohort):
    summary = json.loads((experiment / "summary.json").read_text())
    organs = set(load_dataset(small_cohort, validate=False).organs.values())
    assert set(summary["methods"]) == set(METHODS.split(","))
    for name, m in summary["methods"].items():
        assert 0.0 <= m["mean_dice"] <= 1.0, name
        assert set(m["per_organ_dice"]) <= organs and len(m["per_organ_dice"]) >= 8
        assert m["seconds_per_case"] > 0
    for name in METHODS.split(",")[1:]:
        t = summary["paired_tests"][f"{name}_vs_baseline"]
        assert t["test"] == "wilcoxon" and isinstance(t["delta_mean_dice"], float)
        assert t["p_value"] is None or 0.0 <= t["p_value"] <= 1.0
    per_case = pd.read_csv(experiment / "per_case.csv")
    assert {"case", "method", "organ", "dice", "hd95_mm"} <= set(per_case.columns)
    assert set(per_case["case"]) == {"synth_val_000", "synth_val_001"}
    assert (experiment / "report.md").read_text().count("![") >= 3
    for fig in ("per_organ_dice.png", "paired_lines.png", "overlay.png"):
        assert (experiment / "figures" / fig).stat().st_size > 1000


@pytest.mark.slow
def test_predictions_are_in_the_source_geometry(experiment, small_cohort):
    ds = load_dataset(small_cohort, validate=False)
    for method in METHODS.split(","):
        for case in ds.validation + ds.test:  # test cases are predicted too
            src = nib.load(case.image)
            pred = nib.load(experiment / "predictions" / method / f"{case.id}.nii.gz")
            assert pred.shape == src.shape and np.allclose(pred.affine, src.affine), (method, case.id)
            assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(14))


@pytest.mark.slow
def test_rerun_skips_finished_cases_and_refuses_other_settings(experiment, small_cohort, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in (experiment / "cases").glob("*.json")}
    assert main(["experiment", str(small_cohort), "--out", str(experiment), "--profile", "ci", "--methods", METHODS,
                 "--device", "cpu"]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed
    rc = main(["experiment", str(small_cohort), "--out", str(experiment), "--profile", "quick", "--device", "cpu"])
    assert rc == 2
    assert "other settings" in capsys.readouterr().err
