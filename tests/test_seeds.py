"""`isl experiment --seeds N` with every control arm: each seed is a whole experiment, the claims use per-case means
over the seeds, the spread is reported, and a rerun resumes instead of recomputing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_cohort, tiny_profile

from isl_core.experiment import ExperimentSettings, mean_over_seeds, run_experiment, seed_spread
from isl_core.runtime import UserError

ALL_ARMS = ["baseline", "malf", "finetune-atlases", "tent", "pseudo-label", "isl-intensity", "isl-intensity-matched",
            "isl-mask", "isl-mask-ema"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    data = tiny_cohort(tmp_path_factory.mktemp("seeds") / "ds")
    out = tmp_path_factory.mktemp("seeds") / "out"
    settings = ExperimentSettings(profile=tiny_profile(), methods=ALL_ARMS, device="cpu", seed=3, folds=2, seeds=2,
                                  progress=False)
    return data, out, settings, run_experiment(data, out, settings)


@pytest.mark.slow
def test_every_seed_runs_every_arm_and_the_claims_use_the_means(seeded):
    _, out, _, summary = seeded
    assert summary["protocol"]["seeds"] == [3, 4] and summary["protocol"]["folds"] == 2
    per_seed = pd.read_csv(out / "per_case_seeds.csv")
    assert sorted(per_seed["seed"].unique()) == [3, 4] and set(per_seed["method"]) == set(ALL_ARMS)
    for seed in (3, 4):
        one = json.loads((out / "seeds" / str(seed) / "summary.json").read_text())
        assert one["settings"]["seed"] == seed and one["protocol"]["seeds"] == [seed]
    per_case = pd.read_csv(out / "per_case.csv")
    assert len(per_case) == len(per_seed) // 2
    row = per_case.iloc[0]
    same = per_seed[(per_seed["case"] == row["case"]) & (per_seed["method"] == row["method"])
                    & (per_seed["organ"] == row["organ"])]
    assert np.isclose(row["dice"], same["dice"].mean(), equal_nan=True)
    # the seeds really differ (a different baseline per seed), and the spread says by how much
    assert summary["seeds"]["baseline"]["sd_of_mean"] > 0
    assert set(summary["seeds"]) == set(ALL_ARMS)
    for m in ALL_ARMS:
        assert summary["methods"][m]["n_cases"] == 6


@pytest.mark.slow
def test_a_rerun_resumes_to_the_same_summary(seeded):
    data, out, settings, summary = seeded
    cases = sorted((out / "seeds").glob("*/cases/*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in cases}
    again = run_experiment(data, out, settings)
    assert {p: p.stat().st_mtime_ns for p in cases} == stamps  # nothing recomputed
    assert again["methods"] == summary["methods"] and again["claims"] == summary["claims"]


def test_mean_over_seeds_keeps_absent_organs_undefined_and_spread_is_per_method():
    rows = []
    for seed, (a, b) in enumerate([(0.5, 0.7), (0.7, 0.9)]):
        rows += [{"case": "c1", "method": "m", "organ": "liver", "dice": a, "seed": seed},
                 {"case": "c1", "method": "m", "organ": "gallbladder", "dice": np.nan, "seed": seed},
                 {"case": "c2", "method": "m", "organ": "liver", "dice": b, "seed": seed}]
    table = pd.DataFrame(rows)
    means = mean_over_seeds(table)
    assert list(means.columns) == ["case", "method", "organ", "dice"]
    assert means["dice"].tolist()[0] == pytest.approx(0.6) and np.isnan(means["dice"].tolist()[1])
    spread = seed_spread(table)["m"]
    assert spread["sd_of_mean"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert spread["mean_case_sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))


def test_seeds_refuse_a_folder_of_a_single_seed_run(tmp_path):
    (tmp_path / "experiment.json").write_text(json.dumps({"stamp": {}, "methods": []}))
    with pytest.raises(UserError, match="without --seeds"):
        run_experiment(tmp_path / "nowhere", tmp_path, ExperimentSettings(profile="ci", seeds=2))
