"""K-fold cross-validation: deterministic assignment, every labelled case inferred exactly once, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import TINY_METHODS, tiny_cohort, tiny_profile

from data_download.splits import kfold_split
from isl_core.data import Case, Dataset, DatasetError
from isl_core.experiment import ExperimentSettings, run_experiment
from isl_core.folds import assign_folds, baseline_dir, case_seeds, plan_folds
from isl_core.runtime import UserError

REPO = Path(__file__).resolve().parents[1]


def _ds(n_train: int = 5, n_val: int = 3) -> Dataset:
    def cases(prefix, n, split):
        return [Case(f"{prefix}{i:02d}", Path(f"/x/{prefix}{i}.nii.gz"), Path(f"/x/l{prefix}{i}.nii.gz"), split)
                for i in range(n)]
    return Dataset(Path("/x"), {0: "background", 1: "spleen"}, cases("t", n_train, "training"),
                   cases("v", n_val, "validation"))


def test_assignment_depends_on_seed_and_ids_not_their_order():
    ids = [f"case{i}" for i in range(11)]
    a = assign_folds(ids, 3, seed=5)
    assert a == assign_folds(list(reversed(ids)), 3, seed=5)
    assert sorted(pd.Series(a).value_counts().tolist()) == [3, 4, 4]  # balanced: sizes differ by at most one
    assert any(assign_folds(ids, 3, seed=s) != a for s in range(6, 10))  # the seed matters


def test_fetch_and_experiment_deal_the_same_folds():
    """``isl data fetch --folds`` (kfold_split) and ``isl experiment --folds`` (assign_folds): one partition."""
    rng = np.random.default_rng(2024)
    for _ in range(200):
        n = int(rng.integers(2, 40))
        ids = [f"{rng.choice(['case', 'img', 'p'])}{v}" for v in rng.choice(10_000, n, replace=False)]
        k, seed = int(rng.integers(2, n + 1)), int(rng.integers(0, 2**31))
        assignment = assign_folds(ids, k, seed)
        for fold in range(k):
            train, val = kfold_split(list(rng.permutation(ids)), k, fold, seed)
            assert val == sorted(c for c, f in assignment.items() if f == fold)
            assert train == sorted(c for c, f in assignment.items() if f != fold)


def test_assignment_reproduces_the_committed_claims_runs():
    """The claims runs in docs/claims_runs/ were made with this assignment: their fold column comes out again."""
    runs = sorted((REPO / "docs" / "claims_runs").glob("per_case_*.csv"))
    assert runs
    for path in runs:
        protocol = json.loads(path.with_name(path.name.replace("per_case", "summary")).with_suffix(".json")
                              .read_text())["protocol"]
        folds = pd.read_csv(path).groupby("case")["fold"].first().to_dict()
        assert assign_folds(list(folds), protocol["folds"], protocol["fold_seed"]) == folds, path.name


@pytest.mark.parametrize("k", [1, 9])
def test_fold_count_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match=f"--folds {k}"):
        assign_folds([f"c{i}" for i in range(8)], k)
    with pytest.raises(DatasetError, match="dataset.json"):
        plan_folds(_ds(), k)


def test_plan_pools_training_and_validation_and_trains_on_the_other_folds():
    ds = _ds()
    plan = plan_folds(ds, 3, fold_seed=1)
    inferred = [c.id for f in plan for c in f.infer]
    assert sorted(inferred) == sorted(c.id for c in ds.training + ds.validation)  # every case exactly once
    for f in plan:
        assert {c.id for c in f.train}.isdisjoint(c.id for c in f.infer)
        assert len(f.train) + len(f.infer) == 8
        assert baseline_dir("/out", f.index) == Path("/out/folds") / str(f.index) / "baseline"
    seeds = case_seeds(ds, 3, seed=10)
    assert sorted(seeds.values()) == list(range(10, 18))
    single = plan_folds(ds, None)
    assert [c.id for c in single[0].infer] == ["v00", "v01", "v02"] and single[0].index is None
    with pytest.raises(DatasetError, match="no labelled case"):
        plan_folds(ds, 2, cases=["nope"])


def test_settings_refuse_bad_fold_options():
    with pytest.raises(UserError, match="--folds 1"):
        ExperimentSettings(folds=1)
    with pytest.raises(UserError, match="--model cannot be combined with --folds"):
        ExperimentSettings(folds=2, model="/some/run")
    with pytest.raises(UserError, match="--retries"):
        ExperimentSettings(retries=-1)


@pytest.mark.slow
def test_folds_infer_every_case_once_and_resume(tmp_path):
    ds_dir = tiny_cohort(tmp_path / "cohort")
    out = tmp_path / "out"
    settings = ExperimentSettings(profile=tiny_profile(), methods=TINY_METHODS, device="cpu", folds=2,
                                  progress=False)
    seen: list[str] = []

    def stop_after_one(record):
        seen.append(record["case"])
        raise KeyboardInterrupt  # the user interrupts the run after the first finished case

    with pytest.raises(KeyboardInterrupt):
        run_experiment(ds_dir, out, settings, on_case=stop_after_one)
    first = out / "cases" / f"{seen[0]}.json"
    mtime = first.stat().st_mtime_ns
    summary = run_experiment(ds_dir, out, settings, on_case=lambda r: seen.append(r["case"]))
    assert first.stat().st_mtime_ns == mtime  # not recomputed
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 6  # every case inferred exactly once in all
    per_case = pd.read_csv(out / "per_case.csv")
    assert "fold" in per_case.columns and per_case["case"].nunique() == 6
    assert per_case.groupby("case")["fold"].nunique().eq(1).all()
    assert set(per_case["fold"]) == {0, 1}
    assert summary["protocol"] == {"folds": 2, "fold_seed": 0, "n_cases": 6, "seeds": [0]}
    assert (out / "folds" / "0" / "baseline" / "model.pt").is_file()
    assert (out / "folds" / "1" / "baseline" / "model.pt").is_file()
    for f in (0, 1):  # a fold's baseline never saw its own cases
        trained = set(json.loads((out / "folds" / str(f) / "baseline" / "experiment_stamp.json").read_text())[
            "train_ids"])
        assert trained.isdisjoint(per_case.loc[per_case["fold"] == f, "case"])
    assert list(summary["claims"])[0] == "C1" and summary["claims"]["C1"]["n"] == 6
