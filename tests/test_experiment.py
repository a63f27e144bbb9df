"""Integration: the cohort experiment end to end, the results contract, resuming, and nothing stale or mixed."""

from __future__ import annotations

import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny_cohort, tiny_profile

from isl_core.claims import organ_rows
from isl_core.data import load_dataset
from isl_core.experiment import ExperimentSettings, run_experiment
from isl_core.runtime import UserError
from isl_core.segment import unet_dtype

METHODS = ["baseline", "malf", "isl-intensity", "isl-mask", "isl-mask-ema"]


@pytest.fixture(scope="module")
def experiment(small_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "out"
    run_experiment(small_cohort, out, ExperimentSettings(profile="ci", methods=METHODS, device="cpu", seed=0,
                                                         progress=False))
    return out


@pytest.mark.slow
def test_summary_has_every_field_of_the_contract(experiment, small_cohort):
    summary = json.loads((experiment / "summary.json").read_text())
    organs = set(load_dataset(small_cohort, validate=False).organs.values())
    assert set(summary["methods"]) == set(METHODS)
    for name, m in summary["methods"].items():
        assert 0.0 <= m["mean_dice"] <= 1.0, name
        assert set(m["per_organ_dice"]) <= organs and len(m["per_organ_dice"]) >= 8
        assert m["seconds_per_case"] > 0
    for name in METHODS[1:]:
        t = summary["paired_tests"][f"{name}_vs_baseline"]
        assert t["test"] == "wilcoxon" and isinstance(t["delta_mean_dice"], float)
        assert t["p_value"] is None or 0.0 <= t["p_value"] <= 1.0
    for claim in ("C1", "C2", "C3"):
        c = summary["claims"][claim]
        assert {"delta", "ci95", "p_value", "p_holm", "n", "verdict"} <= set(c) and c["n"] == 2
        assert c["verdict"] in ("supported", "not shown", "contradicted")
    assert set(organ_rows(summary["claims"]["C4"])) <= organs and "protocol" not in summary  # no folds
    assert summary["unet_dtype"] == [unet_dtype("cpu", True)]  # bf16 only on a CPU with AVX-512 BF16 / AMX
    per_case = pd.read_csv(experiment / "per_case.csv")
    assert {"case", "method", "organ", "dice", "dice_grid", "hd95_mm", "seconds", "worker"} <= set(per_case.columns)
    assert "fold" not in per_case.columns
    grid = per_case.dropna(subset=["dice", "dice_grid"])  # both scorings of the same predictions agree roughly
    assert grid["dice_grid"].between(0, 1).all() and (grid["dice"] - grid["dice_grid"]).abs().mean() < 0.1
    assert set(summary["claims"]["source_vs_grid"]) == set(METHODS)
    assert set(per_case["case"]) == {"synth_val_000", "synth_val_001"}
    report = (experiment / "report.md").read_text()
    assert "## Scored in the source geometry and on the working grid" in report
    assert report.index("## Claims") < report.index("## Methods") and "| C1 | isl-mask-ema vs baseline" in report
    assert f"Segmenter precision: {unet_dtype('cpu', True)}." in report
    assert report.count("![") >= 3
    for fig in ("per_organ_dice.png", "paired_lines.png", "overlay.png"):
        assert (experiment / "figures" / fig).stat().st_size > 1000


@pytest.mark.slow
def test_predictions_are_in_the_source_geometry(experiment, small_cohort):
    ds = load_dataset(small_cohort, validate=False)
    for method in METHODS:
        for case in ds.validation + ds.test:  # test cases are predicted too
            src = nib.load(case.image)
            pred = nib.load(experiment / "predictions" / method / f"{case.id}.nii.gz")
            assert pred.shape == src.shape and np.allclose(pred.affine, src.affine), (method, case.id)
            assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(14))
    record = json.loads((experiment / "cases" / "synth_test_000.json").read_text())
    assert record["stamp_id"] and record["worker"].startswith("local:") and set(record["methods"]) == set(METHODS)


@pytest.mark.slow
def test_rerun_skips_finished_cases_and_refuses_other_settings(experiment, small_cohort):
    stamps = {p: p.stat().st_mtime_ns for p in (experiment / "cases").glob("*.json")}
    run_experiment(small_cohort, experiment, ExperimentSettings(profile="ci", methods=METHODS, device="cpu",
                                                                progress=False))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed
    with pytest.raises(UserError, match=r"other settings: .*profile\.") as err:
        run_experiment(small_cohort, experiment, ExperimentSettings(profile="quick", device="cpu", progress=False))
    assert "profile.name" not in str(err.value)  # the fields that differ are named, not just the profile's name
    with pytest.raises(UserError, match=r"seed \(0 -> 3\)"):
        run_experiment(small_cohort, experiment, ExperimentSettings(profile="ci", device="cpu", seed=3,
                                                                    progress=False))


# ---------------------------------------------------------------------------------------------- stale and mixed
def _settings(**kw) -> ExperimentSettings:
    return ExperimentSettings(profile=tiny_profile(), methods=["baseline"], device="cpu", progress=False, **kw)


