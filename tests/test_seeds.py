"""`isl experiment --seeds N` with every control arm: each seed is a whole experiment, the claims use per-case means
over the seeds, the spread is reported, and a rerun resumes instead of recomputing."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_cohort, tiny_profile

from isl_core.experiment import ExperimentSettings, run_experiment
from isl_core.runtime import UserError
from isl_core.segment import unet_dtype

ALL_ARMS = ["baseline", "malf", "finetune-atlases", "tent", "pseudo-label", "isl-intensity", "isl-intensity-matched",
            "isl-mask", "isl-mask-ema", "malf-source"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    data = tiny_cohort(tmp_path_factory.mktemp("seeds") / "ds")
    out = tmp_path_factory.mktemp("seeds") / "out"
    # two of the six cases (the 9 arms x 2 seeds are the expensive part); the folds are still planned over all six
    settings = ExperimentSettings(profile=tiny_profile(), methods=ALL_ARMS, device="cpu", seed=3, folds=2, seeds=2,
                                  cases=["synth_train_000", "synth_val_000"], progress=False)
    return data, out, settings, run_experiment(data, out, settings)


@pytest.mark.slow
def test_every_seed_runs_every_arm_and_the_claims_use_the_means(seeded):
    _, out, _, summary = seeded
    assert summary["protocol"]["seeds"] == [3, 4] and summary["protocol"]["folds"] == 2
    per_seed = pd.read_csv(out / "per_case.csv")
    assert sorted(per_seed["seed"].unique()) == [3, 4] and set(per_seed["method"]) == set(ALL_ARMS)
    for seed in (3, 4):
        one = json.loads((out / "seeds" / str(seed) / "summary.json").read_text())
        assert one["settings"]["seed"] == seed and one["protocol"]["seeds"] == [seed]
    for seed in (3, 4):  # every seed's rows, as its own run wrote them
        own = pd.read_csv(out / "seeds" / str(seed) / "per_case.csv")
        mine = per_seed[per_seed["seed"] == seed].drop(columns="seed").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, own, check_dtype=False)
    # the claims pair per-case means over the seeds
    present = per_seed[per_seed["in_truth"].astype(str).str.lower().isin(["true", "1"])]
    case_dice = present.groupby(["method", "case", "seed"])["dice"].mean().groupby(["method", "case"]).mean()
    delta = (case_dice["isl-mask-ema"] - case_dice["baseline"]).mean()
    assert np.isclose(summary["claims"]["C1"]["delta"], delta)
    # the seeds really differ (a different baseline per seed), and the spread says by how much
    assert summary["claims"]["seeds"]["baseline"]["sd_of_mean"] > 0
    assert set(summary["claims"]["seeds"]) == set(ALL_ARMS)
    for claim in ("deformation", "vs_tent", "vs_pseudo_label", "C2_matched"):
        assert {"delta", "ci95", "ci95_folds", "p_value", "p_holm", "n", "verdict"} <= set(summary["claims"][claim])
    for m in ALL_ARMS:
        assert summary["methods"][m]["n_cases"] == 2
    assert summary["unet_dtype"] == [unet_dtype("cpu", True)]


@pytest.mark.slow
def test_fusion_in_the_source_geometry_is_scored_beside_malf(seeded):
    _, out, _, summary = seeded
    per_case = pd.read_csv(out / "per_case.csv")
    key = ["case", "seed", "organ"]
    malf = per_case[per_case["method"] == "malf"].set_index(key)
    source = per_case[per_case["method"] == "malf-source"].set_index(key)
    assert len(source) == len(malf) > 0
    # on the working grid malf-source is malf's vote; in the source geometry it is its own label map
    pd.testing.assert_series_equal(source["dice_grid"], malf["dice_grid"].loc[source.index])
    assert source["dice"].between(0, 1).all()
    claim = summary["claims"]["vs_fusion_source"]
    assert claim["reference"] == "malf-source" and claim["holm_family"] == "why" and claim["n"] == 2


@pytest.mark.slow
def test_a_rerun_resumes_to_the_same_summary(seeded):
    data, out, settings, summary = seeded
    cases = sorted((out / "seeds").glob("*/cases/*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in cases}
    again = run_experiment(data, out, settings)
    assert {p: p.stat().st_mtime_ns for p in cases} == stamps  # nothing recomputed
    assert again["methods"] == summary["methods"] and again["claims"] == summary["claims"]


def test_a_run_without_seeds_refuses_a_folder_of_several(seeded):
    data, out, settings, _ = seeded
    with pytest.raises(UserError, match="several seeds"):
        run_experiment(data, out, ExperimentSettings(profile=settings.profile, methods=ALL_ARMS, device="cpu",
                                                     seed=3, folds=2, force=True, progress=False))


def test_seeds_refuse_a_folder_of_a_single_seed_run(tmp_path):
    (tmp_path / "experiment.json").write_text(json.dumps({"stamp": {}, "methods": []}))
    with pytest.raises(UserError, match="without --seeds"):
        run_experiment(tmp_path / "nowhere", tmp_path, ExperimentSettings(profile="ci", seeds=2))


def _merge_seeds(*argv: str) -> None:
    old = sys.argv
    sys.argv = ["merge_seeds.py", *argv]
    try:
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "bench" / "merge_seeds.py"), run_name="__main__")
    finally:
        sys.argv = old


@pytest.mark.slow
def test_single_seed_runs_merged_give_the_seeds_run(seeded, tmp_path):
    _, out, _, summary = seeded
    _merge_seeds("--out", str(tmp_path / "merged"), f"3={out / 'seeds' / '3'}", f"4={out / 'seeds' / '4'}")
    merged = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert merged["claims"] == json.loads(json.dumps(summary["claims"]))
    assert merged["methods"] == json.loads(json.dumps(summary["methods"]))
    assert merged["protocol"]["seeds"] == [3, 4] and merged["settings"]["seed"] == [3, 4]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "merged" / "per_case.csv"), pd.read_csv(out / "per_case.csv"))


def test_merging_refuses_runs_of_different_settings(seeded, tmp_path):
    _, out, _, _ = seeded
    other = tmp_path / "other"
    other.mkdir()
    one = json.loads((out / "seeds" / "4" / "summary.json").read_text())
    one["settings"]["folds"] = 3
    (other / "summary.json").write_text(json.dumps(one))
    (other / "per_case.csv").write_text((out / "seeds" / "4" / "per_case.csv").read_text())
    with pytest.raises(SystemExit, match="differ .* in folds"):
        _merge_seeds("--out", str(tmp_path / "merged"), f"3={out / 'seeds' / '3'}", f"4={other}")
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_a_seed_added_to_a_combined_run_gives_the_seeds_run(seeded, tmp_path):
    """A committed combined run (here: seed 3 alone, merged) plus a later seed equals the run of both at once."""
    _, out, _, summary = seeded
    _merge_seeds("--out", str(tmp_path / "first"), f"3={out / 'seeds' / '3'}")
    _merge_seeds("--out", str(tmp_path / "both"), str(tmp_path / "first"), f"4={out / 'seeds' / '4'}")
    merged = json.loads((tmp_path / "both" / "summary.json").read_text())
    assert merged["claims"] == json.loads(json.dumps(summary["claims"]))
    assert merged["methods"] == json.loads(json.dumps(summary["methods"]))
    assert merged["protocol"]["seeds"] == [3, 4]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "both" / "per_case.csv"), pd.read_csv(out / "per_case.csv"))
    with pytest.raises(SystemExit, match="seed 4 is also in"):
        _merge_seeds("--out", str(tmp_path / "twice"), str(tmp_path / "both"), f"4={out / 'seeds' / '4'}")
    assert not (tmp_path / "twice").exists()
    with pytest.raises(SystemExit, match="no seed column"):
        _merge_seeds("--out", str(tmp_path / "bare"), str(out / "seeds" / "3"))
