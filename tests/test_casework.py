"""casework: the units of work are idempotent, and every caller trains the one baseline the same way.

One tiny cohort (4 training, 2 validation phantoms at 32x32x24) and 3 training steps of a small network: the
module used 44 s of CPU time (2-core machine, shared), most of it the four trainings of the first test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_cohort

from isl_core import casework, notebook, outputs
from isl_core.casework import BaselineJob, CaseJob, baseline_run, case_done, run_case
from isl_core.cli import main
from isl_core.config import get_profile
from isl_core.data import load_cases, load_dataset
from isl_core.runtime import read_json, write_json
from isl_core.segment import MODEL, train_segmenter

# a small network on small patches, watched twice during training (at steps 2 and 3)
SEGMENT = {"max_steps": 3, "val_every": 2, "checkpoint_every": 3, "channels": [8, 16, 32], "strides": [2, 2],
           "patch_size": [32, 32, 24]}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return tiny_cohort(tmp_path_factory.mktemp("casework") / "data")


@pytest.fixture(scope="module")
def experiment_baseline(cohort, tmp_path_factory) -> BaselineJob:
    """The single split's baseline as an experiment trains it, in an experiment folder."""
    out = tmp_path_factory.mktemp("casework") / "exp"
    write_json(out / "experiment.json", {"stamp": {}})  # what a worker checks it can see
    ds = load_dataset(cohort)
    job = BaselineJob(str(cohort), str(out), None, [c.id for c in ds.training], get_profile("ci", segment=SEGMENT),
                      0, {"settings": "a"}, device="cpu", progress=False)
    assert Path(baseline_run(job)) == out / "baseline"
    return job


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / MODEL, weights_only=True)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


@pytest.mark.slow
def test_every_caller_trains_the_same_baseline_and_watching_changes_no_weight(cohort, experiment_baseline, tmp_path):
    profile = experiment_baseline.profile
    ds = load_dataset(cohort)
    experiment = _weights(experiment_baseline.run_dir)
    # isl train
    options = [f"--set=segment.{k}={json.dumps(v)}" for k, v in SEGMENT.items()]
    assert main(["train", str(cohort), "--out", str(tmp_path / "train"), "--profile", "ci", "--device", "cpu",
                 *options]) == 0
    _assert_same_weights(_weights(tmp_path / "train"), experiment)
    # the notebooks' shared baseline
    setup = notebook.Setup(profile, ds, cohort, tmp_path / "nb", torch.device("cpu"), 0)
    setup.baseline()
    _assert_same_weights(_weights(setup.baseline_dir), experiment)
    # the same training, watching no case at all
    train_segmenter(load_cases(ds.training, profile.data), profile, ds.num_classes, ds.labels, out=tmp_path / "blind",
                    device="cpu", progress=False)
    _assert_same_weights(_weights(tmp_path / "blind"), experiment)
    # ... while the others did watch: the Dice of the first two validation cases, at steps 2 and 3
    for run in (experiment_baseline.run_dir, tmp_path / "train", setup.baseline_dir):
        watched = [r["step"] for r in read_json(run / "history.json", "history")["history"] if "val_dice" in r]
        assert watched == [2, 3], run


def test_a_finished_baseline_is_found_and_one_of_other_settings_retrained(experiment_baseline, monkeypatch):
    run = experiment_baseline.run_dir
    before = (run / MODEL).stat().st_mtime_ns
    trained = []
    monkeypatch.setattr(casework, "train_baseline", lambda ds, train, profile, out, **kw: trained.append(out))
    assert baseline_run(experiment_baseline) == str(run) and not trained  # found: nothing trained
    assert (run / MODEL).stat().st_mtime_ns == before
    other = BaselineJob(**{**experiment_baseline.__dict__, "out": str(run.parent / "other")})
    other.stamp = {"settings": "b"}
    (run.parent / "other" / "baseline").mkdir(parents=True)
    (run.parent / "other" / "baseline" / MODEL).write_bytes(b"a model of other settings")
    outputs.record_tree(run.parent / "other")  # as the kit leaves it: its own file, which it may replace
    baseline_run(other)
    assert trained == [run.parent / "other" / "baseline"]
    assert not (run.parent / "other" / "baseline" / MODEL).exists()  # the stale model went first


def test_a_finished_case_is_skipped_and_an_unfinished_one_recognised(experiment_baseline, monkeypatch):
    out = Path(experiment_baseline.out)
    case = experiment_baseline.train_ids[0].replace("train", "val")  # synth_val_000
    job = CaseJob(experiment_baseline, case, 0, ["baseline"], "stamp-1")
    assert not case_done(out, case, ["baseline"], "stamp-1")
    record = run_case(job)
    assert record["case"] == case and set(record["methods"]) == {"baseline"} and record["stamp_id"] == "stamp-1"
    assert case_done(out, case, ["baseline"], "stamp-1")
    assert not case_done(out, case, ["baseline", "malf"], "stamp-1")  # a method it lacks
    assert not case_done(out, case, ["baseline"], "stamp-2")  # made with other settings
    meta = out / "cases" / f"{case}.json"
    mtime = meta.stat().st_mtime_ns

    def no_work(job):
        raise AssertionError("a finished case built its runner")

    monkeypatch.setattr(casework, "_runner", no_work)
    assert run_case(job) == record and meta.stat().st_mtime_ns == mtime
    (out / "predictions" / "baseline" / f"{case}.nii.gz").unlink()  # a prediction lost: the case is not finished
    assert not case_done(out, case, ["baseline"], "stamp-1")