@pytest.fixture()
def tiny(tmp_path):
    return tiny_cohort(tmp_path / "cohort")


@pytest.mark.slow
def test_force_on_one_case_never_mixes_settings(tiny, tmp_path):
    """Regression (#15.2a): `--force --cases ONE` with other settings, then a rerun: the mix was reported."""
    out = tmp_path / "out"
    run_experiment(tiny, out, _settings())
    other = dataclasses.replace(tiny_profile(), refine=dataclasses.replace(tiny_profile().refine, beta=0.5))
    b = dataclasses.replace(_settings(), profile=other)
    summary = run_experiment(tiny, out, dataclasses.replace(b, force=True, cases=["synth_val_000"]))
    assert summary["methods"]["baseline"]["n_cases"] == 1  # only the case made with these settings
    assert summary["excluded_cases"]["cases"] == ["synth_val_001"]
    assert set(pd.read_csv(out / "per_case.csv")["case"]) == {"synth_val_000"}
    with pytest.raises(UserError, match=r"synth_val_001\.json: this case was made with other settings "
                                        r"\(profile\.refine\.beta \(0\.6 -> 0\.5\)\)"):
        run_experiment(tiny, out, b)  # the later rerun under the new settings refuses instead of mixing
    with pytest.raises(UserError, match=r"profile\.refine\.beta \(0\.5 -> 0\.6\)"):
        run_experiment(tiny, out, _settings())  # and the old settings no longer own the folder
    summary = run_experiment(tiny, out, dataclasses.replace(b, force=True))
    assert summary["methods"]["baseline"]["n_cases"] == 2 and "excluded_cases" not in summary


@pytest.mark.slow
def test_regenerated_dataset_is_noticed(tiny, tmp_path):
    """Regression (#15.2b): `isl data synth D --force --seed 1` at the same path reported the old Dice."""
    from helpers import tiny_cohort as regenerate

    out = tmp_path / "out"
    run_experiment(tiny, out, _settings())
    before = (out / "cases" / "synth_val_000.json").read_bytes()
    shutil.rmtree(tiny)
    regenerate(tiny, seed=1)
    with pytest.raises(UserError, match=r"other settings: dataset \(its dataset.json or image/label files changed"):
        run_experiment(tiny, out, _settings())
    assert (out / "cases" / "synth_val_000.json").read_bytes() == before  # refused before touching anything


@pytest.mark.slow
def test_model_is_stamped_by_content_not_by_path(tiny, tmp_path):
    run_experiment(tiny, tmp_path / "train", _settings())  # trains a baseline to use as --model
    model_a, model_b = tmp_path / "a" / "run", tmp_path / "b" / "same-run"
    shutil.copytree(tmp_path / "train" / "baseline", model_a)
    shutil.copytree(tmp_path / "train" / "baseline", model_b)
    out = tmp_path / "out"
    run_experiment(tiny, out, _settings(model=str(model_a)))
    mtime = (out / "cases" / "synth_val_000.json").stat().st_mtime_ns
    summary = run_experiment(tiny, out, _settings(model=str(model_b)))  # same weights, another path: accepted
    assert (out / "cases" / "synth_val_000.json").stat().st_mtime_ns == mtime
    assert summary["methods"]["baseline"]["n_cases"] == 2 and not (out / "baseline").exists()
    weights = torch.load(model_b / "model.pt", weights_only=True)
    first = next(iter(weights))
    weights[first] = weights[first] + 1.0
    torch.save(weights, model_b / "model.pt")
    with pytest.raises(UserError, match=r"other settings: model \(other weights\)"):
        run_experiment(tiny, out, _settings(model=str(model_b)))


def test_set_options_change_the_profile_and_reach_the_experiment(tiny, tmp_path, monkeypatch):
    from isl_core import commands
    from isl_core.cli import build_parser

    args = build_parser().parse_args(["experiment", "ds", "--out", "o", "--profile", "ci", "--beta", "0.5",
                                      "--set", "refine.appearance=none", "--set", "data.spacing=[6,6,8]",
                                      "--set", "register.mask_grid=image"])
    profile = commands.profile_from_args(args, {"--beta": ("refine", "beta", args.beta)})
    assert (profile.refine.appearance, profile.refine.beta, profile.register.mask_grid) == ("none", 0.5, "image")
    assert profile.data.spacing == (6, 6, 8) and profile.name == "ci"
    # the experiment gets the changed profile, which its settings stamp records (a rerun with others is refused)
    seen = {}

    def record(dataset, out, settings):
        seen["s"] = settings
        return {"methods": {}}

    monkeypatch.setattr("isl_core.experiment.run_experiment", record)
    args = build_parser().parse_args(["experiment", str(tiny), "--out", str(tmp_path / "o"), "--profile", "ci",
                                      "--set", "refine.appearance=none"])
    commands.experiment(args)
    assert seen["s"].profile.refine.appearance == "none"
